"""The benchmark harness's pure parts: statistics, payloads, options and report rendering. No servers."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import workload
from bench.__main__ import parse_args, results_stem
from bench.plan import SCENARIOS, Plan, needed_ceilings, parse_only
from bench.report import Bar, Figure, Results, format_value, render_markdown, write_results
from bench.stats import latency_summary, median, percentile, ratio, time_bins, value_at_fraction


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 10.0
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile(reversed(values), 25) == pytest.approx(3.25)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_median_and_ratio() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(median([]))
    assert ratio(8.0, 10.0) == pytest.approx(0.8)
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 2.0))


def test_latency_summary_is_in_milliseconds() -> None:
    summary = latency_summary([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["max"] == pytest.approx(100.0)
    assert math.isnan(latency_summary([])["p99"])


def test_time_bins_count_per_window_and_keep_empty_ones() -> None:
    samples = [(100.0, 0.010), (100.5, 0.020), (102.2, 0.030)]
    rows = time_bins(samples, width=1.0)
    assert [row["t"] for row in rows] == [0.0, 1.0, 2.0]
    assert [row["throughput"] for row in rows] == [2.0, 0.0, 1.0]
    assert rows[0]["p50"] == pytest.approx(15.0)
    assert math.isnan(rows[1]["p99"])
    assert time_bins([]) == []


def test_value_at_fraction_takes_the_last_sample_before_the_milestone() -> None:
    progress = [(0.0, 0.0), (1.0, 0.3), (2.0, 0.6), (3.0, 1.0)]
    rss = [(0.5, 100.0), (0.9, 101.0), (1.9, 105.0), (2.5, 107.0), (3.0, 108.0)]
    assert value_at_fraction(progress, rss, 0.25) == 101.0
    assert value_at_fraction(progress, rss, 0.5) == 105.0
    assert value_at_fraction(progress, rss, 1.0) == 108.0
    assert math.isnan(value_at_fraction(progress[:2], rss, 0.5))


def test_payloads_have_the_exact_size_and_are_deterministic() -> None:
    for size in workload.SIZES.values():
        for n in (0, 7, 999, 123_456):
            body = workload.payload(n, size)
            assert len(body) == size
            assert body == workload.payload(n, size)
            assert body.startswith(f'{{"n":{n},"key":"k{n % workload.KEYS}","pad":"'.encode())
    assert workload.key(1001) == "k1"
    timed = workload.timed_payload(5, 200)
    assert len(timed) == 200 and timed.startswith(b'{"t":')


def test_bars_and_figure_lines() -> None:
    assert Bar(">=", 0.8).passed(0.8)
    assert not Bar(">=", 0.8).passed(0.79)
    assert not Bar("<=", 25).passed(math.nan)
    with pytest.raises(ValueError):
        Bar("~", 1)
    figure = Figure("drain.kafka.200B.x1.vs_raw", 0.8123, "x raw produce", bar=Bar(">=", 0.8))
    assert figure.line() == "drain.kafka.200B.x1.vs_raw: 0.812"
    assert figure.status == "pass"
    assert Figure("x.y", 0.5, bar=Bar(">=", 0.8)).status == "MISS"
    assert Figure("x.y", 1.0).status == ""
    assert format_value(123456.0) == "123456"
    assert format_value(math.nan) == "n/a"


def test_options_and_plans() -> None:
    args = parse_args(["--quick", "--reps", "2", "--only", "drain,latency"])
    assert args.quick and args.reps == 2 and args.scenarios == ("drain", "latency")
    assert parse_args([]).scenarios == SCENARIOS
    with pytest.raises(SystemExit):
        parse_args(["--only", "nonsense"])
    with pytest.raises(SystemExit):
        parse_args(["--reps", "0"])
    assert parse_only(None) == SCENARIOS
    assert "writer" in needed_ceilings(("keepup",)) and "kafka" not in needed_ceilings(("keepup",))
    assert Plan.smoke().backlog < Plan.full().backlog
    day = datetime(2026, 11, 25, tzinfo=UTC)
    assert results_stem(day, SCENARIOS, quick=False) == "2026-11-25"
    assert results_stem(day, ("drain",), quick=True) == "2026-11-25-drain-quick"


def test_a_second_run_on_the_same_day_keeps_the_first_results(tmp_path: Path) -> None:
    day = datetime(2026, 11, 25, 14, 5, tzinfo=UTC)
    assert results_stem(day, ("drain",), quick=False, out=tmp_path) == "2026-11-25-drain"
    (tmp_path / "2026-11-25-drain.md").write_text("the morning's run")
    assert results_stem(day, ("drain",), quick=False, out=tmp_path) == "2026-11-25-drain-1405"


def _results() -> Results:
    results = Results(started=datetime(2026, 11, 25, 12, 0, tzinfo=UTC), echo=None)
    results.options = {"command": "python -m bench --quick", "reps": 3}
    results.machine = {"CPU": "Test CPU", "cores": "2 logical"}
    results.add(Figure("ceiling.kafka_produce.200B", 100_000.0, "msgs/s", "ceiling", reps=[9e4, 1e5, 1.1e5]))
    results.add(
        Figure("drain.kafka.200B.x1.vs_raw", 0.5, "x raw produce", bar=Bar(">=", 0.8), reps=[0.4, 0.5])
    )
    results.add(Figure("latency.listen.500.p99_ms", 20.0, "ms", "absolute", Bar("<=", 25)))
    results.note("drain", "a note | with a pipe")
    results.series["relay, 500/s"] = time_bins([(float(t) / 10, 0.01 + t / 1e4) for t in range(50)])
    return results


def test_markdown_lists_bars_sections_and_machine() -> None:
    results = _results()
    text = render_markdown(results, "plot.png")
    assert "| `drain.kafka.200B.x1.vs_raw` | 0.5 x raw produce | >= 0.8 | MISS |" in text
    assert "| `latency.listen.500.p99_ms` | 20.0 ms | <= 25 | pass |" in text
    assert "## 1. Backlog drain" in text and "## Raw ceilings (no relay)" in text
    assert "a note \\| with a pipe" in text
    assert "| CPU | Test CPU |" in text
    assert "![latency](plot.png)" in text
    assert [f.name for f in results.missed] == ["drain.kafka.200B.x1.vs_raw"]


def test_results_files_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    markdown, png = write_results(_results(), tmp_path / "results", "2026-11-25-quick")
    assert markdown.name == "2026-11-25-quick.md"
    assert png is not None and png.name == "2026-11-25-quick-latency.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "2026-11-25-quick-latency.png" in markdown.read_text()


def test_speed_probe_times_the_same_work_in_a_child_process_until_stopped() -> None:
    from bench.steadiness import SpeedProbe

    probe = SpeedProbe(interval=0.05)
    deadline = time.monotonic() + 60
    steadiness = None
    while time.monotonic() < deadline:  # a loaded machine may start the child slowly
        time.sleep(0.5)
        steadiness = probe.stop()
        if len(steadiness.samples) >= 2:
            break
        probe = SpeedProbe(interval=0.05)
    assert steadiness is not None and len(steadiness.samples) >= 2
    assert all(sample > 0 for sample in steadiness.samples)


def test_an_unsteady_machine_is_named_in_the_results_and_a_steady_one_is_not() -> None:
    from bench.__main__ import report_steadiness
    from bench.steadiness import Steadiness

    steady, unsteady = Results(started=datetime.now(UTC)), Results(started=datetime.now(UTC))
    report_steadiness(steady, Steadiness(tuple(10.0 + n / 100 for n in range(40))))
    report_steadiness(unsteady, Steadiness(tuple([10.0] * 20 + [18.0] * 20)))

    assert "slowest decile 1.03x the fastest" in next(iter(steady.machine.values()))
    assert "Machine speed" not in steady.notes
    assert "1.80x" in unsteady.notes["Machine speed"][0]
    assert "## Machine speed" in render_markdown(unsteady)
    assert "too few to tell" in Steadiness((10.0, 11.0)).describe()
