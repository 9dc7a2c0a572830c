"""A/B timing of FastLM's batch-1 decode step against torch.compile'd variants of it (docs/runtime.md).

    NT=1 python bench/archive/compile_decode/ab.py --variants c_base_baddbmm_dyn --rounds 5 --hf 1
    NT=1 python bench/archive/compile_decode/ab.py --variants c_base_baddbmm_dyn --rounds 5 --cpp_wrapper 1

Variants alternate with the current path in one process (median ms/token over 64 greedy tokens);
`c_<kv>_<matvec>_<dyn|static>`: kv `base` writes the KV cache with index_put_ on the whole buffer,
anything else with index_copy_ on a view; matvec `bmm` (FastLM's column blocks), `baddbmm` (the same,
left to MKL by inductor) or `mm`. First runs include compiling. Results went into docs/runtime.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import argparse
import statistics
import time

import torch
from common import load, prompt_ids
from variants import StepRunner, add_tt, add_zb, make_step

from visprompt.runtime.fast_decode import FastLM

if os.environ.get("NT"):
    torch.set_num_threads(int(os.environ["NT"]))
ap = argparse.ArgumentParser()
ap.add_argument("--variants", default="eager_step,compiled_dyn")
ap.add_argument("--rounds", type=int, default=4)
ap.add_argument("--n", type=int, default=64)
ap.add_argument("--hf", type=int, default=0)
ap.add_argument("--prompts", type=int, default=1)
ap.add_argument("--cpp_wrapper", type=int, default=0)
args = ap.parse_args()

lm, tok = load()
emb = lm.get_input_embeddings()
dec = FastLM(lm, max_batch=1)


def gen_with(decode1):
    """Greedy generation with `decode1(seq, token) -> logits [1, V]` as the decode step; returns the
    tokens, the median ms per decode step and the logits of every step."""

    def g(ids, n):
        s = dec.new_sequence()
        with torch.inference_mode():
            lg = dec.prefill(s, emb(ids))
            t = [int(lg.argmax())]
            logits = [lg]
            st = []
            for _ in range(n - 1):
                t0 = time.perf_counter()
                lg = decode1(s, t[-1])[0]
                logits.append(lg)
                t.append(int(lg.argmax()))
                st.append(time.perf_counter() - t0)
        dec.free(s)
        return t, statistics.median(st) * 1e3, logits

    return g


gen_base = gen_with(lambda s, token: dec.decode([s], [token]))

import torch._inductor.config as icfg  # noqa: E402 (imported only here, where the compiled variants are set up)

if args.cpp_wrapper:
    icfg.cpp_wrapper = True
fns = {"base": gen_base}
for v in args.variants.split(","):
    if v == "eager_step":
        fns[v] = gen_with(StepRunner(dec, make_step(dec, False)).decode1)
    elif v == "compiled_dyn":
        fns[v] = gen_with(StepRunner(dec, torch.compile(make_step(dec, False), dynamic=True, fullgraph=True)).decode1)
    elif v.startswith("c_"):  # c_<kvmode>_<mv>_<dyn|static>
        _, kvmode, mvk, shp = v.split("_")
        if mvk == "mm":
            add_tt(dec)
        if mvk == "baddbmm":
            add_zb(dec)
        fns[v] = gen_with(
            StepRunner(
                dec, torch.compile(make_step(dec, shp == "static", kvmode, mvk), dynamic=(shp == "dyn"), fullgraph=True)
            ).decode1
        )
    elif v.startswith("e_"):  # eager variants
        _, kvmode, mvk = v.split("_")
        if mvk == "mm":
            add_tt(dec)
        if mvk == "baddbmm":
            add_zb(dec)
        fns[v] = gen_with(StepRunner(dec, make_step(dec, False, kvmode, mvk)).decode1)
    elif v == "compiled_static":
        fns[v] = gen_with(StepRunner(dec, torch.compile(make_step(dec, True), fullgraph=True)).decode1)
    elif v == "compiled_dyn_maxat":
        fns[v] = gen_with(
            StepRunner(
                dec, torch.compile(make_step(dec, False), dynamic=True, mode="max-autotune-no-cudagraphs")
            ).decode1
        )

ids_list = [prompt_ids(tok, i) for i in range(args.prompts)]
ref = {}
for name, g in fns.items():
    t0 = time.perf_counter()
    out = [g(ids, args.n) for ids in ids_list]
    print(f"{name}: first run (incl. compile) {time.perf_counter() - t0:.1f}s", flush=True)
    if name == "base":
        ref = out
    else:
        for (tb, _, lb), (tv, _, lv) in zip(ref, out):
            md = max(float((a - b).abs().max()) for a, b in zip(lb, lv))
            print(f"  {name}: tokens equal {tb == tv}, max |dlogit| {md:.2e}", flush=True)
ms = {k: [] for k in fns}
for r in range(args.rounds):
    for name, g in fns.items():
        ms[name].append(g(ids_list[0], args.n)[1])
    print("round", r, {k: round(v[-1], 1) for k, v in ms.items()}, flush=True)
med = {k: statistics.median(v) for k, v in ms.items()}
print("median ms/tok", {k: round(v, 2) for k, v in med.items()})
print("ratio base/variant", {k: round(med["base"] / v, 3) for k, v in med.items()})
if args.hf:
    ids = ids_list[0][None]
    with torch.inference_mode():
        for _ in range(args.hf):
            t0 = time.perf_counter()
            out = lm.generate(ids, max_new_tokens=args.n, do_sample=False, min_new_tokens=args.n)
            dt = time.perf_counter() - t0
            print(
                f"hf generate: {dt / args.n * 1e3:.1f} ms/tok (incl prefill); tokens equal base {out[0, ids.shape[1] :].tolist() == ref[0][0]}",
                flush=True,
            )
