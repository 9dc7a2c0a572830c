"""`visprompt serve` against the official `openai` client on loopback: every backend kind answers like
the backend itself; hostile input is a 4xx and the server goes on serving; the server stays within
its limits under load, frees the slot of a client that left, and drains on SIGTERM.

No test sends a packet anywhere but loopback: names that must look public or private come from a
resolver stub, and `LoopbackOnly` fails any other connection the moment it is tried.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from conftest import TEXTS, spread_weights, tiny_config
from PIL import Image
from serve_helpers import (
    CountingHTTPServer,
    GatedBackend,
    LoopbackOnly,
    data_url,
    header_bomb,
    image_part,
    png_bytes,
)
from test_backend_contract import hf_backend, own_backend, starter_backend

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from visprompt.engine.backend import SamplingParams  # noqa: E402
from visprompt.serve import MediaError, MediaFetcher, ServeConfig, serve_in_thread  # noqa: E402
from visprompt.serve.media import public_address  # noqa: E402
from visprompt.serve.server import RunningServer  # noqa: E402

N = 12  # completion tokens per answer
PUBLIC = "93.184.216.34"  # stands for a public host; LoopbackOnly routes it to a loopback server
STUB = {"images.test": PUBLIC, "internal.test": "10.0.0.1", "metadata.test": "169.254.169.254"}
ALLOWED = ("127.0.0.1", "localhost", "::1", "2130706433", *STUB)


def numeric_resolver(host: str, port: int) -> list[str]:
    """Address literals (all their forms) and localhost, never a DNS query."""
    if host == "localhost":
        return ["127.0.0.1", "::1"]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    return [info[4][0] for info in infos]


def stub_resolver(host: str, port: int) -> list[str]:
    return [STUB[host]] if host in STUB else numeric_resolver(host, port)


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


@dataclass
class Live:
    """A backend behind a running server, and an openai client for it."""

    backend: object
    server: RunningServer
    model: str
    media_dir: Path

    def __post_init__(self):
        self.client = client(self.server.url)
        self.url = self.server.url


def start(backend, config: ServeConfig, media_dir: Path) -> Live:
    fetcher = MediaFetcher(ALLOWED, media_dir, max_bytes=config.max_image_bytes, resolver=stub_resolver)
    return Live(backend, serve_in_thread(backend, config, fetcher), config.model_name, media_dir)


def ask(live: Live, messages: list, **kw):
    kw.setdefault("max_tokens", N)
    kw.setdefault("temperature", 0)
    return live.client.chat.completions.create(model=live.model, messages=messages, **kw)


# ------------------------------------------------------------------------------------------- servers


def own_server_config(tmp_path) -> ServeConfig:
    return ServeConfig(
        model_name="own-tiny",
        allowed_media_domains=ALLOWED,
        allowed_local_media_path=tmp_path,
        max_images=3,
        max_body_bytes=1 << 20,
        max_image_bytes=256 << 10,
        max_image_pixels=250_000,
        max_tokens_limit=400,
        max_queued=200,
        fetch_timeout=5,
    )


BACKENDS = {
    "own": None,  # the `own` fixture's server
    "hf-llava": lambda tmp: hf_backend("llava", tmp),
    "starter-tiny": lambda tmp: starter_backend(),
}


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The own tiny model's server (small limits; loopback names and stub names allowed)."""
    folder = tmp_path_factory.mktemp("media")
    live = start(own_backend(), own_server_config(folder), folder)
    yield live
    live.server.stop()


@pytest.fixture(scope="module", params=list(BACKENDS))
def served(request, tmp_path_factory):
    """Each backend kind behind a live server on loopback."""
    if BACKENDS[request.param] is None:
        yield request.getfixturevalue("own")
        return
    folder = tmp_path_factory.mktemp("media")
    live = start(BACKENDS[request.param](tmp_path_factory), ServeConfig(model_name=request.param), folder)
    yield live
    live.server.stop()


