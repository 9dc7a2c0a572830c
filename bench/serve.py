"""Tokens per second through `visprompt serve`: 16 concurrent clients against one by one.

Starts `visprompt serve` (a separate process, as users run it) on a free loopback port, then sends
the same requests twice with the official `openai` client: one at a time, and `--concurrency` at
once. Each request is a question about a real photo (examples/coffee.jpg, as a data: URL), greedy,
`--max-tokens` new tokens; tokens are counted from the server's `usage`. Prints a markdown table
with the command that made it.

    flock /tmp/visprompt-cpu.lock python bench/serve.py                     # a tiny own model
    flock /tmp/visprompt-cpu.lock python bench/serve.py --model starter     # the starter model
    python bench/serve.py --requests 4 --concurrency 2 --max-tokens 4      # a quick check

`--model tiny` (the default) builds a small visprompt model with random weights from a size spec
(a 4-layer ViT, a 4-layer 256-wide Llama, prefix fusion) into a temporary folder: the server's own
cost per request and the batching are what it measures, not a model's. Greedy replies of random
weights run to `--max-tokens` (stop tokens are rare), so both rows generate the same token count.

The machine is shared and noisy: compare the two rows of one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

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
    "Is this a cafe?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_folder(folder: Path) -> str:
    """A small visprompt model with random weights, built from a size spec and saved in `folder`."""
    import torch

    from visprompt.models.config import VLMConfig
    from visprompt.models.vision_language_model import VisionLanguageModel

    torch.manual_seed(0)
    texts = QUESTIONS + ["a cup of coffee on a saucer", "a table in a cafe", "brown, white and black"]
    cfg = VLMConfig(image_size=64, vision_layers=4, lm_hidden_size=256, lm_layers=4, tokenizer_vocab_size=512)
    VisionLanguageModel.build(cfg, texts).eval().save_pretrained(folder)
    return str(folder)


def start_server(model: str, port: int, startup: float) -> subprocess.Popen:
    """`visprompt serve` in a child process; returns once /health answers."""
    cmd = [sys.executable, "-m", "visprompt.cli.main", "serve", "--model", model, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + startup
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().strip()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within {startup:.0f} s")


def run(client: openai.OpenAI, model: str, image: str, n: int, concurrency: int, max_tokens: int) -> dict:
    """Send n requests, `concurrency` at a time; return wall time and completion tokens."""

    def one(i: int) -> int:
        content = [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
        ]
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0
        )
        return reply.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": n, "tokens": tokens, "seconds": wall, "tok_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (built here), 'starter', or a model folder")
    parser.add_argument("--requests", type=int, default=32, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--startup", type=float, default=600, help="seconds to wait for the server")
    args = parser.parse_args()

    import tempfile

    from visprompt.runtime.cpu import cpu_summary

    tmp = tempfile.TemporaryDirectory(prefix="visprompt-bench-")
    served = tiny_model_folder(Path(tmp.name) / "tiny") if args.model == "tiny" else args.model
    port = free_port()
    proc = start_server(served, port, args.startup)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        image = "data:image/jpeg;base64," + base64.b64encode(PHOTO.read_bytes()).decode()
        run(client, model, image, 2, 1, args.max_tokens)  # warm up: caches, kernels, first-call costs
        rows = [
            run(client, model, image, args.requests, 1, args.max_tokens),
            run(client, model, image, args.requests, args.concurrency, args.max_tokens),
        ]
    finally:
        proc.terminate()
        proc.wait(60)
        tmp.cleanup()

    command = "python bench/serve.py " + " ".join(sys.argv[1:])
    print(
        f"`{command.strip()}` on {cpu_summary()}, {os.cpu_count()} CPUs; model {args.model}, {args.max_tokens} new tokens\n"
    )
    print("| clients at once | requests | completion tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} |")
    print(f"\n{args.concurrency} at once: {rows[1]['tok_s'] / rows[0]['tok_s']:.1f}x the tokens/s of one by one")


if __name__ == "__main__":
    main()
