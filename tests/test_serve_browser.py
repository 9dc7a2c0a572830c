"""The web page in a real browser: Debian's chromium driven by Playwright (its own browser download is
not reachable, so the system browser is launched). Keyboard only: choose an image, drop and paste
two more, ask, watch the answer stream in, stop a second answer with Escape.

VISPROMPT_SCREENSHOT=docs/serve.png saves the page there (the README's picture);
VISPROMPT_PAGE_MODEL=starter serves the real starter model instead of a tiny random one, and
VISPROMPT_PAGE_IMAGE=examples/coffee.jpg is the file chosen first instead of a red square.
"""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest
import torch
from conftest import TEXTS, spread_weights, tiny_config
from serve_helpers import png_bytes

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

from visprompt.serve import ServeConfig, serve_in_thread  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/setup.sh installs it)")
        pytest.skip("chromium is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    ref = os.environ.get("VISPROMPT_PAGE_MODEL")
    if ref:
        from visprompt.engine.loading import load_backend

        backend, name = load_backend(ref), ref
    else:
        from visprompt.engine.backends.own import OwnVLMBackend
        from visprompt.models.vision_language_model import VisionLanguageModel

        torch.manual_seed(0)
        model = spread_weights(VisionLanguageModel.build(tiny_config(lm_max_position=2048), TEXTS)).eval()
        backend, name = OwnVLMBackend(model), "own-tiny"
        backend.stop_ids = []  # it never stops by itself: every answer is as long as asked
    running = serve_in_thread(backend, ServeConfig(model_name=name))
    yield running, name
    running.stop()


def add_file_by(page, how: str, name: str, data: bytes) -> None:
    """Drop or paste a PNG onto the page the way a browser delivers it (a DataTransfer of files)."""
    page.evaluate(
        """([how, name, bytes]) => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
            if (how === "drop") {
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
            } else {
                document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, bubbles: true }));
            }
        }""",
        [how, name, list(data)],
    )


def record_answer_lengths(page) -> None:
    """Remember every length the last answer's text takes while it streams."""
    page.evaluate(
        """() => {
            window.lengths = [];
            new MutationObserver((records) => {
                for (const record of records) {
                    for (const node of record.addedNodes) {
                        if (node.nodeType === Node.TEXT_NODE) window.lengths.push(node.textContent.length);
                    }
                }
            }).observe(document.getElementById("conversation"), { subtree: true, childList: true, characterData: true });
        }"""
    )


def test_ask_stream_and_stop_with_the_keyboard(browser, server, tmp_path):
    server, name = server
    page = browser.new_page(viewport={"width": 900, "height": 820})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model")).to_contain_text(name)

    # Enter on the drop zone opens the file dialog (the input's click); the file is then chosen
    page.evaluate("document.getElementById('images').addEventListener('click', () => { window.chooserOpened = true; })")
    page.focus("#drop")
    page.keyboard.press("Enter")
    assert page.evaluate("window.chooserOpened") is True
    photo = os.environ.get("VISPROMPT_PAGE_IMAGE")
    chosen = photo or {"name": "red.png", "mimeType": "image/png", "buffer": png_bytes("red", (64, 48))}
    page.set_input_files("#images", [chosen])
    add_file_by(page, "drop", "blue.png", png_bytes("blue", (48, 64)))
    add_file_by(page, "paste", "green.png", png_bytes("green"))
    sync_api.expect(page.locator("#thumbs li")).to_have_count(3)
    page.locator("#thumbs li button").nth(2).click()  # a chosen image can be taken back
    sync_api.expect(page.locator("#thumbs li")).to_have_count(2)

    page.focus("#settings")  # the settings open from the keyboard too
    page.keyboard.press("Enter")
    page.fill("#max-tokens", "48")
    record_answer_lengths(page)
    page.focus("#question")
    page.keyboard.type("Describe the image.")
    page.keyboard.press("Enter")
    answer = page.locator(".message.assistant .text").first
    sync_api.expect(page.locator("#send")).to_be_enabled(timeout=60_000)  # the answer has finished
    assert answer.text_content(), "no answer"
    lengths = page.evaluate("window.lengths")
    assert len(set(lengths) - {0}) >= 2, f"the answer arrived in one piece: {lengths}"
    sync_api.expect(page.locator("#speed")).to_contain_text("tokens")
    sync_api.expect(page.locator(".message.user img")).to_have_count(2)

    page.fill("#max-tokens", "1000")  # a long second answer, stopped once it has begun
    page.focus("#question")
    page.keyboard.type("And in detail?")
    page.keyboard.press("Enter")
    second = page.locator(".message.assistant .text").nth(1)
    sync_api.expect(second).not_to_be_empty(timeout=60_000)
    page.keyboard.press("Escape")
    sync_api.expect(page.locator(".message.assistant").nth(1)).to_have_class("message assistant stopped")
    sync_api.expect(page.locator("#status")).to_have_text("Stopped")
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["sequences"] == 0  # the server let it go
    assert 'visprompt_requests_total{status="499"} 1' in httpx.get(server.url + "/metrics").text  # as cancelled

    page.focus("#settings")
    page.keyboard.press("Enter")  # settings closed again for the picture
    page.screenshot(path=os.environ.get("VISPROMPT_SCREENSHOT") or str(tmp_path / "serve.png"))
    assert errors == []
    page.close()


@pytest.fixture(scope="module")
def task_server():
    """The tiny random model with its stop tokens (a lesson's JSON ends where the grammar closes)."""
    from visprompt.engine.backends.own import OwnVLMBackend
    from visprompt.eval.heatmap import explanation_json
    from visprompt.models.vision_language_model import VisionLanguageModel

    torch.manual_seed(0)
    model = spread_weights(VisionLanguageModel.build(tiny_config(lm_max_position=2048), TEXTS)).eval()
    running = serve_in_thread(
        OwnVLMBackend(model), ServeConfig(model_name="own-tiny", max_tokens_limit=600), explainer=explanation_json
    )
    yield running
    running.stop()


def test_describe_and_lesson_tabs_answer_with_the_keyboard(browser, task_server, tmp_path):
    pytest.importorskip("llguidance")
    from visprompt.tasks.lesson import LEVELS
    from visprompt.tasks.tone import TONES

    page = browser.new_page(viewport={"width": 900, "height": 820})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(task_server.url + "/")
    sync_api.expect(page.locator("#model")).to_contain_text("own-tiny")
    tabs = page.locator("[role=tab]")
    assert tabs.all_text_contents() == ["Ask", "Describe", "Story", "Lesson", "Video", "Explain"]
    tones = page.locator("#describe-tone option").evaluate_all("options => options.map(o => o.value)")
    assert tones == ["", *TONES]  # the page offers every tone the server takes
    levels = page.locator("#lesson-level option").evaluate_all("options => options.map(o => o.value)")
    assert levels == list(LEVELS)

    page.focus("#tab-ask")  # the arrow keys move between tabs
    page.keyboard.press("ArrowRight")
    sync_api.expect(page.locator("#tab-describe")).to_be_focused()
    sync_api.expect(page.locator("#panel-describe")).to_be_visible()
    sync_api.expect(page.locator("#panel-ask")).to_be_hidden()
    page.set_input_files("#describe-image", [{"name": "red.png", "mimeType": "image/png", "buffer": png_bytes("red")}])
    page.select_option("#describe-tone", "joyful")
    page.focus("#describe-send")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#describe-status")).to_contain_text("Done", timeout=60_000)
    assert page.locator("#describe-out .text").text_content().strip()
    sync_api.expect(page.locator("#describe-out img")).to_have_count(1)

    page.click("#tab-lesson")
    sync_api.expect(page.locator("#panel-lesson")).to_be_visible()
    page.set_input_files("#lesson-image", [{"name": "blue.png", "mimeType": "image/png", "buffer": png_bytes("blue")}])
    page.fill("#lesson-questions", "2")
    page.select_option("#lesson-level", "child")
    page.click("#lesson-send")
    sync_api.expect(page.locator("#lesson-status")).to_contain_text("Done", timeout=120_000)
    sync_api.expect(page.locator("#lesson-out h2")).to_have_text("Lesson (child level)")
    sync_api.expect(page.locator("#lesson-out .quiz > li")).to_have_count(2)
    sync_api.expect(page.locator("#lesson-out .quiz > li").first.locator("ol li")).to_have_count(4)

    page.click("#tab-story")  # a story's second turn goes on from the state the first gave back
    page.set_input_files("#story-images", [{"name": "g.png", "mimeType": "image/png", "buffer": png_bytes("green")}])
    page.click("#story-send")
    sync_api.expect(page.locator("#story-out .turn")).to_have_count(1, timeout=60_000)
    page.fill("#story-direction", "end it")
    page.click("#story-send")
    sync_api.expect(page.locator("#story-out .turn")).to_have_count(2, timeout=60_000)
    sync_api.expect(page.locator("#story-out .muted")).to_have_text("The end.")

    page.click("#tab-explain")  # the heatmap of an answer, on request
    page.set_input_files("#explain-image", [{"name": "r.png", "mimeType": "image/png", "buffer": png_bytes("red")}])
    page.fill("#explain-prompt", "What color is it?")
    page.click("#explain-send")
    sync_api.expect(page.locator("#explain-status")).to_contain_text("Done", timeout=60_000)
    sync_api.expect(page.locator("#explain-out img.plot")).to_have_count(2)
    assert page.locator("#explain-out img.plot").first.evaluate("img => img.complete && img.naturalWidth > 100")

    page.click("#tab-lesson")
    page.screenshot(path=str(tmp_path / "tasks.png"))
    assert errors == []
    page.close()
