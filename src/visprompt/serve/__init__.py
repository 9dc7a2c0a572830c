"""`visprompt serve`: an OpenAI-compatible HTTP server and a web page over any backend.

    from visprompt.engine.loading import load_backend
    from visprompt.serve import ServeConfig, serve
    serve(load_backend("starter"), ServeConfig(port=8000))

Modules: `config` (settings and limits; imports nothing of the web stack, so the CLI reads its
defaults cheaply), `app` (routes), `chat` (one chat completion request, start to end), `protocol`
(request checks), `content` (images read and decoded), `media` (URL fetching with its address
checks), `body` (bodies read to a cap), `served_model` (the backend and its capacity), `completion`
(choices in flight), `task_api` (the task endpoints), `upload` (multipart uploads read to a cap, in
memory), `responses` (OpenAI's JSON shapes), `streaming` (server-sent events that notice
a disconnect), `trace` (a request's log line), `metrics` (Prometheus text), `errors` (OpenAI's error
shape), `server` (uvicorn), `static/` (the page). The web stack comes with the `serve` extra.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "ServeConfig": "config",
    "create_app": "app",
    "MediaError": "media",
    "MediaFetcher": "media",
    "RunningServer": "server",
    "serve": "server",
    "serve_in_thread": "server",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """Load the module behind an export on first use (FastAPI only when the server is wanted)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