def image(color: str, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def as_backend(messages: list, images: dict) -> list:
    """The same conversation as the backend takes it (image URLs replaced by their PIL images)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append(m)
            continue
        parts = []
        for p in content:
            if p["type"] == "image_url":
                parts.append({"type": "image", "image": images[p["image_url"]["url"]]})
            else:
                parts.append(p)
        out.append({"role": m["role"], "content": parts})
    return out


def expected(backend, messages, images=None, **params):
    params.setdefault("max_new_tokens", N)
    [result] = backend.generate([as_backend(messages, images or {})], SamplingParams(**params))
    return result


# ------------------------------------------------------------------------- the client, every backend


def test_plain_text_question(served):
    live = served
    messages = [user(text("What is in this image? Describe it briefly."))]
    reply = ask(live, messages)
    want = expected(live.backend, messages)
    assert reply.choices[0].message.content == want.text
    assert reply.choices[0].finish_reason == want.finish_reason in ("stop", "length")
    assert reply.model == live.model and reply.object == "chat.completion"


def test_streamed_deltas_join_to_the_plain_answer(served):
    live = served
    url = data_url(png_bytes("blue"))
    messages = [user(image_part(url), text("Describe the image."))]
    plain = ask(live, messages)
    chunks = list(ask(live, messages, stream=True, stream_options={"include_usage": True}))
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(deltas) == plain.choices[0].message.content
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert reasons == [plain.choices[0].finish_reason]
    assert [ch for ch in chunks if ch.choices][-1].choices[0].finish_reason  # once, in the last choice chunk
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_base64_image(served):
    live = served
    url = data_url(png_bytes("red"))
    messages = [user(image_part(url), text("What color is the circle?"))]
    reply = ask(live, messages)
    assert reply.choices[0].message.content == expected(live.backend, messages, {url: image("red")}).text


def test_two_images(served):
    live = served
    a, b = data_url(png_bytes("red")), data_url(png_bytes("navy", (32, 48)))
    messages = [user(image_part(a), image_part(b), text("Which one is brighter?"))]
    reply = ask(live, messages)
    images = {a: image("red"), b: image("navy", (32, 48))}
    assert reply.choices[0].message.content == expected(live.backend, messages, images).text


def test_system_message(served):
    live = served
    url = data_url(png_bytes("yellow"))
    messages = [{"role": "system", "content": "Be brief."}, user(image_part(url), text("yes or no?"))]
    reply = ask(live, messages)
    assert reply.choices[0].message.content == expected(live.backend, messages, {url: image("yellow")}).text


def test_text_only_follow_up_about_an_earlier_image(served):
    live = served
    url = data_url(png_bytes("green"))
    first = [user(image_part(url), text("What is in this image?"))]
    answer = ask(live, first).choices[0].message.content
    messages = [*first, {"role": "assistant", "content": answer}, user(text("hello world, how are you today?"))]
    reply = ask(live, messages)
    assert reply.choices[0].message.content == expected(live.backend, messages, {url: image("green")}).text


def test_n_2_gives_two_choices(served):
    live = served
    messages = [user(text("a photo of a cat"))]
    plain = ask(live, messages)
    reply = ask(live, messages, n=2)
    assert [ch.index for ch in reply.choices] == [0, 1]
    assert all(ch.message.content == plain.choices[0].message.content for ch in reply.choices)  # greedy
    assert reply.usage.completion_tokens == 2 * plain.usage.completion_tokens
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens


def test_a_stop_string_cuts_the_answer(served):
    live = served
    messages = [user(text("The quick brown fox jumps over the lazy dog."))]
    free = ask(live, messages, max_tokens=24).choices[0].message.content
    stop = next((free[i : i + 2] for i in range(len(free) // 3, len(free) - 1) if not free[i : i + 2].isspace()), None)
    if not stop or not stop.strip():
        pytest.skip("the answer is too short to hold a stop string")
    reply = ask(live, messages, max_tokens=24, stop=[stop])
    assert reply.choices[0].message.content == free[: free.find(stop)].strip()
    assert reply.choices[0].finish_reason == "stop"


def test_usage_equals_the_tokenizer_counts(served):
    live = served
    url = data_url(png_bytes("purple"))
    messages = [user(image_part(url), text("Describe it briefly."))]
    reply = ask(live, messages, max_tokens=5)
    conversation = as_backend(messages, {url: image("purple")})
    [prompt] = live.backend.prompts([conversation])
    want = expected(live.backend, messages, {url: image("purple")}, max_new_tokens=5)
    assert reply.usage.prompt_tokens == len(prompt.ids) == want.prompt_tokens
    assert reply.usage.completion_tokens == want.completion_tokens
    stop_token = int(want.finish_reason == "stop" and want.completion_tokens > len(want.token_ids))
    assert reply.usage.completion_tokens == len(want.token_ids) + stop_token
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


# ------------------------------------------------------------------------------------ hostile input


def raw(live, body: bytes | None = None, payload=None, headers=None, timeout=30) -> httpx.Response:
    url = live.url + "/v1/chat/completions"
    if payload is not None:
        body = json.dumps(payload).encode()
    return httpx.post(
        url, content=body, headers={"Content-Type": "application/json", **(headers or {})}, timeout=timeout
    )


def with_image(live, url: str) -> dict:
    return {"model": live.model, "messages": [user(image_part(url), text("What is it?"))], "max_tokens": 4}


def hostile_cases(live, loopback_port: int) -> dict:
    png = png_bytes("red")
    lb = f"/img.png?p={loopback_port}"
    return {
        "corrupt image": with_image(live, data_url(png[:16] + bytes(range(256)) * 4)),
        "truncated image": with_image(live, data_url(png[: len(png) // 2])),
        "zero-byte image": with_image(live, "data:image/png;base64,"),
        "decompression bomb": with_image(live, data_url(header_bomb())),
        "pixels over the limit": with_image(live, data_url(header_bomb(1000, 1000))),
        "not an image media type": with_image(live, "data:text/plain;base64,aGVsbG8="),
        "bad base64": with_image(live, "data:image/png;base64,@@@@"),
        "bare-string image_url": {
            "model": live.model,
            "messages": [user({"type": "image_url", "image_url": data_url(png)}, text("hi"))],
        },
        "too many images": {"model": live.model, "messages": [user(*[image_part(data_url(png))] * 4, text("hi"))]},
        "loopback 127.0.0.1": with_image(live, f"http://127.0.0.1:{loopback_port}{lb}"),
        "loopback localhost": with_image(live, f"http://localhost:{loopback_port}{lb}"),
        "loopback [::1]": with_image(live, f"http://[::1]:{loopback_port}{lb}"),
        "loopback 2130706433": with_image(live, f"http://2130706433:{loopback_port}{lb}"),
        "loopback 127.1": with_image(live, f"http://127.1:{loopback_port}{lb}"),
        "a domain not allowed": with_image(live, "http://example.com/cat.png"),
        "file: URL outside the folder": with_image(live, "file:///etc/passwd"),
        "bare path": with_image(live, "/etc/hostname"),
        "ftp: URL": with_image(live, "ftp://images.test/cat.png"),
        "private address (stub)": with_image(live, "http://internal.test/cat.png"),
        "metadata address (stub)": with_image(live, "http://metadata.test/latest/meta-data/"),
        "role tool": {"model": live.model, "messages": [{"role": "tool", "content": "x"}]},
        "empty messages": {"model": live.model, "messages": []},
        "n too large": {"model": live.model, "messages": [user(text("hi"))], "n": 100},
        "max_tokens over the limit": {"model": live.model, "messages": [user(text("hi"))], "max_tokens": 10_000},
        "negative temperature": {"model": live.model, "messages": [user(text("hi"))], "temperature": -1},
        "tools": {"model": live.model, "messages": [user(text("hi"))], "tools": [{"type": "function"}]},
        "prompt over the context": {"model": live.model, "messages": [user(text("red blue " * 400))]},
        "prompt + max_tokens over the context": {
            "model": live.model,
            "messages": [user(text("red blue " * 60))],
            "max_tokens": 250,
        },
    }


def assert_still_serving(live) -> None:
    reply = ask(live, [user(text("hello"))], max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_hostile_requests_get_a_4xx_and_the_server_goes_on(own, monkeypatch):
    live = own
    guard = LoopbackOnly(monkeypatch)
    target = CountingHTTPServer()
    try:
        for name, payload in hostile_cases(live, target.port).items():
            response = raw(live, payload=payload)
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
            error = response.json()["error"]
            assert error["message"] and "Traceback" not in response.text, name
            assert set(error) == {"message", "type", "param", "code"}
            assert_still_serving(live)
        assert target.hits == [], "a loopback URL was fetched"
        assert guard.refused == [], "the server tried to connect to a private address"
    finally:
        target.close()


def test_malformed_bodies(own):
    live = own
    cases = {
        "bad JSON": b'{"messages": [',
        "not UTF-8": b"\xff\xfe\x00{",
        "empty body": b"",
        "a JSON list": b"[1, 2]",
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    }
    for name, body in cases.items():
        response = raw(live, body=body)
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert_still_serving(live)


def test_an_oversized_body_is_refused_while_it_is_read(own):
    live = own
    big = with_image(live, data_url(os.urandom(1 << 20)))
    body = json.dumps(big).encode()
    response = raw(live, body=body)  # with a Content-Length over the cap: refused before reading
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

    sent = []

    def chunked():  # no Content-Length: counted as it arrives
        for i in range(0, len(body), 64 << 10):
            sent.append(i)
            yield body[i : i + (64 << 10)]

    url = live.url + "/v1/chat/completions"
    try:
        response = httpx.post(url, content=chunked(), headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 413
    except httpx.HTTPError:
        pass  # the server may answer and close before the client finished sending
    assert_still_serving(live)


def test_image_urls_redirects_and_local_files(own, monkeypatch):
    """A stand-in public host (resolver stub + routed to a loopback server) is fetched; its redirects
    are followed and each hop is checked again: a redirect to loopback is refused, a redirect loop
    stops after 3; a file under --allowed-local-media-path is read, one outside it is not."""
    live = own
    target = CountingHTTPServer()
    LoopbackOnly(monkeypatch, routes={(PUBLIC, 80): ("127.0.0.1", target.port)})
    try:
        ok = raw(live, payload=with_image(live, "http://images.test/img.png"))
        assert ok.status_code == 200, ok.text
        hop = raw(live, payload=with_image(live, "http://images.test/to?url=http://images.test/img.png"))
        assert hop.status_code == 200, hop.text
        assert target.hits == ["/img.png", "/to?url=http://images.test/img.png", "/img.png"]
        for loopback in (f"http://127.0.0.1:{target.port}/img.png", f"http://2130706433:{target.port}/img.png"):
            response = raw(live, payload=with_image(live, f"http://images.test/to?url={loopback}"))
            assert response.status_code == 400 and response.json()["error"]["code"] == "address_not_allowed"
        assert target.hits[-1].startswith("/to?url=")  # the redirect was read, its target never asked
        loop = raw(live, payload=with_image(live, "http://images.test/loop"))
        assert loop.status_code == 400 and loop.json()["error"]["code"] == "too_many_redirects"
        assert target.hits.count("/loop") == 4  # the URL and 3 redirects
    finally:
        target.close()
    (live.media_dir / "cat.png").write_bytes(png_bytes("orange"))
    local = raw(live, payload=with_image(live, (live.media_dir / "cat.png").as_uri()))
    assert local.status_code == 200, local.text
    outside = raw(live, payload=with_image(live, (live.media_dir / ".." / ".." / "etc" / "passwd").as_uri()))
    assert outside.status_code == 400 and outside.json()["error"]["code"] == "file_not_allowed"


@pytest.mark.parametrize(
    "address", ["10.0.0.1", "169.254.169.254", "100.64.0.1", "127.0.0.1", "0.0.0.0", "224.0.0.1", "::1",
                "::ffff:127.0.0.1", "fd00:ec2::254", "fe80::1", "64:ff9b::a00:1", "192.168.1.1", "172.16.0.1"],
)  # fmt: skip
def test_the_fetcher_never_connects_to_a_private_address(address, monkeypatch):
    guard = LoopbackOnly(monkeypatch)
    fetcher = MediaFetcher(["cats.test"], resolver=lambda host, port: [address])
    with pytest.raises(MediaError) as err:
        fetcher.read("https://cats.test/cat.png")
    assert err.value.code == "address_not_allowed"
    assert guard.refused == []
    assert not public_address(address)


def test_a_name_with_one_private_address_among_public_ones_is_refused(monkeypatch):
    guard = LoopbackOnly(monkeypatch)
    fetcher = MediaFetcher(["cats.test"], resolver=lambda host, port: [PUBLIC, "10.1.2.3"])
    with pytest.raises(MediaError, match="not a public address"):
        fetcher.read("http://cats.test/cat.png")
    assert guard.refused == [] and public_address(PUBLIC)


def test_numeric_host_forms_resolve_to_loopback_and_are_refused(monkeypatch):
    guard = LoopbackOnly(monkeypatch)
    forms = ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "[::ffff:7f00:1]"]
    fetcher = MediaFetcher([f.strip("[]") for f in forms])
    for form in forms:
        with pytest.raises(MediaError) as err:
            fetcher.read(f"http://{form}:9/x.png")
        assert err.value.code == "address_not_allowed", form
    assert guard.refused == []


# ---------------------------------------------------------------------------------- access and limits


@pytest.fixture
def gated():
    backend = GatedBackend()
    server = serve_in_thread(backend, ServeConfig(model_name="gated", max_queued=0, api_key="s3cret"))
    yield backend, server
    backend.gate.set()
    server.stop()


def test_api_key_is_required_on_v1_only(gated):
    _, server = gated
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401
    wrong = client(server.url, api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = client(server.url, api_key="s3cret")
    assert [m.id for m in right.models.list().data] == ["gated"]


def test_a_full_queue_answers_429_with_retry_after_and_health_still_answers(gated):
    backend, server = gated
    headers = {"Authorization": "Bearer s3cret"}
    body = {"messages": [user(text("hi"))], "max_tokens": 2}
    holder = {}

    def hold():
        holder["response"] = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)

    t = threading.Thread(target=hold)
    t.start()
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["sequences"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    second = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # while a request is in flight
    backend.gate.set()
    t.join(10)
    assert holder["response"].status_code == 200
    assert holder["response"].json()["choices"][0]["message"]["content"] == "hello"


def test_a_client_that_leaves_cancels_its_request(gated):
    backend, server = gated
    headers = {"Authorization": "Bearer s3cret"}
    body = {"messages": [user(text("hi"))], "max_tokens": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=0.5)
    deadline = time.monotonic() + 10
    while backend.cancels < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.cancels == 1
    assert httpx.get(server.url + "/health").json()["sequences"] == 0


# ------------------------------------------------------------------------------------------------ load


def test_200_requests_at_16_concurrent_without_an_error(own):
    live = own
    messages = [user(image_part(data_url(png_bytes("teal"))), text("What is it?"))]

    def one(i):
        return ask(live, messages, max_tokens=4, temperature=0.7, seed=i)

    health = []
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(200)]
        while not all(f.done() for f in futures):
            health.append(httpx.get(live.url + "/health", timeout=10).status_code)
            time.sleep(0.05)
        replies = [f.result() for f in futures]  # raises on any error
    assert len(replies) == 200 and all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert health and set(health) == {200}  # /health answered while the batch generated
    metrics = httpx.get(live.url + "/metrics").text
    assert "visprompt_sequences_waiting 0" in metrics and "visprompt_sequences_running 0" in metrics
    assert live.backend.scheduler.batch_size == 0


def test_a_disconnect_mid_stream_frees_its_slot(own):
    live = own
    url = live.url
    before = _count(httpx.get(url + "/metrics").text, 'visprompt_requests_total{status="499"}')
    body = {"messages": [user(text("Describe the image."))], "max_tokens": 220, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the stream has begun: leave
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(url + "/metrics").text
        if (
            _count(metrics, 'visprompt_requests_total{status="499"}') > before
            and live.backend.scheduler.batch_size == 0
        ):
            break
        time.sleep(0.02)
    assert _count(metrics, 'visprompt_requests_total{status="499"}') == before + 1
    assert live.backend.scheduler.batch_size == 0 and httpx.get(url + "/health").json()["sequences"] == 0
    assert_still_serving(live)


def _count(metrics: str, name: str) -> int:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[-1]))
    return 0


def test_metrics_are_prometheus_text(own):
    live = own
    ask(live, [user(text("hello"))], max_tokens=2)
    response = httpx.get(live.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text_ = response.text
    for name in (
        "visprompt_requests_total",
        "visprompt_prompt_tokens_total",
        "visprompt_completion_tokens_total",
        "visprompt_sequences_waiting",
        "visprompt_time_to_first_token_seconds_bucket",
        'visprompt_cache_hits_total{cache="prefix"}',
    ):
        assert name in text_, name
    assert _count(text_, 'visprompt_requests_total{status="200"}') >= 1


def test_the_page_and_its_files_are_served_from_the_package(own):
    live = own
    url = live.url
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(url + asset).status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from another origin
    assert httpx.get(url + "/nothing-here").json()["error"]["type"] == "not_found_error"


# ---------------------------------------------------------------------------------- the command line


def test_serve_command_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from visprompt.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = [
            ["serve", "--port", str(busy.getsockname()[1])],  # refused before any model loads
            ["serve", "--port", "0", "--allowed-local-media-path", str(tmp_path / "missing")],
            ["serve", "--port", "0", "--model", str(tmp_path / "no-model")],
        ]
        for argv in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_other_commands_do_not_import_the_web_stack():
    code = "import sys, visprompt.cli.main; print(sorted(m for m in ('fastapi', 'uvicorn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_drains_the_stream_in_flight_and_exits(tmp_path):
    from visprompt.models.vision_language_model import VisionLanguageModel

    torch.manual_seed(0)
    model = spread_weights(VisionLanguageModel.build(tiny_config(lm_max_position=2048), TEXTS)).eval()
    model.save_pretrained(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VISPROMPT_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "visprompt.cli.main", "serve", "--model", str(tmp_path / "model"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"messages": [user(text("Describe the image."))], "max_tokens": 1000, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)
        assert len(events) > 5  # text kept coming after the signal
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][len("data: ") :])
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated" and "Traceback" not in err
    assert "status=200" in err  # the drained request's log line: ids, sizes and timings
