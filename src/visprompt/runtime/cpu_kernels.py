"""The C++ layer kernel of the lean decoder (`csrc/llama_layer.cpp`), compiled on first use.

torch's own extension builder compiles it for this machine's CPU with the flags `compile_flags()`
picks from `cpu.cpu_info()`: `-O3 -fopenmp -march=native`, plus the vector extensions it found named
explicitly (`-mavx2 -mfma`, `-mavx512f ...`), so an AVX-512 machine builds the AVX-512 micro-kernel
and an AVX2 one the AVX2 micro-kernel (a CPU with neither gets plain loops). The build lands in
torch's extension cache (`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions) under a
name keyed by `build_key()`, a hash of the source, the compile flags, the CPU and the torch
version: an edited source, other flags or another torch build anew instead of loading a stale
library. The first build takes ~30 s, later processes load it at once.
It needs a C++ compiler and `ninja` (a dependency of this package). When either is missing, the
build fails, or `VISPROMPT_KERNELS=0` is set, `load()` returns None, `reason()` says why (with a
warning, except when turned off), and `FastLM` runs on torch ops alone (same tokens, slower at a
few rows: bench/kernel_rows.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

from .cpu import CpuInfo, cpu_info

SOURCE = Path(__file__).with_name("csrc") / "llama_layer.cpp"
NAME = "visprompt_llama_layer"
_lock = threading.Lock()
_module = None
_reason: str | None = None
_tried = False


def compile_flags(info: CpuInfo | None = None) -> list[str]:
    """The C++ flags the kernel is built with on `info` (this machine's CPU by default)."""
    info = info or cpu_info()
    # -fopenmp: ATen's parallel_for is a header template that is serial without it; the extension
    # then binds to the libgomp torch already loaded (same soname), one thread pool
    flags = ["-O3", "-fopenmp"]
    arch = (info.arch or platform.machine()).lower()
    if arch in ("x86_64", "amd64", "i686", "x86"):
        flags.append("-march=native")
        if info.has("avx2", "fma"):
            flags += ["-mavx2", "-mfma"]
        if info.has("avx512f"):
            flags.append("-mavx512f")
            flags += [f"-m{f}" for f in ("avx512bw", "avx512vl") if info.has(f)]
    elif arch in ("aarch64", "arm64"):
        flags.append("-mcpu=native")
    return flags


def build_key(
    source: str | bytes | None = None,
    flags: list[str] | None = None,
    torch_version: str | None = None,
    cpu: str | None = None,
) -> str:
    """12 hex digits naming one build: a hash of the kernel source, the compile flags, the CPU (the
    code `-march=native` makes depends on it) and the torch version (its headers and ABI)."""
    if source is None:
        source = SOURCE.read_bytes()
    if isinstance(source, str):
        source = source.encode()
    if flags is None:
        flags = compile_flags()
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    if cpu is None:
        cpu = cpu_info().summary()
    h = hashlib.sha256(source)
    for part in (" ".join(flags), torch_version, cpu, os.environ.get("CXX", "c++")):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:12]


def compile_object(flags: list[str], out: str | Path) -> None:
    """Compile the kernel source to an object file `out` with `flags` (no link, no load): checks that
    code for another CPU (`-mavx512f` on an AVX2 machine) compiles. Raises CalledProcessError."""
    import subprocess
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    abi = int(torch.compiled_with_cxx11_abi())
    cmd = [os.environ.get("CXX", "c++"), "-std=c++17", "-fPIC", "-c", str(SOURCE), "-o", str(out), *flags]
    cmd += [f"-I{d}" for d in includes] + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DTORCH_EXTENSION_NAME={NAME}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _import_built(name: str, path: Path):
    """Import an extension module torch's builder made before (what cpp_extension.load does for a
    build that is up to date, without importing cpp_extension and running ninja to find that out:
    the folder's name already says which source, flags, CPU and torch it was built from)."""
    import importlib.machinery
    import importlib.util

    import torch  # noqa: F401 - the module links against torch's libraries, loaded first

    spec = importlib.util.spec_from_file_location(
        name, path, loader=importlib.machinery.ExtensionFileLoader(name, str(path))
    )
    if spec is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _build():
    if os.environ.get("VISPROMPT_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        return None, "turned off by VISPROMPT_KERNELS"
    flags = compile_flags()
    name = f"{NAME}_{build_key(flags=flags)}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    built = Path(root) / name / f"{name}.so"
    if built.is_file():
        try:
            return _import_built(name, built), None
        except ImportError:
            pass  # a broken build: torch's builder makes it again below
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler!r} not found)"
    try:
        import ninja  # noqa: F401
    except ImportError:
        return None, "the ninja package is not installed"
    # one folder per build key, under torch's extension cache (TORCH_EXTENSIONS_DIR when set)
    build_dir = Path(root) / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return None, f"cannot create the kernel's build folder {build_dir}: {exc}"
    # Compile a copy kept in the build folder: its path is the same for every installation with this
    # key (the ninja file records the source's path; two checkouts would otherwise rebuild each other's).
    source = build_dir / f"{name}.cpp"
    try:
        if not source.is_file() or source.read_bytes() != SOURCE.read_bytes():
            tmp = build_dir / f".{name}.{os.getpid()}.cpp"
            shutil.copyfile(SOURCE, tmp)
            os.replace(tmp, source)
    except OSError as exc:
        return None, f"cannot write the kernel's source into {build_dir}: {exc}"
    _remove_stale_lock(build_dir)
    if not any(build_dir.glob(f"{name}*.so")):
        print(
            f"visprompt: compiling the decoder's C++ kernel for this CPU ({' '.join(flags)}; once, ~30 s)",
            file=sys.stderr,
            flush=True,
        )
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # a compiler error must not stop generation: torch ops still work
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"could not build {SOURCE.name}: {first}"
    return module, None


STALE_LOCK_S = 900  # a build takes under two minutes; a lock this old was left by a killed build


def _remove_stale_lock(build_dir: Path) -> None:
    """torch's build lock (`lock`) outlives a build killed midway, and every later load would wait on
    it forever: remove one older than any build takes."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_S:
        warnings.warn(f"visprompt: removing a stale kernel build lock ({lock}, {age / 60:.0f} min old)", stacklevel=3)
        with contextlib.suppress(OSError):
            lock.unlink()


def load():
    """The compiled module (`layer_forward`, `head_forward`, `simd`, ...), or None (see `reason()`)."""
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


__all__ = ["load", "reason", "SOURCE", "build_key", "compile_flags", "compile_object"]
