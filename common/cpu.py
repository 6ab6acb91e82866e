"""What this CPU can do: the facts that decide which encoder precision is fastest, in one place.

Machines of one kind differ: some CPUs have native bf16 arithmetic (AVX512-BF16, AMX), others do not.
On the first, the bf16 encoder ran 1.3-3.3x faster than fp32; on the second bf16 is emulated and ran
1.7-5.6x slower (docs/cpu.md). Everything that chooses a precision asks `cpu_supports_bf16()`, and every
benchmark and GetInfo reports `cpu_flags()`, since figures from the two kinds are not comparable.

`SEARCHREC_CPU_BF16=1|0` overrides the detection for the whole process and the processes it starts:
the tests use it to run the other kind's path on any machine, and an operator whose hypervisor hides the
flag (or advertises one it emulates) can set it. It is read at call time, never at import.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

OVERRIDE_ENV = "SEARCHREC_CPU_BF16"
# The flags that change how our kernels run: vector width, int8 dot products, native bf16, AMX tiles.
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                     "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16")
# x86 only: these are the flags measured here. (ARM's `bf16` is reported, not acted on: untested.)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, all flags) of the first processor in /proc/cpuinfo; ('', {}) where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", frozenset()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 | ARM
            flags = set(value.split())
    return model, frozenset(flags)


def cpu_model() -> str:
    """The CPU's model name ('' when unknown)."""
    return _cpuinfo()[0]


def cpu_flags() -> list[str]:
    """The CPU flags of interest this CPU has, sorted (what benchmarks and GetInfo report)."""
    flags = _cpuinfo()[1]
    return sorted(f for f in FLAGS_OF_INTEREST if f in flags)


def native_bf16_detected() -> bool:
    """True when /proc/cpuinfo lists native bf16 arithmetic (whatever the override says)."""
    flags = _cpuinfo()[1]
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def bf16_override() -> bool | None:
    """The value of SEARCHREC_CPU_BF16 (None when unset); anything but 0/1/true/false is an error."""
    raw = os.environ.get(OVERRIDE_ENV, "").strip().lower()
    if not raw:
        return None
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    raise ValueError(f"{OVERRIDE_ENV} must be 1 or 0 (or unset to detect), got {raw!r}")


def cpu_supports_bf16() -> bool:
    """Whether to treat this CPU as having native bf16: SEARCHREC_CPU_BF16 if set, else /proc/cpuinfo."""
    forced = bf16_override()
    return native_bf16_detected() if forced is None else forced


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_kind() -> dict:
    """A description of this CPU for benchmark JSON, manifests and logs."""
    forced = bf16_override()
    return {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "native_bf16": cpu_supports_bf16(),
            "native_bf16_source": "cpuinfo" if forced is None else OVERRIDE_ENV, "cores": available_cores()}
