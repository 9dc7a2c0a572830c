"""Generation speed of visprompt's runtime, side by side with transformers and llama.cpp, in one run.

Workload: a prefix VLM of the packaged EfficientNet-Lite0 (49 image tokens) and the real
SmolLM2-135M-Instruct weights (untrained connector: this measures speed, not answers), a real photo
(examples/coffee.jpg), a question through the chat template, 64 new tokens (EOS ignored so every
engine decodes exactly 64), greedy.

Reported per engine: time to first token (image file -> first token, vision encoder included),
decode tok/s at batch 1, total tok/s at 1, 4 and 16 concurrent requests, follow-up first-token time
with the caches, greedy agreement with fp32, RSS, and fraction of the memory-bandwidth roofline
(bandwidth measured in the same run with an fp32 8192x8192 mat-vec).

    flock /tmp/visprompt-cpu.lock python bench/generate.py            # writes JSON + docs/runtime.md

The machine is shared and noisy: compare ratios within one run, not numbers across runs. Leave
OMP_WAIT_POLICY unset: PASSIVE (which sleeps OpenMP threads between parallel regions) cut llama.cpp
from ~135 to ~48 tok/s here and the lean decoder by ~5%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "coffee.jpg"
QUESTIONS = [
    "What is in this picture?",
    "Describe the image in detail.",
    "What colors do you see?",
    "Is there a drink here?",
    "What is the object on the table?",
    "Where could this photo have been taken?",
    "Write a caption for this photo.",
    "What time of day is it?",
    "Is this a cafe?",
    "What material is the cup made of?",
    "How many cups are there?",
    "What is the mood of this picture?",
    "Is the drink hot or cold?",
    "What is next to the cup?",
    "Could you name the drink?",
    "Tell me a story about this image.",
]
GATE_PHOTOS = ["coffee.jpg", "chelsea.jpg", "rocket.jpg", "astronaut.jpg"]
GATE_QUESTIONS = ["What is in this picture?", "Write a short poem about it."]


def md_markers() -> tuple[str, str]:
    """The markers of this kind of CPU's table: one table per kind ("avx2", "avx512", ...) in the docs."""
    try:
        from visprompt.runtime.cpu import cpu_info

        kind = cpu_info().isa.split(",")[0].strip() or "baseline"
    except ImportError:
        kind = "baseline"
    return f"<!-- bench:generate:{kind}:start -->", f"<!-- bench:generate:{kind}:end -->"


def conv(question: str, photo: Path = PHOTO) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": str(photo)}, {"type": "text", "text": question}]}]


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    """The CPU and the instruction sets the runtime can use on it."""
    try:
        from visprompt.runtime.cpu import cpu_summary

        return cpu_summary()
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median(xs):
    return statistics.median(xs) if xs else None


