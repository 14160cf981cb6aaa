"""Benchmark fixtures: every benchmark runs once per implementation (compiled and twin)."""

from __future__ import annotations

import pytest

from kodarelay import _relay_py
from kodarelay.relay import env_flag


@pytest.fixture(
    scope="session",
    params=[pytest.param("cython", marks=pytest.mark.c_extension), "python"],
)
def impl(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """``kodarelay._relay`` or ``kodarelay._relay_py``."""
    if request.param == "python":
        return _relay_py
    if env_flag("KODARELAY_NO_EXTENSIONS"):
        pytest.skip("KODARELAY_NO_EXTENSIONS is set")
    from kodarelay import _relay

    return _relay


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """Ratios, not absolute numbers: this machine is shared and noisy, ratios within one run are not."""
    tr = terminalreporter
    _inspect_summary(tr)
    try:
        from test_relay_bench import BULK_RESULTS, RATIO_RESULTS
    except ImportError:
        return
    if RATIO_RESULTS:
        tr.section("compiled engine vs pure-Python twin, quiet and with a busy interpreter (same run)")
        tr.write_line(f"{'measure':<38} {'load':<6} {'cython':>10} {'python':>10} {'cython / python':>16}")
        for measure in dict.fromkeys(m for m, _l, _i in RATIO_RESULTS):
            for load in ("quiet", "busy"):
                c = RATIO_RESULTS.get((measure, load, "cython"))
                p = RATIO_RESULTS.get((measure, load, "python"))
                if c is None and p is None:
                    continue
                ratio = f"{c / p:.2f}x" if c and p else "-"
                if c and p and "latency" in measure:
                    ratio = f"{c / p:.2f}x (lower is better)"
                cs = f"{c:,.1f}" if c is not None else "-"
                ps = f"{p:,.1f}" if p is not None else "-"
                tr.write_line(f"{measure:<38} {load:<6} {cs:>10} {ps:>10} {ratio:>16}")
    if not BULK_RESULTS:
        return
    tr.section("bulk relay ratios (same run)")
    ref = BULK_RESULTS.get("c-splice")
    py = BULK_RESULTS.get("python")
    tr.write_line(f"{'relay':<10} {'MB/s':>8} {'CPU-s/GiB':>10} {'MB/s vs c-splice':>17} {'CPU vs c-splice':>16} {'MB/s vs python':>15}")
    for name, (mbs, cpu) in BULK_RESULTS.items():
        vs_ref = f"{mbs / ref[0]:.2f}x" if ref else "-"
        cpu_ref = f"{cpu / ref[1]:.2f}x" if ref and ref[1] else "-"
        vs_py = f"{mbs / py[0]:.2f}x" if py else "-"
        tr.write_line(f"{name:<10} {mbs:>8.0f} {cpu:>10.3f} {vs_ref:>17} {cpu_ref:>16} {vs_py:>15}")


def _inspect_summary(tr) -> None:  # type: ignore[no-untyped-def]
    """test_inspect_bench: medians of per-round ratios, per measure and implementation."""
    import statistics
    import sys

    bench = sys.modules.get("test_inspect_bench")      # (only when it ran: importing it could skip)
    if bench is None or not bench.INSPECT_RESULTS:
        return
    INSPECT_CPU, INSPECT_RESULTS, UNITS = bench.INSPECT_CPU, bench.INSPECT_RESULTS, bench.UNITS
    _cpu_ratios, _ratios = bench._cpu_ratios, bench._ratios
    tr.section("inspected HTTPS vs blind tunnel vs haproxy (medians of per-round ratios, same run)")
    for (measure, impl), figures in INSPECT_RESULTS.items():
        cpu = INSPECT_CPU.get((measure, impl), {})
        line = ", ".join(f"{r} {lo} {statistics.median(v):,.1f}" for (r, lo), v in figures.items())
        tr.write_line(f"{UNITS[measure]} [{impl}]: {line}")
        if cpu:
            tr.write_line("  CPU-s/GiB: " + ", ".join(f"{r} {lo} {statistics.median(v):.2f}"
                                                     for (r, lo), v in cpu.items()))
        tr.write_line("  " + ", ".join(f"{label} {ratio:.2f}x" for label, ratio in _ratios(figures) + _cpu_ratios(cpu)))
