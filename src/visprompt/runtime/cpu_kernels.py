"""The C++ layer kernel of the lean decoder (`csrc/llama_layer.cpp`), compiled on first use.

torch's own extension builder compiles it for this machine's CPU (`-O3 -march=native`: AVX2/FMA
where present, a plain loop elsewhere) into torch's extension cache (`TORCH_EXTENSIONS_DIR`, by
default ~/.cache/torch_extensions); the first build takes ~30 s, later processes load it at once.
It needs a C++ compiler and `ninja` (a dependency of this package). When either is missing, or
`VISPROMPT_KERNELS=0` is set, `load()` returns None, `reason()` says why, and `FastLM` runs on
torch ops alone (same tokens, ~2x slower at batch 1: bench/kernel_rows.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "llama_layer.cpp"
_lock = threading.Lock()
_module = None
_reason: str | None = None
_tried = False


def _build():
    from torch.utils import cpp_extension

    if os.environ.get("VISPROMPT_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        return None, "turned off by VISPROMPT_KERNELS"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler!r} not found)"
    try:
        import ninja  # noqa: F401
    except ImportError:
        return None, "the ninja package is not installed"
    name = "visprompt_llama_layer"
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(build_dir.glob(f"{name}*.so")):
            print(
                "visprompt: compiling the decoder's C++ kernel for this CPU (once, ~30 s)", file=sys.stderr, flush=True
            )
    except Exception:  # only the notice depends on it
        pass
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            # -fopenmp: ATen's parallel_for is a header template that is serial without it; the
            # extension then binds to the libgomp torch already loaded (same soname), one thread pool
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a compiler error must not stop generation: torch ops still work
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"could not build {SOURCE.name}: {first}"
    return module, None


def load():
    """The compiled module (`layer_forward`, `head_forward`), or None (see `reason()`)."""
    global _module, _reason, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            _module, _reason = _build()
            _tried = True
            if _module is None and "VISPROMPT_KERNELS" not in (_reason or ""):
                warnings.warn(
                    f"visprompt: decoding without the C++ layer kernel ({_reason}); same tokens, slower", stacklevel=2
                )
    return _module


def reason() -> str | None:
    """Why the kernel is not in use (None when it is, or before `load()` was called)."""
    return _reason


__all__ = ["load", "reason", "SOURCE"]