def matvec_bandwidth(n: int = 8192, reps: int = 20) -> float:
    """GB/s of weights read by an fp32 n x n mat-vec (the bound of batch-1 decoding): the best of
    one F.linear (MKL runs it on one core), the matrix cut in column blocks, one per thread, and
    visprompt's C++ kernel on the matrix in 16-column panels (the layout its decoder streams)."""
    from visprompt.runtime import cpu_kernels

    threads = torch.get_num_threads()
    w = torch.randn(n, n)
    x = torch.randn(1, n)
    blocks = w.view(n, threads, n // threads).permute(1, 0, 2).contiguous()  # [threads, n, n/threads]
    xb = x.expand(threads, 1, n)
    fns = [lambda: torch.nn.functional.linear(x, w), lambda: torch.bmm(xb, blocks)]
    kernel = cpu_kernels.load()
    panels = kernel.pack_panels(w) if kernel is not None else None
    if kernel is not None:
        fns.append(lambda: kernel.panel_linear(x, panels, n))
    best = float("inf")
    for fn in fns:
        fn()
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return n * n * 4 / best / 1e9


# -- engines --------------------------------------------------------------------------------------
def run_one(backend_or_sched, encode, question, n_new, photo=PHOTO, history=None):
    """Submit one request; returns (ttft_s, decode_tok_s, total_s, token_ids, cached_prompt_tokens)."""
    from visprompt.engine.backend import SamplingParams

    c = conv(question, photo) if history is None else history + [{"role": "user", "content": question}]
    sched = backend_or_sched
    t0 = time.perf_counter()
    ((prompt, embeds, keys),) = encode([c])
    h = sched.submit(prompt, SamplingParams(max_new_tokens=n_new), image_embeds=embeds, image_keys=keys)
    first = None
    for _ev in h.events():
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    res = h.result()
    assert len(res.token_ids) == n_new, (len(res.token_ids), res.finish_reason)
    return first - t0, (n_new - 1) / (end - first), end - t0, res.token_ids, h.cached_prompt_tokens, res.text


def run_concurrent(sched, encode, n, n_new):
    from visprompt.engine.backend import SamplingParams

    t0 = time.perf_counter()
    reqs = encode([conv(QUESTIONS[i % len(QUESTIONS)]) for i in range(n)])
    hs = [sched.submit(p, SamplingParams(max_new_tokens=n_new), image_embeds=e, image_keys=k) for p, e, k in reqs]
    sched.run()
    wall = time.perf_counter() - t0
    toks = sum(len(h.result().token_ids) for h in hs)
    return toks / wall, [h.result().token_ids for h in hs]


def run_sequential(sched, encode, n, n_new):
    from visprompt.engine.backend import SamplingParams

    t0 = time.perf_counter()
    toks = 0
    for i in range(n):
        ((p, e, k),) = encode([conv(QUESTIONS[i % len(QUESTIONS)])])
        toks += len(
            sched.submit(p, SamplingParams(max_new_tokens=n_new), image_embeds=e, image_keys=k).result().token_ids
        )
    return toks / (time.perf_counter() - t0)


def measure_scheduler(name, sched, backend, n_new, reps, batches, clear, follow_up=True, ref_tokens=None):
    """TTFT / decode / follow-up / concurrency for one decoder behind the scheduler."""
    encode = backend.encode_requests
    out = {"engine": name}
    # warm-up (allocations, first-call overheads)
    clear()
    run_one(sched, encode, QUESTIONS[0], 4)
    ttft, dec, fu_q, fu_t, hits_q, hits_t = [], [], [], [], [], []
    tokens = text = None
    for _ in range(reps):
        clear()
        t, d, _, tokens, _, text = run_one(sched, encode, QUESTIONS[0], n_new)
        ttft.append(t)
        dec.append(d)
        if follow_up:
            # same image, new question (a new chat): image features + system/image prefix come from the caches
            t2, *_, hit, _ = run_one(sched, encode, QUESTIONS[1], 8)
            fu_q.append(t2)
            hits_q.append(hit)
            # a follow-up turn in the same chat: the whole first turn, reply included, is cached
            history = conv(QUESTIONS[0]) + [{"role": "assistant", "content": text}]
            t3, *_, hit3, _ = run_one(sched, encode, QUESTIONS[2], 8, history=history)
            fu_t.append(t3)
            hits_t.append(hit3)
    out.update(ttft_s=median(ttft), decode_tok_s=median(dec), tokens=tokens, text=text)
    if follow_up:
        out.update(
            followup_new_question_ttft_s=median(fu_q),
            followup_turn_ttft_s=median(fu_t),
            followup_cached_tokens=[median(hits_q), median(hits_t)],
        )
    # Concurrency levels and the one-by-one baseline alternate round by round (medians): on this VM a
    # process gets faster as its memory warms, so rates measured minutes apart are not comparable.
    rates: dict[str, list[float]] = {str(n): [] for n in batches}
    one_by_one = []
    for _ in range(reps):
        for n in batches:
            clear()
            rates[str(n)].append(run_concurrent(sched, encode, n, n_new)[0])
        clear()
        one_by_one.append(run_sequential(sched, encode, min(4, max(batches)), n_new))
    out["concurrent_tok_s"] = {n: median(r) for n, r in rates.items()}
    out["one_by_one_tok_s"] = median(one_by_one)
    out["rss_mb"] = rss_mb()
    if ref_tokens is not None:
        out["greedy_identical_to_transformers"] = tokens == ref_tokens
    return out


def measure_transformers(model, backend, n_new, reps, batches):
    """transformers `generate` (fp32, its own KV cache) on the same LM and the same fused embeddings."""
    from transformers import GenerationConfig

    lm = model.lm
    saved_eos = lm.generation_config.eos_token_id
    lm.generation_config.eos_token_id = None  # EOS ignored, as for the other engines
    pad = model.tokenizer.pad_token_id or 0

    def embeds_for(questions):
        backend.image_cache.clear()
        reqs = backend.encode_requests([conv(q) for q in questions])
        rows = [model.embed(torch.tensor([p]), e)[0] for p, e, _ in reqs]
        width = max(r.shape[0] for r in rows)
        x = torch.zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, width - r.shape[0] :] = r
            mask[i, width - r.shape[0] :] = 1
        return x, mask

    def gen(questions, n):
        t0 = time.perf_counter()
        with torch.inference_mode():
            x, mask = embeds_for(questions)
            out = lm.generate(
                inputs_embeds=x,
                attention_mask=mask,
                generation_config=GenerationConfig(do_sample=False, max_new_tokens=n, pad_token_id=pad),
            )
        return time.perf_counter() - t0, out

    try:
        gen(QUESTIONS[:1], 4)  # warm-up
        ttft, dec = [], []
        tokens = None
        for _ in range(reps):
            t1, _ = gen(QUESTIONS[:1], 1)
            tn, out = gen(QUESTIONS[:1], n_new)
            assert out.shape[1] == n_new, out.shape
            ttft.append(t1)
            dec.append((n_new - 1) / (tn - t1))
            tokens = out[0].tolist()
        conc = {}
        for n in batches:
            t, out = gen(QUESTIONS[:n], n_new)
            conc[str(n)] = out.numel() / t
        return {
            "engine": "transformers generate (fp32)",
            "ttft_s": median(ttft),
            "decode_tok_s": median(dec),
            "tokens": tokens,
            "concurrent_tok_s": conc,
            "one_by_one_tok_s": conc.get("1"),
            "rss_mb": rss_mb(),
        }
    finally:
        lm.generation_config.eos_token_id = saved_eos


