"""Where the C++ layer kernel pays on this CPU: the kernel plan FastLM chooses, and what it rests on.

Prints the CPU (`cpu_summary()`), the kernel build's vector code, the plan a fresh calibration
chooses (`FastLM.kernel_plan`; the cached one is not used here) with its measurements -- one layer
and lm_head of SmolLM2-135M, kernel against oneDNN (torch ops over prepacked weights), best of a few
calls per row count -- and then whole-model steps on the real SmolLM2-135M weights, alternating the
two paths round by round (the machine is shared, so read the ratios): a prefill of T tokens after a
74-token prefix (T = 1 is one decode step of one sequence; T = 12 is the follow-up question of
bench/generate.py), prefills into an empty cache, a batched decode step of B sequences, and
lm_head alone for B rows. The `plan` column is the path the chosen plan runs for that step.

    flock /tmp/visprompt-cpu.lock python bench/kernel_rows.py [--rounds 5] [--threads 2] [--plan-only]

Output on the project's 2-core AMD EPYC (AVX2): bench/results/kernel_rows.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", default="1,2,4,8,12,16,32,64")
    ap.add_argument("--fresh", default="86,128,256,512")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--heads", default="1,2,4,8,16")
    ap.add_argument("--plan-only", action="store_true", help="the CPU, the plan and its calibration only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from visprompt.models.config import VLMConfig
    from visprompt.models.vision_language_model import VisionLanguageModel
    from visprompt.runtime import cpu_kernels
    from visprompt.runtime import kernel_plan as kp
    from visprompt.runtime.cpu import cpu_summary
    from visprompt.runtime.fast_decode import FastLM

    kernel = cpu_kernels.load()
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if kernel is None:
        print(f"kernel unavailable: {cpu_kernels.reason()}")
        return 1
    print(f"kernel: {kernel.simd()} micro-kernels, built with {' '.join(cpu_kernels.compile_flags())}")
    model = VisionLanguageModel.build(VLMConfig(vision_source="efficientnet-lite0", lm_source="smollm2-135m")).eval()
    lm = model.lm

    saved = {k: os.environ.get(k) for k in (kp.ENV, "XDG_CACHE_HOME")}
    with tempfile.TemporaryDirectory() as cache:  # a fresh calibration, not the cached plan
        os.environ.pop(kp.ENV, None)
        os.environ["XDG_CACHE_HOME"] = cache
        planned = FastLM(lm, max_batch=16)
        os.environ[kp.ENV] = str(1 << 30)  # the kernel at every size: what the plan is measured against
        kernel_dec = FastLM(lm, max_batch=16)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    torch_dec = FastLM(lm, max_batch=16, kernels=False)  # with its own packed copies for one row
    print(f"plan: {planned.kernel_plan}")
    print(f"calibration (one layer of {len(planned.layers)}, and lm_head; ms, best of a few calls):")
    print(planned.plan.table())
    print()
    if args.plan_only:
        return 0

    torch.manual_seed(0)
    with torch.inference_mode():
        emb = lm.get_input_embeddings()(torch.randint(0, 49152, (600,)))

    def prefill_ms(dec: FastLM, t: int, after: int = 74) -> float:
        s = dec.new_sequence()
        if after:
            dec.prefill(s, emb[:after], logits=False)
        t0 = time.perf_counter()
        dec.prefill(s, emb[after : after + t])
        dt = time.perf_counter() - t0
        dec.free(s)
        return dt * 1e3

    def fresh_prefill_ms(dec: FastLM, t: int) -> float:
        return prefill_ms(dec, t, after=0)

    def decode_ms(dec: FastLM, b: int) -> float:
        seqs = [dec.new_sequence() for _ in range(b)]
        for i, s in enumerate(seqs):
            dec.prefill(s, emb[: 60 + i], logits=False)
        dec.decode(seqs, [5] * b)
        t0 = time.perf_counter()
        for _ in range(4):
            dec.decode(seqs, [5] * b)
        dt = (time.perf_counter() - t0) / 4
        for s in seqs:
            dec.free(s)
        return dt * 1e3

    def head_ms(dec: FastLM, b: int) -> float:
        x = emb[:b].contiguous()
        dec._logits(x)
        t0 = time.perf_counter()
        for _ in range(5):
            dec._logits(x)
        return (time.perf_counter() - t0) / 5 * 1e3

    def layer_path(n: int) -> str:
        return "kernel" if n <= planned.kernel_rows else planned.plan.other

    def head_path(n: int) -> str:
        return "kernel" if n <= planned.head_kernel_rows else planned.plan.other

    cases = [(f"prefill {t} tokens after 74", prefill_ms, t, layer_path) for t in map(int, args.prefill.split(","))]
    cases += [
        (f"prefill {t} tokens, empty cache", fresh_prefill_ms, t, layer_path) for t in map(int, args.fresh.split(","))
    ]
    cases += [(f"decode step, {b} sequences", decode_ms, b, layer_path) for b in map(int, args.batches.split(","))]
    cases += [(f"lm_head, {b} rows", head_ms, b, head_path) for b in map(int, args.heads.split(","))]
    print(f"whole model, median of {args.rounds} alternating rounds:")
    print(f"{'case':32s} {'kernel ms':>10s} {'torch ms':>10s} {'torch/kernel':>12s} {'plan':>8s}")
    with torch.inference_mode():
        for name, fn, n, path in cases:
            k, t = [], []
            for _ in range(args.rounds):
                k.append(fn(kernel_dec, n))
                t.append(fn(torch_dec, n))
            km, tm = statistics.median(k), statistics.median(t)
            print(f"{name:32s} {km:10.2f} {tm:10.2f} {tm / km:11.2f}x {path(n):>8s}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
