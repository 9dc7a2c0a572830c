"""Where the C++ layer kernel pays: FastLM with it against FastLM on torch ops, by rows per step.

Measures, on the real SmolLM2-135M weights, alternating the two paths round by round (the machine is
shared, so read the ratios): a prefill of T tokens after a 74-token prefix (T = 1 is one decode step
of one sequence; T = 12 is the follow-up question of bench/generate.py), a batched decode step of
B sequences, and lm_head alone for B rows (kernel panels vs oneDNN's packed product). This is
where `KERNEL_ROWS` and `HEAD_KERNEL_ROWS` in runtime/fast_decode.py come from.

    flock /tmp/visprompt-cpu.lock python bench/kernel_rows.py [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", default="1,2,4,8,12,16,32,64")
    ap.add_argument("--fresh", default="86,128")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--heads", default="1,2,4,8,16")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from visprompt.models.config import VLMConfig
    from visprompt.models.vision_language_model import VisionLanguageModel
    from visprompt.runtime import fast_decode
    from visprompt.runtime.fast_decode import FastLM

    model = VisionLanguageModel.build(VLMConfig(vision_source="efficientnet-lite0", lm_source="smollm2-135m")).eval()
    lm = model.lm
    kernel_dec = FastLM(lm, max_batch=16)
    if kernel_dec.kernel is None:
        print(f"kernel unavailable: {kernel_dec.kernel_reason}")
        return 1
    torch_dec = FastLM(lm, max_batch=16, kernels=False)  # with its own packed copies for one row
    torch.manual_seed(0)
    with torch.inference_mode():
        emb = lm.get_input_embeddings()(torch.randint(0, 49152, (160,)))

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

    # the kernel instance runs everything on the kernel here; the thresholds are what this decides
    fast_decode.KERNEL_ROWS = fast_decode.HEAD_KERNEL_ROWS = 1 << 30
    cases = [(f"prefill {t} tokens after 74", prefill_ms, t) for t in map(int, args.prefill.split(","))]
    cases += [(f"prefill {t} tokens, empty cache", fresh_prefill_ms, t) for t in map(int, args.fresh.split(","))]
    cases += [(f"decode step, {b} sequences", decode_ms, b) for b in map(int, args.batches.split(","))]
    cases += [(f"lm_head, {b} rows", head_ms, b) for b in map(int, args.heads.split(","))]
    print(f"{'case':32s} {'kernel ms':>10s} {'torch ms':>10s} {'torch/kernel':>12s}")
    with torch.inference_mode():
        for name, fn, n in cases:
            k, t = [], []
            for _ in range(args.rounds):
                k.append(fn(kernel_dec, n))
                t.append(fn(torch_dec, n))
            km, tm = statistics.median(k), statistics.median(t)
            print(f"{name:32s} {km:10.2f} {tm:10.2f} {tm / km:11.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
