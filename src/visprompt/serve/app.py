"""The FastAPI app: OpenAI's chat completion API over one backend, a web page, health and metrics.

    POST /v1/chat/completions   chat with images, whole or streamed (chat.py)
    POST /v1/tasks/describe     an image described, in a tone (task_api.py)
    POST /v1/tasks/story        a story's next paragraphs from pictures; the state goes back and forth
    POST /v1/tasks/lesson       an explanation and a quiz about an image, as schema-valid JSON
    POST /v1/tasks/video        a video upload (multipart/form-data, in memory) summarised by scenes
    POST /v1/tasks/explain      where the model looked: attention heatmaps of an answer (PNG data: URLs)
    GET  /v1/models             the served model
    GET  /health                answers while the model generates (the event loop never blocks)
    GET  /metrics               Prometheus text (metrics.py)
    GET  /                      the web page (static/, shipped in the package; nothing from elsewhere)

`/v1/*` needs the API key when one is set (compared in constant time). Every error is OpenAI's JSON
shape; no traceback reaches a client.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Callable
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.backend import Backend
from .chat import ChatCompletions
from .config import ServeConfig
from .errors import APIError
from .media import MediaFetcher
from .metrics import Metrics
from .served_model import ServedModel
from .task_api import Tasks

STATIC = Path(__file__).parent / "static"
TASKS = ("describe", "story", "lesson", "video", "explain")  # POST /v1/tasks/NAME -> Tasks.NAME
PAGE_HEADERS = {
    # the page loads nothing from anywhere else, and nothing may frame it
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(
    backend: Backend,
    config: ServeConfig | None = None,
    fetcher: MediaFetcher | None = None,
    explainer: Callable[..., dict] | None = None,
) -> FastAPI:
    """The server's ASGI app over `backend`.

    Args:
        backend: the model to serve; its scheduler thread starts with the app and stops with it.
        config: limits and access (default: `ServeConfig()`).
        fetcher: reads image URLs (default: one built from the config; tests pass a resolver stub).
        explainer: `(backend, image, prompt, token, method, max_new_tokens) -> dict` behind
            /v1/tasks/explain (`visprompt.eval.heatmap.explanation_json`); None: that endpoint is a 404.

    Returns:
        The FastAPI app (run it with uvicorn; `server.py`).
    """
    config = config or ServeConfig()
    fetcher = fetcher or MediaFetcher(
        config.allowed_media_domains,
        config.allowed_local_media_path,
        max_bytes=config.max_image_bytes,
        timeout=config.fetch_timeout,
        max_redirects=config.max_redirects,
    )
    model = ServedModel(backend, config.model_name or backend.name, config.max_queued, config.retry_after)
    metrics = Metrics(model.cache_stats)
    chat = ChatCompletions(model, metrics, config, fetcher)
    tasks = Tasks(model, metrics, config, fetcher, explainer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await anyio.to_thread.run_sync(model.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(model.close)

    app = FastAPI(title="visprompt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.model, app.state.metrics, app.state.config = model, metrics, config

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return await api_error(request, APIError(exc.status_code, str(exc.detail), code="http_error"))

    def authorize(request: Request) -> None:
        if not config.api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise APIError(
                401,
                "a valid API key is required: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        return await chat(request)

    def task_route(handler: Callable) -> Callable:
        async def route(request: Request) -> Response:
            authorize(request)
            return await handler(request)

        return route

    for name in TASKS:
        app.add_api_route(f"/v1/tasks/{name}", task_route(getattr(tasks, name)), methods=["POST"])

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        card = {"id": model.name, "object": "model", "created": 0, "owned_by": "visprompt"}
        if model.context_length is not None:
            card["max_model_len"] = model.context_length
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model.name, "sequences": model.capacity.used}

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