def measure_pretrained_vlm(folder, n_new, reps):
    """A pretrained transformers VLM (the SmolVLM-shaped checkpoint): HFVLMBackend on the lean decoder
    against transformers' `generate` on the same checkpoint, batch 1, the same photo and question."""
    from visprompt.engine.backend import SamplingParams
    from visprompt.engine.backends.hf_vlm import HFVLMBackend

    backend = HFVLMBackend.from_pretrained(folder, max_batch=4)
    backend.eos_ids = []  # EOS ignored: both decode exactly n_new tokens
    model = backend.model
    model.generation_config.eos_token_id = None
    c = conv(QUESTIONS[0])

    def ours(n):
        backend.image_cache.clear()
        backend.prefix_cache.clear()
        t0 = time.perf_counter()
        h = backend.submit(c, SamplingParams(max_new_tokens=n))
        first = None
        for _ev in h.events():
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        return first - t0, (n - 1) / (end - first) if n > 1 else None, h.result().token_ids

    def theirs(n):
        t0 = time.perf_counter()
        inputs = backend.prepare_inputs([c])
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=n)
        return time.perf_counter() - t0, out[0, inputs["input_ids"].shape[1] :].tolist()

    ours(4), theirs(2)  # warm-up (the scheduler and the lean decoder are built here)
    rows = {"ours": {"ttft": [], "dec": []}, "hf": {"ttft": [], "dec": []}}
    tokens = ref = None
    for _ in range(reps):  # alternate the engines round by round
        t, d, tokens = ours(n_new)
        rows["ours"]["ttft"].append(t)
        rows["ours"]["dec"].append(d)
        t1, _ = theirs(1)
        tn, ref = theirs(n_new)
        rows["hf"]["ttft"].append(t1)
        rows["hf"]["dec"].append((n_new - 1) / (tn - t1))
    # a new question about the same photo: its features come from the image-feature cache
    h = backend.submit(conv(QUESTIONS[1]), SamplingParams(max_new_tokens=2))
    t0 = time.perf_counter()
    next(iter(h.events()))
    follow = time.perf_counter() - t0
    h.result()
    cfg = model.config
    return {
        "checkpoint": (
            f"{type(model).__name__}: SigLIP tower ({cfg.vision_config.num_hidden_layers} layers, "
            f"{cfg.vision_config.image_size} px, random) + SmolLM2-135M-Instruct (real weights)"
        ),
        "prompt_tokens": len(backend.prompts([c])[0].ids),
        "fast_path_reason": backend.fast_path_reason(),
        "ours": {"ttft_s": median(rows["ours"]["ttft"]), "decode_tok_s": median(rows["ours"]["dec"])},
        "transformers": {"ttft_s": median(rows["hf"]["ttft"]), "decode_tok_s": median(rows["hf"]["dec"])},
        "followup_new_question_ttft_s": follow,
        "greedy_identical": tokens == ref,
    }


