"""Kernels chosen per CPU: detection, compile flags, the build key, the calibrated and cached kernel
plan, its override, and FastLM giving the same output whichever plan runs."""

import os
import platform
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_runtime import tiny_llama as runtime_tiny_llama

from visprompt.runtime import cpu, cpu_kernels
from visprompt.runtime import kernel_plan as kp
from visprompt.runtime.cpu import CpuInfo, cpu_info, cpu_summary, parse_cpuinfo
from visprompt.runtime.fast_decode import FastLM

AMD_AVX2 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC 7B13 64-Core Processor
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep sse sse2 ht syscall nx mmxext lm pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor bmi1 avx2 smep bmi2 erms sha_ni

processor	: 1
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7B13 64-Core Processor
flags		: fpu avx2 fma avx512f
"""

INTEL_AMX = """processor	: 0
vendor_id	: GenuineIntel
cpu family	: 6
model		: 143
model name	: Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz
flags		: fpu vme de pse tsc msr pae sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f avx512dq rdseed adx avx512ifma clflushopt avx512cd sha_ni avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni amx_bf16 avx512_fp16 amx_tile amx_int8
"""


# -- detection ------------------------------------------------------------------------------------
def test_parses_an_avx2_only_amd():
    info = parse_cpuinfo(AMD_AVX2, arch="x86_64")
    assert info.vendor == "AuthenticAMD" and info.model == "AMD EPYC 7B13"
    assert info.flags == {"avx2", "fma"}  # the first processor only: the second block's avx512f is not read
    assert info.summary() == "AMD EPYC 7B13 (avx2)"
    flags = cpu_kernels.compile_flags(info)
    assert "-march=native" in flags and "-mavx2" in flags and not any("avx512" in f for f in flags)


def test_parses_an_avx512_amx_intel():
    info = parse_cpuinfo(INTEL_AMX, arch="x86_64")
    assert info.vendor == "GenuineIntel" and info.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"} <= info.flags
    assert info.summary() == "Intel(R) Xeon(R) Platinum 8480+ (avx512, avx512_bf16, amx_bf16)"
    assert "-mavx512f" in cpu_kernels.compile_flags(info)


def test_this_machine_is_described_and_the_fallback_agrees_with_torch(monkeypatch):
    info = cpu_info()
    assert cpu_summary() == info.summary() and info.isa in cpu_summary()
    cap = str(torch.backends.cpu.get_cpu_capability())

    def no_proc(*args, **kwargs):
        raise OSError("no /proc/cpuinfo")

    monkeypatch.setattr(cpu, "open", no_proc, raising=False)
    guessed = cpu.cpu_info.__wrapped__()  # uncached: torch's capability decides
    assert guessed.source == "torch"
    assert ("avx512f" in guessed.flags) == cap.startswith("AVX512")
    assert ("avx2" in guessed.flags) == cap.startswith(("AVX2", "AVX512"))
    if platform.machine() == "x86_64" and info.source == "/proc/cpuinfo":  # both sources see the same ISA
        assert ("avx2" in info.flags) == ("avx2" in guessed.flags)


def test_build_key_changes_with_source_flags_torch_and_cpu():
    base = dict(source="int x;", flags=["-O3", "-mavx2"], torch_version="2.13.0", cpu="AMD EPYC 7B13 (avx2)")
    key = cpu_kernels.build_key(**base)
    assert key == cpu_kernels.build_key(**base) and len(key) == 12
    for change in (
        {"source": "int y;"},
        {"flags": ["-O3", "-mavx2", "-mavx512f"]},
        {"torch_version": "2.12.1"},
        {"cpu": "Intel(R) Xeon(R) Platinum 8480+ (avx512, avx512_bf16, amx_bf16)"},
    ):
        assert cpu_kernels.build_key(**{**base, **change}) != key, change
    assert cpu_kernels.build_key().isalnum()  # this machine's: the real source, flags, torch


# -- the kernel plan ------------------------------------------------------------------------------
def test_choose_rows_takes_the_threshold_that_loses_least():
    assert kp.choose_rows([(1, 1.0, 2.0), (8, 2.0, 3.0), (64, 9.0, 6.0), (512, 40.0, 20.0)]) == 8
    assert kp.choose_rows([(1, 1.0, 2.0), (8, 2.0, 3.0), (64, 5.0, 6.0)]) == 64  # kernel everywhere
    assert kp.choose_rows([(1, 3.0, 2.0), (8, 4.0, 3.0)]) == 0  # never
    assert kp.choose_rows([(1, 1.0, 2.0), (2, 1.02, 1.0), (4, 1.0, 2.0), (8, 5.0, 2.0)]) == 4  # noise at 2 rows


def tiny_llama():
    return runtime_tiny_llama(max_position_embeddings=256)


@pytest.fixture
def plan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(kp.ENV, raising=False)
    monkeypatch.setattr(kp, "_memo", {})
    return tmp_path / "visprompt"


needs_kernel = pytest.mark.skipif(cpu_kernels.load() is None, reason="the C++ kernel does not build here")


@needs_kernel
def test_plan_is_calibrated_once_cached_and_overridden(plan_cache, monkeypatch):
    lm = tiny_llama()
    first = FastLM(lm, max_batch=2)
    assert first.plan.source == "calibrated"
    assert [m for m, _, _ in first.plan.layer_ms] == [m for m in kp.LAYER_GRID if m <= 256 - 64]
    assert all(k > 0 and o > 0 for _, k, o in first.plan.layer_ms + first.plan.head_ms)
    assert first.kernel_rows in [0] + [m for m, _, _ in first.plan.layer_ms]
    assert first.plan.simd in ("avx512", "avx2", "scalar") and first.plan.table()
    files = list(plan_cache.glob("kernel_plan-*.json"))
    assert len(files) == 1

    monkeypatch.setattr(kp, "_memo", {})  # a new process: read back from disk, not measured again
    monkeypatch.setattr(FastLM, "_calibrate", lambda *a: pytest.fail("calibrated again"))
    again = FastLM(lm, max_batch=2)
    assert again.plan.source == "cached"
    assert (again.kernel_rows, again.head_kernel_rows) == (first.kernel_rows, first.head_kernel_rows)
    assert again.plan.layer_ms == first.plan.layer_ms

    monkeypatch.setenv(kp.ENV, "0")  # the override wins over the cached plan
    never = FastLM(lm, max_batch=2)
    assert (never.kernel_rows, never.head_kernel_rows) == (0, 0)
    assert never.kernel_plan == f"{never.plan.other} only ({kp.ENV})"
    monkeypatch.setenv(kp.ENV, "16")
    some = FastLM(lm, max_batch=2)
    assert (some.kernel_rows, some.head_kernel_rows) == (16, 16)
    assert some.kernel_plan.startswith(f"kernel ≤16 rows, {some.plan.other} above")


def test_the_plan_key_covers_cpu_kernel_torch_threads_and_shapes():
    about = dict(cpu="AMD EPYC 7B13 (avx2)", kernel="abc", torch="2.13.0", threads=2, shapes=[576, 1536])
    key = kp.plan_key(**about)
    for change in ({"cpu": "Intel Xeon (avx512)"}, {"kernel": "abd"}, {"torch": "2.12"}, {"threads": 8}):
        assert kp.plan_key(**{**about, **change}) != key
    assert kp.plan_path(key).name == f"kernel_plan-{key}.json"


def greedy(dec: FastLM, lm, prompt: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    emb = lm.get_input_embeddings()
    s = dec.new_sequence()
    logits = dec.prefill(s, emb(prompt)[0])
    out, all_logits = [], [logits]
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = dec.decode([s], [out[-1]])[0]
        all_logits.append(logits)
    return out, torch.stack(all_logits)


@needs_kernel
@pytest.mark.parametrize("rows", ["0", "1", "4", "512"])
def test_output_is_the_same_whichever_plan_runs(rows, monkeypatch):
    lm = tiny_llama()
    prompt = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        ref_ids = lm.generate(prompt, max_new_tokens=10, do_sample=False)[0, 9:].tolist()
    monkeypatch.setenv(kp.ENV, rows)
    dec = FastLM(lm, max_batch=2)
    assert dec.kernel_rows == int(rows)
    ids, logits = greedy(dec, lm, prompt, 10)
    assert ids == ref_ids
    with torch.no_grad():
        ref = lm(torch.cat([prompt, torch.tensor([ids])], dim=1)).logits[0, 8:]
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_without_a_compiler_it_warns_and_runs_on_torch_ops(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_reason", None)
    with pytest.warns(UserWarning, match="without the C\\+\\+ layer kernel"):
        assert cpu_kernels.load() is None
    lm = tiny_llama()
    dec = FastLM(lm, max_batch=2)
    assert dec.kernel is None and dec.kernel_rows == 0 and "no kernel" in dec.kernel_plan
    prompt = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        ref_ids = lm.generate(prompt, max_new_tokens=6, do_sample=False)[0, 9:].tolist()
    assert greedy(dec, lm, prompt, 6)[0] == ref_ids


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("c++") is None, reason="x86-64 with a compiler")
def test_the_avx512_micro_kernel_compiles(tmp_path):
    """The AVX-512 variant is compiled here even where it cannot run (an AVX2 machine)."""
    cpu_kernels.compile_object(["-O2", "-mavx2", "-mfma", "-mavx512f"], tmp_path / "avx512.o")
    assert (tmp_path / "avx512.o").stat().st_size > 0


def test_info_is_a_plain_value():
    info = CpuInfo("GenuineIntel", "X", frozenset({"avx2", "fma"}), "x86_64")
    assert info.has("avx2", "fma") and not info.has("avx512f") and info.isa == "avx2"


def test_installations_share_one_build_compiled_from_a_copy_in_the_build_folder(tmp_path, monkeypatch):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    from torch.utils import cpp_extension

    seen = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.update(kw) or "module")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    module, why = cpu_kernels._build()
    assert module == "module", why
    (source,) = map(Path, seen["sources"])
    # the ninja file records this path: the same for every checkout with the same source and flags,
    # so two installations never rebuild each other's kernel
    assert source.parent == Path(seen["build_directory"]) and source.parent.parent == tmp_path
    assert source.name.startswith(cpu_kernels.NAME) and source.read_bytes() == cpu_kernels.SOURCE.read_bytes()


def test_a_build_lock_left_by_a_killed_build_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    cpu_kernels._remove_stale_lock(tmp_path)
    assert lock.exists()  # a fresh lock: a build is running
    old = time.time() - cpu_kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale kernel build lock"):
        cpu_kernels._remove_stale_lock(tmp_path)
    assert not lock.exists()
