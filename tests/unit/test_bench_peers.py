"""The peer comparison's pure parts: the consumer's order check, the runners' output, the choice of
interpreter, the options, the figures and the side-by-side table. No servers."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import pytest

from bench.__main__ import parse_args, results_stem
from bench.consumer import KeyOrder
from bench.peers import venv
from bench.peers.runner import CommitTimes, Env
from bench.peers.scenario import OURS, Run, add_figures, commit_times, in_turn, parse_emitted
from bench.plan import PEERS, SCENARIOS, Plan, parse_only
from bench.report import Results, render_markdown
from bench.stack import BenchError


def test_key_order_counts_an_event_read_after_a_later_one_of_its_key() -> None:
    order = KeyOrder()
    for key, n in [(b"k1", 1), (b"k2", 2), (b"k1", 1001), (b"k2", 1002), (b"k1", 5), (b"k1", 2001)]:
        order.saw(key, n)
    assert order.violations == 1  # k1: 5 after 1001
    order.saw(b"k2", 1002)  # equal n (a duplicate the consumer did not filter) is not a violation
    assert order.violations == 1


def test_runner_output_is_the_last_json_line() -> None:
    assert parse_emitted('log line\n{"committed": 7}\n\n') == {"committed": 7}
    with pytest.raises(BenchError, match="not JSON"):
        parse_emitted("2026-11-30 INFO - Received\n")
    with pytest.raises(BenchError, match="nothing"):
        parse_emitted("\n")
    with pytest.raises(BenchError, match="not an object"):
        parse_emitted("[1, 2]")


def test_the_writer_times_its_commits_after_the_warm_up() -> None:
    now = [100.0]

    async def send(n: int) -> None:  # the commit of event n takes n ms
        now[0] += n / 1000

    async def write() -> CommitTimes:
        commits = CommitTimes(send, warm=2, clock=lambda: now[0])
        for n in range(5):
            await commits.send(n)
        return commits

    commits = asyncio.run(write())
    assert commits.seconds == pytest.approx([0.002, 0.003, 0.004])  # events 0 and 1 were the warm-up
    assert commits.summary() == {"commit_p50_ms": pytest.approx(3.0), "commit_p99_ms": pytest.approx(3.98)}
    # What the harness reads back; a runner that reported nothing gives NaN, not a crash.
    assert commit_times({"committed": 5, **commits.summary()}) == {
        "p50": pytest.approx(3.0),
        "p99": pytest.approx(3.98),
    }
    assert all(math.isnan(v) for v in commit_times({"committed": 5}).values())


def test_runner_env_and_sqlalchemy_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEER_DSN", "postgresql://u@127.0.0.1:5432/db")
    monkeypatch.setenv("PEER_BOOTSTRAP", "127.0.0.1:9092")
    monkeypatch.setenv("PEER_TOPIC", "t")
    monkeypatch.setenv("PEER_SCHEMA", "peer_abc")
    env = Env.from_environ()
    assert env.sqlalchemy_url() == "postgresql+asyncpg://u@127.0.0.1:5432/db"
    monkeypatch.setenv("PEER_SCHEMA", "x; DROP TABLE y")
    with pytest.raises(SystemExit, match="identifier"):
        Env.from_environ()
    monkeypatch.delenv("PEER_TOPIC")
    with pytest.raises(SystemExit, match="PEER_TOPIC"):
        Env.from_environ()


def test_the_first_python_312_wins_else_the_newest_311() -> None:
    versions = {"a": (3, 11), "b": None, "c": (3, 13), "d": (3, 12), "e": (3, 10)}
    assert venv.choose_python(["a", "b", "c", "d"], versions.get) == ("c", (3, 13))
    assert venv.choose_python(["e", "a", "b"], versions.get) == ("a", (3, 11))
    assert venv.choose_python(["e", "b"], versions.get) == (None, None)


def test_candidates_start_with_peers_python_and_end_with_ours(tmp_path: object) -> None:
    found = venv.candidates({"PEERS_PYTHON": "/opt/py/bin/python3.12", "PATH": "", "PYENV_ROOT": "/nowhere"})
    assert found[0] == "/opt/py/bin/python3.12"
    import sys

    assert found[-1] == sys.executable


def test_every_peer_has_pins_and_a_runner() -> None:
    assert set(venv.PEERS) == {"txoutbox", "faststream-outbox", "omni-box"}
    assert venv.PEERS["omni-box"][3] == (3, 12)
    for peer in venv.PEERS:
        assert any("==" in req for req in venv.requirements([peer]))


def test_peers_option_adds_the_scenario() -> None:
    assert parse_only(None, peers=True) == (*SCENARIOS, PEERS)
    assert parse_only("latency", peers=True) == ("latency", PEERS)
    assert parse_only("peers") == (PEERS,)
    args = parse_args(["--peers", "--quick", "--only", "drain", "--reps", "2"])
    assert args.scenarios == ("drain", PEERS) and args.quick and args.reps == 2
    started = datetime(2026, 11, 30, tzinfo=UTC)
    assert results_stem(started, (*SCENARIOS, PEERS), False) == "2026-11-30"
    assert results_stem(started, ("drain", PEERS), True) == "2026-11-30-drain-peers-quick"
    assert Plan.smoke().peers_backlog < Plan.full().peers_backlog == 50_000


def _run(rate: float, p50: float, p99: float, pickup_p99: float = 2.0, **kw: int) -> tuple[Run, Run]:
    drain = Run(
        expected=100,
        received=100 - kw.get("lost", 0),
        duplicates=kw.get("dup", 0),
        violations=0,
        cpu_ms_per_1k=10.0,
        rate=rate,
    )
    latency = Run(
        expected=50,
        received=50,
        duplicates=0,
        violations=kw.get("order", 0),
        cpu_ms_per_1k=20.0,
        summary={"p50": p50, "p95": p99, "p99": p99, "max": p99 * 2},
        pickup={"p50": pickup_p99 / 2, "p95": pickup_p99, "p99": pickup_p99, "max": pickup_p99},
        broker={"p50": p50 / 2, "p95": p99 - pickup_p99, "p99": p99 - pickup_p99, "max": p99},
        commit={"p50": pickup_p99 / 4, "p99": pickup_p99 / 2},
        broker_cores=0.5,
        achieved=1.0,
    )
    return drain, latency


def test_peer_figures_ratios_and_the_side_by_side_table() -> None:
    results = Results(started=datetime(2026, 11, 30, tzinfo=UTC), echo=None)
    ours, theirs = _run(50_000, 3.0, 9.0), _run(3_000, 4.5, 11.0, pickup_p99=5.0, lost=2, dup=1, order=3)
    results.peers = {OURS: "0.1.0; defaults", "txoutbox": "0.2.2; RelayConfig defaults"}
    add_figures(
        results,
        Plan.smoke(),
        {OURS: [ours[0]], "txoutbox": [theirs[0]]},
        {OURS: [ours[1]], "txoutbox": [theirs[1]]},
    )
    drain = results.get(f"peers.{OURS}.vs.txoutbox.drain")
    p99 = results.get(f"peers.{OURS}.vs.txoutbox.p99")
    assert drain is not None and drain.value == pytest.approx(50_000 / 3_000) and drain.status == "pass"
    assert p99 is not None and p99.value == pytest.approx(9.0 / 11.0) and p99.status == "pass"
    pickup = results.get(f"peers.{OURS}.vs.txoutbox.pickup_p99")
    assert pickup is not None and pickup.value == pytest.approx(2.0 / 5.0) and pickup.bar is None
    assert results.get("peers.txoutbox.latency.broker_p99_ms").value == pytest.approx(6.0)  # type: ignore[union-attr]
    lost = results.get("peers.txoutbox.lost")
    assert lost is not None and lost.value == 2 and lost.bar is None  # only our own losses are a bar
    ours_lost = results.get(f"peers.{OURS}.lost")
    assert ours_lost is not None and ours_lost.status == "pass"
    assert results.get("peers.txoutbox.order_violations").value == 3  # type: ignore[union-attr]
    markdown = render_markdown(results)
    assert "## 6. Other outbox relays" in markdown
    assert "| relay | backlog drain (events/s) | p50 (ms) | p99 (ms) |" in markdown
    assert "| max (ms) | commit p50 (ms) | commit p99 (ms) | pickup p50 (ms) |" in markdown
    assert (
        "| txoutbox | 3000 | 4.50 | 11.0 | 22.0 | 1.25 | 2.50 | 2.50 | 5.00 | 6.00 | 10.0 | 20.0 | 0.5 | 2.00 | 1.00 | 3.00 |"
        in markdown
    )
    assert results.get("peers.txoutbox.latency.commit_p99_ms").value == pytest.approx(2.5)  # type: ignore[union-attr]
    assert "- **txoutbox** 0.2.2; RelayConfig defaults" in markdown


def test_a_peer_that_did_not_deliver_everything_has_no_drain_rate() -> None:
    results = Results(started=datetime(2026, 11, 30, tzinfo=UTC), echo=None)
    drain = Run(expected=10, received=9, duplicates=0, violations=0, cpu_ms_per_1k=1.0)
    add_figures(results, Plan.smoke(), {"omni-box": [drain]}, {"omni-box": []})
    assert math.isnan(results.get("peers.omni-box.drain.events_per_s").value)  # type: ignore[union-attr]
    assert results.get("peers.omni-box.lost").value == 1  # type: ignore[union-attr]


def test_each_repetition_starts_with_another_relay_and_runs_every_one_once() -> None:
    everyone = ["ours", "a", "b", "c"]
    orders = [in_turn(everyone, rep) for rep in range(4)]
    assert [order[0] for order in orders] == everyone
    assert all(sorted(order) == sorted(everyone) for order in orders)
    assert in_turn([], 2) == []  # no peer installed, and ours failed to start: nothing to run


def test_latency_against_a_peer_is_also_compared_within_each_repetition() -> None:
    # The machine slows down between repetitions: the medians alone say "behind" (10 > 9), while ours
    # was below the peer run next to it in two of the three repetitions.
    results = Results(started=datetime(2026, 12, 1, tzinfo=UTC), echo=None)
    ours = [_run(50_000, 3.0, p99)[1] for p99 in (5.0, 30.0, 10.0)]
    theirs = [_run(3_000, 4.5, p99)[1] for p99 in (6.0, 9.0, 12.0)]
    add_figures(results, Plan.smoke(), {OURS: [], "txoutbox": []}, {OURS: ours, "txoutbox": theirs})
    p99 = results.get(f"peers.{OURS}.vs.txoutbox.p99")
    assert p99 is not None and p99.value == pytest.approx(10.0 / 9.0) and p99.status == "MISS"
    paired = results.get(f"peers.{OURS}.vs.txoutbox.p99_paired")
    assert paired is not None and paired.reps == pytest.approx([5 / 6, 30 / 9, 10 / 12])
    assert paired.value == pytest.approx(10 / 12) and paired.bar is None
    lower_in = results.get(f"peers.{OURS}.vs.txoutbox.p99_lower_in")
    assert lower_in is not None and lower_in.value == 2 and "of 3 repetitions" in lower_in.unit
    # A peer that failed after its first repetition is paired for that one only.
    results = Results(started=datetime(2026, 12, 1, tzinfo=UTC), echo=None)
    add_figures(results, Plan.smoke(), {OURS: [], "txoutbox": []}, {OURS: ours, "txoutbox": theirs[:1]})
    assert results.get(f"peers.{OURS}.vs.txoutbox.p99_paired").reps == pytest.approx([5 / 6])  # type: ignore[union-attr]
