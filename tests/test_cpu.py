"""CPU facts (common.cpu): the native-bf16 detection, its override, and what benchmarks report."""
from __future__ import annotations

import pytest

from common import cpu


def test_override_wins_over_the_flags(monkeypatch):
    for value, expected in (("1", True), ("true", True), ("0", False), (" no ", False)):
        monkeypatch.setenv(cpu.OVERRIDE_ENV, value)
        assert cpu.cpu_supports_bf16() is expected and cpu.cpu_kind()["native_bf16_source"] == cpu.OVERRIDE_ENV
    monkeypatch.delenv(cpu.OVERRIDE_ENV)
    assert cpu.cpu_supports_bf16() == cpu.native_bf16_detected()
    assert cpu.cpu_kind()["native_bf16_source"] == "cpuinfo"


def test_a_malformed_override_is_refused(monkeypatch):
    monkeypatch.setenv(cpu.OVERRIDE_ENV, "2")
    with pytest.raises(ValueError, match="SEARCHREC_CPU_BF16 must be 1 or 0"):
        cpu.cpu_supports_bf16()


def test_flags_are_read_from_cpuinfo(monkeypatch):
    cpuinfo = ("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 fma avx512f amx_bf16 amx_tile\n\n"
               "processor\t: 1\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 fma avx512f amx_bf16 amx_tile\n")
    plain = "processor\t: 0\nmodel name\t: Plain CPU\nflags\t\t: fpu sse avx2 fma\n"
    for text, model, flags, native in ((cpuinfo, "Test CPU", ["amx_bf16", "amx_tile", "avx2", "avx512f", "fma"], True),
                                       (plain, "Plain CPU", ["avx2", "fma"], False)):
        monkeypatch.setattr(cpu.Path, "read_text", lambda self, text=text: text)
        cpu._cpuinfo.cache_clear()
        try:
            assert (cpu.cpu_model(), cpu.cpu_flags(), cpu.native_bf16_detected()) == (model, flags, native)
        finally:
            monkeypatch.undo()
            cpu._cpuinfo.cache_clear()


def test_cpu_kind_describes_this_machine():
    kind = cpu.cpu_kind()
    assert set(kind) == {"cpu_model", "cpu_flags", "native_bf16", "native_bf16_source", "cores"}
    assert kind["cores"] >= 1 and kind["cpu_flags"] == sorted(kind["cpu_flags"])
