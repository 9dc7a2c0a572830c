"""What CPU this process runs on: vendor, model name and the SIMD extensions the runtime's kernels use.

Read from /proc/cpuinfo (Linux); elsewhere, or when it cannot be read, from torch's own dispatch
level (`torch.backends.cpu.get_cpu_capability()`: "AVX512" implies avx2, fma and avx512f) and
`platform`. `cpu_summary()` is the one-line form bench tables and cache keys use, e.g.
"AMD EPYC 7B13 (avx2)" or "Intel(R) Xeon(R) Platinum 8480+ (avx512, avx512_bf16, amx)".
"""

from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass, field

# The extensions that decide which code runs (compile flags, micro-kernels, the kernel plan)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve")


@dataclass(frozen=True)
class CpuInfo:
    vendor: str  # "GenuineIntel", "AuthenticAMD", an ARM implementer, or "" when unknown
    model: str  # "AMD EPYC 7B13", ... ("" when unknown)
    flags: frozenset[str] = field(default_factory=frozenset)  # the subset of ISA_FLAGS present
    arch: str = ""  # platform.machine(): "x86_64", "aarch64", ...
    source: str = "/proc/cpuinfo"  # or "torch" when the flags come from torch's capability

    def has(self, *names: str) -> bool:
        return all(n in self.flags for n in names)

    @property
    def isa(self) -> str:
        """The short ISA label: "avx512, avx512_bf16, amx", "avx2", "neon", "baseline", ..."""
        parts = []
        if self.has("avx512f"):
            parts.append("avx512")
            if self.has("avx512_bf16"):
                parts.append("avx512_bf16")
        elif self.has("avx2"):
            parts.append("avx2" if self.has("fma") else "avx2 without fma")
        if self.has("amx_tile"):
            parts.append("amx_bf16" if self.has("amx_bf16") else "amx")
        if not parts and self.has("asimd"):
            parts.append("neon" + (", sve" if self.has("sve") else ""))
        return ", ".join(parts) or "baseline"

    def summary(self) -> str:
        return f"{self.model or self.arch or 'unknown CPU'} ({self.isa})"


def _clean_model(name: str) -> str:
    name = re.sub(r"\s+", " ", name.replace("(TM)", "").replace("(tm)", "")).strip()
    # "Intel Xeon Platinum 8480+ CPU @ 2.00GHz" -> without the clock; "AMD EPYC 7B13 64-Core Processor" -> "AMD EPYC 7B13"
    name = re.sub(r"\s*(CPU\s*)?@.*$", "", name)
    name = re.sub(r"\s+\d+-Core Processor$", "", name)
    return re.sub(r"\s+Processor$", "", name).strip()


def parse_cpuinfo(text: str, arch: str = "") -> CpuInfo | None:
    """The CPU described by a /proc/cpuinfo text (its first processor), or None if it names none."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    flag_text = fields.get("flags") or fields.get("features")  # "Features" on ARM
    if flag_text is None:
        return None
    present = set(flag_text.split())
    flags = {f for f in ISA_FLAGS if f in present}
    if "avx512f" in flags and "fma" not in flags and "fma" in present:
        flags.add("fma")
    vendor = fields.get("vendor_id") or fields.get("cpu implementer", "")
    model = _clean_model(fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or "")
    return CpuInfo(vendor=vendor, model=model, flags=frozenset(flags), arch=arch or platform.machine())


def _from_torch() -> CpuInfo:
    flags: set[str] = set()
    try:
        import torch

        cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # an old torch: no capability query
        cap = ""
    if cap.startswith("AVX512"):
        flags |= {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}
    elif cap.startswith("AVX2"):
        flags |= {"avx2", "fma"}
    elif cap in ("SVE256", "SVE"):
        flags |= {"asimd", "sve"}
    elif cap == "DEFAULT" and platform.machine().lower() in ("aarch64", "arm64"):
        flags.add("asimd")
    return CpuInfo(
        vendor="",
        model=_clean_model(platform.processor()),
        flags=frozenset(flags),
        arch=platform.machine(),
        source="torch",
    )


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU (read once per process)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            info = parse_cpuinfo(f.read())
    except OSError:
        info = None
    if info is None or not info.flags:
        fallback = _from_torch()
        if info is not None and info.model:  # a model name but no usable flags (an unusual kernel)
            fallback = CpuInfo(info.vendor, info.model, fallback.flags, fallback.arch, "torch")
        info = fallback
    return info


def cpu_summary() -> str:
    """One line naming this CPU and the extensions that matter here, e.g. "AMD EPYC 7B13 (avx2)"."""
    return cpu_info().summary()


__all__ = ["CpuInfo", "ISA_FLAGS", "cpu_info", "cpu_summary", "parse_cpuinfo"]