def gate_prompts(model, backend):

    convs = [
        conv(q, ROOT / "examples" / p) for p in GATE_PHOTOS for q in GATE_QUESTIONS if (ROOT / "examples" / p).is_file()
    ]
    reqs = backend.encode_requests(convs)
    with torch.inference_mode():
        return [model.embed(torch.tensor([p]), e)[0] for p, e, _ in reqs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--hf-batches", default="1,4", help="concurrency levels for transformers generate (16 takes long)")
    ap.add_argument("--quant", default="q8_0,q4_1,f32", help="GGUF types for the llama.cpp path ('' to skip)")
    ap.add_argument("--gate-tokens", type=int, default=64)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "generate.json"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "runtime.md"))
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument(
        "--vlm-folder",
        default="/tmp/visprompt-bench/smolvlm-shaped",
        help="the SmolVLM-shaped checkpoint (written there by bench/smolvlm_shaped.py when missing)",
    )
    ap.add_argument("--no-vlm", action="store_true", help="skip the pretrained-VLM row")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from visprompt.engine.backends.own import OwnVLMBackend
    from visprompt.models.config import VLMConfig
    from visprompt.models.gguf import packaged_smollm2_path
    from visprompt.models.vision_language_model import VisionLanguageModel
    from visprompt.runtime.decoder import EmbeddingDecoder
    from visprompt.runtime.fast_decode import FastLM
    from visprompt.runtime.quantized import LlamaCppLM, agreement, cached_gguf, greedy_tokens, llama_cpp_available
    from visprompt.runtime.scheduler import Scheduler

    batches = [int(b) for b in args.batches.split(",") if b]
    hf_batches = [int(b) for b in args.hf_batches.split(",") if b]
    n_new = args.new_tokens
    t = time.perf_counter()
    model = VisionLanguageModel.build(VLMConfig(vision_source="efficientnet-lite0", lm_source="smollm2-135m")).eval()
    load_s = time.perf_counter() - t
    backend = OwnVLMBackend(model, max_batch=max(batches))
    backend.stop_ids = []  # EOS ignored: every engine decodes exactly n_new tokens
    lm_params = sum(p.numel() for p in model.lm.parameters())
    bw = matvec_bandwidth()
    report = {
        "command": "flock /tmp/visprompt-cpu.lock python bench/generate.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": cpu_name(),
            "threads": args.threads,
            "torch": torch.__version__,
            "matvec_gb_s": bw,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        },
        "workload": {
            "lm": "SmolLM2-135M-Instruct (packaged GGUF, dequantized to fp32)",
            "vision": "EfficientNet-Lite0",
            "image_tokens": model.cfg.tokens_per_image,
            "photo": PHOTO.name,
            "new_tokens": n_new,
            "prompt_tokens": len(backend.encode_requests([conv(QUESTIONS[0])])[0][0]),
            "lm_params": lm_params,
            "model_load_s": load_s,
        },
        "engines": [],
    }
    fp32_bytes = lm_params * 4
    roofline_fp32 = bw * 1e9 / fp32_bytes

    def clear():
        backend.image_cache.clear()
        backend.prefix_cache.clear()

    hf = None
    if not args.no_hf:
        print("transformers generate ...", flush=True)
        hf = measure_transformers(model, backend, n_new, args.reps, hf_batches)
        hf["roofline_tok_s"] = roofline_fp32
        report["engines"].append(hf)

    print("visprompt fp32 (FastLM + scheduler + caches) ...", flush=True)
    sched = backend.scheduler
    report["machine"]["kernel_plan"] = getattr(sched.decoder.inner, "kernel_plan", "C++ layer kernel for every step")
    ours = measure_scheduler(
        "visprompt fp32 (lean decoder, continuous batching, caches)",
        sched,
        backend,
        n_new,
        args.reps,
        batches,
        clear,
        ref_tokens=hf["tokens"] if hf else None,
    )
    ours["roofline_tok_s"] = roofline_fp32
    report["engines"].append(ours)

    # caches off, for an honest view of what the caches buy under concurrency
    saved = backend.prefix_cache.lru.max_bytes, backend.image_cache.max_bytes
    backend.prefix_cache.lru.max_bytes = backend.image_cache.max_bytes = 0
    clear()
    nocache_rate, _ = run_concurrent(sched, backend.encode_requests, max(batches), n_new)
    ours["concurrent_tok_s_no_caches"] = {str(max(batches)): nocache_rate}
    backend.prefix_cache.lru.max_bytes, backend.image_cache.max_bytes = saved

    # The fixed prompt set (4 photos x 2 questions): fp32 greedy tokens of the lean decoder, checked
    # against transformers generate, are the reference for the quantized rows.
    prompts = gate_prompts(model, backend)
    ref = FastLM(model.lm, max_batch=1)
    ref_tokens = [greedy_tokens(ref, p, args.gate_tokens) for p in prompts]
    if hf is not None:
        same = 0
        lm = model.lm
        saved_eos = lm.generation_config.eos_token_id
        lm.generation_config.eos_token_id = None
        try:
            from transformers import GenerationConfig

            for p, want in zip(prompts, ref_tokens):
                with torch.inference_mode():
                    out = lm.generate(
                        inputs_embeds=p[None],
                        attention_mask=torch.ones(1, p.shape[0], dtype=torch.long),
                        generation_config=GenerationConfig(
                            do_sample=False, max_new_tokens=args.gate_tokens, pad_token_id=0
                        ),
                    )
                same += int(out[0].tolist() == want)
        finally:
            lm.generation_config.eos_token_id = saved_eos
        ours["prompt_set_identical_to_transformers"] = f"{same}/{len(prompts)}"

    quants = [q for q in args.quant.split(",") if q]
    if quants and llama_cpp_available():
        targets = [
            (f"llama.cpp {q.upper()} (visprompt GGUF export) + scheduler", cached_gguf(model.lm, q), q, False)
            for q in quants
        ]
        if "q4_1" in quants:
            targets.append(
                ("llama.cpp Q4_1 + flash attention (f16) + scheduler", cached_gguf(model.lm, "q4_1"), "q4_1", True)
            )
        del ref
        folder, name = packaged_smollm2_path()
        targets.append(("llama.cpp packaged Q4_1 GGUF (peer) + scheduler", Path(folder) / name, "q4_1-packaged", False))
        for label, path, _q, fa in targets:
            print(label, "...", flush=True)
            dec = LlamaCppLM(path, max_batch=max(batches), ctx_per_seq=512, n_threads=args.threads, flash_attn=fa)
            qs = Scheduler(
                EmbeddingDecoder(dec, backend._embed_prompt),
                model.tokenizer,
                [],
                image_token_id=model.cfg.image_token_id,
                prefix_cache=None,
            )
            res = measure_scheduler(label, qs, backend, n_new, args.reps, batches, clear, follow_up=True)
            ag = agreement(None, dec, prompts, n_tokens=args.gate_tokens, reference_tokens=ref_tokens)
            res.update(
                agreement_teacher_forced=ag.teacher_forced,
                agreement_identical=ag.identical,
                first_divergence=ag.first_divergence,
                gguf_mb=path.stat().st_size / 2**20,
            )
            res["roofline_tok_s"] = bw * 1e9 / path.stat().st_size
            if ours.get("tokens"):
                res["greedy_identical_to_fp32"] = res["tokens"] == ours["tokens"]
            report["engines"].append(res)
            dec.close()
    elif quants:
        report["llama_cpp"] = "not installed (pip install llama-cpp-python): quantized rows skipped"

    if not args.no_vlm:
        from smolvlm_shaped import write_smolvlm_shaped

        print("pretrained VLM (SmolVLM-shaped): visprompt vs transformers generate ...", flush=True)
        del sched
        backend.close()
        report["pretrained_vlm"] = measure_pretrained_vlm(write_smolvlm_shaped(args.vlm_folder), n_new, args.reps)

    report["peak_rss_mb"] = peak_rss_mb()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = markdown(report, hf)
    write_md(Path(args.md), md)
    print(md)
    return 0


def fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def markdown(report, hf) -> str:
    base = hf["decode_tok_s"] if hf else None
    lines = [
        f"Command: `{report['command'].strip()}`",
        "",
        f"Machine: {report['machine']['cpu']}; kernels chosen: {report['machine']['kernel_plan']}; "
        f"{report['machine']['threads']} threads, torch {report['machine']['torch']}, fp32 mat-vec "
        f"{report['machine']['matvec_gb_s']:.1f} GB/s (best of one F.linear, per-thread column blocks and visprompt's kernel on 16-column panels; 8192² fp32, measured in the run). Workload: {report['workload']['prompt_tokens']}-token prompt "
        f"({report['workload']['image_tokens']} image tokens), {report['workload']['new_tokens']} new tokens, greedy, EOS ignored.",
        "",
        "| engine | first token (s) | decode tok/s (batch 1) | × transformers | roofline % | total tok/s @1 / @4 / @16 | 16 vs one-by-one | follow-up first token (s): new question / next turn | greedy agreement with fp32 | RSS after (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["engines"]:
        conc = e.get("concurrent_tok_s", {})
        rates = " / ".join(fmt(conc.get(k), ".1f") for k in ("1", "4", "16"))
        one = e.get("one_by_one_tok_s")
        speedup16 = fmt(conc["16"] / one, ".1f") + "×" if one and "16" in conc else "–"
        fu = "–"
        if "followup_new_question_ttft_s" in e:
            fu = f"{fmt(e['followup_new_question_ttft_s'], '.3f')} / {fmt(e['followup_turn_ttft_s'], '.3f')}"
            if e.get("ttft_s"):
                fu += f" ({100 * e['followup_new_question_ttft_s'] / e['ttft_s']:.0f}% / {100 * e['followup_turn_ttft_s'] / e['ttft_s']:.0f}%)"
        if "agreement_teacher_forced" in e:
            agree = f"{100 * e['agreement_teacher_forced']:.1f}% teacher-forced, {100 * e['agreement_identical']:.0f}% prompts identical"
        elif "greedy_identical_to_transformers" in e:
            agree = (
                "identical to transformers" if e["greedy_identical_to_transformers"] else "DIFFERS from transformers"
            )
            if "prompt_set_identical_to_transformers" in e:
                agree += f" (prompt set: {e['prompt_set_identical_to_transformers']} prompts identical)"
        else:
            agree = "(reference)"
        ratio = fmt(e["decode_tok_s"] / base, ".1f") + "×" if base else "–"
        roof = fmt(100 * e["decode_tok_s"] / e["roofline_tok_s"], ".0f") if e.get("roofline_tok_s") else "–"
        lines.append(
            f"| {e['engine']} | {fmt(e['ttft_s'], '.3f')} | {fmt(e['decode_tok_s'], '.1f')} | {ratio} | {roof} | {rates} | {speedup16} | {fu} | {agree} | {fmt(e.get('rss_mb'), '.0f')} |"
        )
    lines.append("")
    ours = next((e for e in report["engines"] if e["engine"].startswith("visprompt fp32")), None)
    if ours and "concurrent_tok_s_no_caches" in ours:
        for k, v in ours["concurrent_tok_s_no_caches"].items():
            lines.append(
                f"visprompt fp32 at {k} concurrent with both caches off: {v:.1f} tok/s (with them: {ours['concurrent_tok_s'].get(k, 0):.1f})."
            )
    lines.append(
        f"Peak RSS of the whole run: {report['peak_rss_mb']:.0f} MB. Roofline: weights bytes per token at the measured mat-vec bandwidth "
        "(fp32: 4 bytes × LM parameters; GGUF: file size)."
    )
    if "llama_cpp" in report:
        lines.append(f"llama.cpp: {report['llama_cpp']}.")
    vlm = report.get("pretrained_vlm")
    if vlm:
        ours, hf_row = vlm["ours"], vlm["transformers"]
        lines += [
            "",
            f"Pretrained VLM, batch 1: {vlm['checkpoint']}; {vlm['prompt_tokens']}-token prompt, "
            f"{report['workload']['new_tokens']} new tokens, greedy, EOS ignored; first token includes the processor and the vision tower.",
            "",
            "| engine | first token (s) | decode tok/s | × transformers | follow-up first token (s) | greedy |",
            "|---|---|---|---|---|---|",
            f"| transformers generate (fp32) | {fmt(hf_row['ttft_s'], '.3f')} | {fmt(hf_row['decode_tok_s'], '.1f')} | 1.0× | – | (reference) |",
            f"| visprompt HFVLMBackend (lean decoder) | {fmt(ours['ttft_s'], '.3f')} | {fmt(ours['decode_tok_s'], '.1f')} | "
            f"{fmt(ours['decode_tok_s'] / hf_row['decode_tok_s'], '.1f')}× | {fmt(vlm['followup_new_question_ttft_s'], '.3f')} | "
            f"{'identical to transformers' if vlm['greedy_identical'] else 'DIFFERS from transformers'} |",
        ]
    return "\n".join(lines) + "\n"


def write_md(path: Path, table: str) -> None:
    text = path.read_text() if path.is_file() else "# Runtime\n\n"
    start, end = md_markers()
    block = f"{start}\n{table}{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        post = rest.split(end, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
