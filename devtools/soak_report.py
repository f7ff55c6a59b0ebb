"""What a soak run records, how it is judged, and the Markdown report (see devtools/soak.py)."""

from __future__ import annotations

import contextlib
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from devtools.fleet import Received, Written, check_delivery, json_lines, tally_delivery

RSS_GROWTH_LIMIT = 0.5  # last-quarter median over first-quarter median, minus 1
RSS_MIN_LIFETIME = 60.0  # seconds a relay must live for its RSS trend to be judged
RSS_MIN_SAMPLES = 8

# -- what the run records --------------------------------------------------------------------------


@dataclass
class FaultRecord:
    kind: str
    start: float  # seconds since the soak began
    duration: float  # planned seconds
    target: str = ""
    detail: str = ""
    at_risk: int = 0  # partitions whose in-flight batch this fault may cause to be sent again
    took: float = 0.0  # seconds the injection really lasted
    error: str = ""
    duplicates: int = 0  # copies published after this fault began and before the next one
    counted: str = ""  # what the relays' counters rose by over the fault and its recovery gap
    warnings: str = ""  # the relays' most frequent warnings over the same window


@dataclass
class RelayInfo:
    instance_id: str
    pid: int
    metrics_addr: str
    log_path: Path
    started: float
    ended: float | None = None
    end: str = "running"
    unexpected_exit: bool = False
    exit_code: int | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds, KiB)
    ready: Counter[str] = field(default_factory=Counter)  # ready / not-ready / unreachable samples
    metrics: dict[str, float] = field(default_factory=dict)  # last counters read from /metrics


@dataclass
class Seen:
    """One copy the checking consumer read while the soak ran."""

    message_id: str
    published: float  # wall-clock seconds: Kafka record timestamp or Redis entry id
    latency: float | None  # commit (writer clock) to read by the consumer


@dataclass
class WriterStats:
    written: list[Written] = field(default_factory=list)
    uncertain: set[str] = field(default_factory=set)  # message ids of commits that raised
    txns: int = 0
    failed_txns: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    bar: str
    ok: bool


# -- analysis --------------------------------------------------------------------------------------


@dataclass
class Delivery:
    written: int
    delivered: int
    lost: list[Written]
    order_violations: list[str]
    duplicates: int
    uncertain_delivered: int  # commits that raised but did commit (delivered, id unknown to us)
    unexpected: int  # delivered message ids nobody wrote
    fleet_check: str  # the verdict of devtools.fleet.check_delivery


def analyse_delivery(
    written: Sequence[Written], received: Sequence[Received], uncertain: set[str]
) -> Delivery:
    """Every written event must arrive; per (topic, key), first arrivals must follow id order."""
    by_message = {w.message_id: w for w in written}
    tally = tally_delivery(written, received)
    seen, duplicates, violations = tally.seen, tally.duplicates, tally.violations
    lost = sorted((w for m, w in by_message.items() if m not in seen), key=lambda w: w.id)
    strangers = seen - set(by_message)
    return Delivery(
        written=len(by_message),
        delivered=len(seen & set(by_message)),
        lost=lost,
        order_violations=violations,
        duplicates=duplicates,
        uncertain_delivered=len(strangers & uncertain),
        unexpected=len(strangers - uncertain),
        fleet_check=_fleet_verdict(written, received),
    )


def _fleet_verdict(written: Sequence[Written], received: Sequence[Received]) -> str:
    try:
        return f"ok {check_delivery(written, received)}"
    except AssertionError as exc:
        return f"failed: {str(exc)[:300]}"


def attribute_duplicates(seen: Sequence[Seen], faults: Sequence[FaultRecord], began: float) -> int:
    """Sets each fault's `duplicates` to the copies first published after it began and before the
    next fault began; returns the copies published before the first fault."""
    copies: dict[str, list[float]] = defaultdict(list)
    for item in seen:
        copies[item.message_id].append(item.published)
    starts = [began + f.start for f in faults]
    before_any = 0
    for stamps in copies.values():
        for stamp in sorted(stamps)[1:]:
            index = _last_start_before(starts, stamp + 0.5)
            if index is None:
                before_any += 1
            else:
                faults[index].duplicates += 1
    return before_any


def _last_start_before(starts: Sequence[float], stamp: float) -> int | None:
    found = None
    for index, start in enumerate(starts):
        if start <= stamp:
            found = index
    return found


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass(frozen=True)
class RssSummary:
    start: float
    peak: float
    end: float
    first_quarter: float
    last_quarter: float
    growth: float | None  # None: lived too briefly to judge
    flagged: bool


def summarise_rss(samples: Sequence[tuple[float, int]]) -> RssSummary | None:
    """MiB figures; growth compares the median of the first and of the last quarter of samples."""
    if not samples:
        return None
    mib = [kib / 1024 for _, kib in samples]
    quarter = max(1, len(mib) // 4)
    first, last = statistics.median(mib[:quarter]), statistics.median(mib[-quarter:])
    lifetime = samples[-1][0] - samples[0][0]
    judged = lifetime >= RSS_MIN_LIFETIME and len(mib) >= RSS_MIN_SAMPLES
    growth = last / first - 1 if judged and first > 0 else None
    return RssSummary(
        mib[0], max(mib), mib[-1], first, last, growth, growth is not None and growth > RSS_GROWTH_LIMIT
    )


def log_findings(paths: Iterable[Path], top: int = 15) -> list[tuple[int, str]]:
    """The most frequent warning and error lines over every relay log, digits folded to N."""
    counts: Counter[str] = Counter()
    for path in paths:
        text = path.read_text(errors="replace") if path.exists() else ""
        for entry in json_lines(text):
            level = str(entry.get("level", ""))
            if level in ("warning", "error", "critical"):
                counts[f"{level}: {_fold(str(entry.get('msg', '')))}"] += 1
    return [(n, line) for line, n in counts.most_common(top)]


def warnings_by_fault(
    faults: Sequence[FaultRecord], paths: Iterable[Path], began: float, top: int = 3
) -> None:
    """Sets each fault's `warnings`: the relays' most frequent warnings and errors logged from the
    fault's start to the next fault's start (`began`: wall-clock seconds of the soak's start)."""
    logged = sorted(_warning_lines(paths))
    starts = [began + f.start for f in faults]
    for index, fault in enumerate(faults):
        end = starts[index + 1] if index + 1 < len(starts) else float("inf")
        window = Counter(line for stamp, line in logged if starts[index] <= stamp < end)
        fault.warnings = "; ".join(f"{n}x {line}" for line, n in window.most_common(top)) or "-"


def _warning_lines(paths: Iterable[Path]) -> Iterable[tuple[float, str]]:
    for path in paths:
        text = path.read_text(errors="replace") if path.exists() else ""
        for entry in json_lines(text):
            if entry.get("level") in ("warning", "error", "critical"):
                with contextlib.suppress(ValueError, TypeError):
                    stamp = datetime.fromisoformat(str(entry.get("ts"))).timestamp()
                    yield stamp, f"{entry.get('level')}: {_fold(str(entry.get('msg', '')))}"


def _fold(message: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", message)[:160]


def log_tail(path: Path, lines: int = 12) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


# -- the report ------------------------------------------------------------------------------------


@dataclass
class SoakResult:
    settings: dict[str, str]
    faults: list[FaultRecord]
    relays: list[RelayInfo]
    writers: WriterStats
    delivery: Delivery | None
    duplicate_bound: int
    duplicates_before_faults: int
    latencies: list[float]
    drain: str
    dead_letters: list[dict[str, object]]
    consumer_note: str
    log_dir: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)


def build_checks(result: SoakResult, kinds: Sequence[str]) -> list[Check]:
    d = result.delivery
    dead = sum(int(str(row["count"])) for row in result.dead_letters)
    exits = [r for r in result.relays if r.unexpected_exit]
    grown = [r.instance_id for r in result.relays if (s := summarise_rss(r.rss)) and s.flagged]
    injected = {f.kind for f in result.faults if not f.error}
    checks = [
        Check("outbox drained", result.drain, "empty", result.drain.startswith("empty")),
        Check("lost events", str(len(d.lost)) if d else "?", "0", bool(d) and not d.lost),
        Check(
            "first deliveries out of per-key order",
            str(len(d.order_violations)) if d else "?",
            "0",
            bool(d) and not d.order_violations,
        ),
        Check(
            "duplicates",
            str(d.duplicates) if d else "?",
            f"<= {result.duplicate_bound}",
            bool(d) and d.duplicates <= result.duplicate_bound,
        ),
        Check(
            "delivered events nobody wrote",
            str(d.unexpected) if d else "?",
            "0",
            bool(d) and not d.unexpected,
        ),
        Check("dead letters", str(dead), "0", dead == 0),
        Check(
            "relays exited on their own", ", ".join(r.instance_id for r in exits) or "none", "none", not exits
        ),
        Check(
            f"RSS growth > {RSS_GROWTH_LIMIT:.0%} (last vs first quarter median)",
            ", ".join(grown) or "none",
            "none",
            not grown,
        ),
    ]
    missing = [k for k in kinds if k not in injected]
    checks.append(
        Check(
            "fault kinds injected",
            f"{len(injected)}/{len(kinds)}" + (f" (not: {', '.join(missing)})" if missing else ""),
            "informational",
            True,
        )
    )
    return checks


def render(result: SoakResult) -> str:
    parts = [
        f"# Soak run {result.settings.get('started', '')}\n",
        f"**{'PASS' if result.passed else 'FAIL'}**"
        + ("" if result.passed else ": " + "; ".join(c.name for c in result.checks if not c.ok))
        + "\n",
        _settings_md(result.settings),
        _checks_md(result.checks),
        _delivery_md(result),
        _faults_md(result.faults),
        _relays_md(result.relays),
        _dead_letters_md(result.dead_letters),
        _exits_md(result.relays),
        _logs_md(result),
    ]
    return "\n".join(p for p in parts if p)


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _settings_md(settings: dict[str, str]) -> str:
    return "## Settings\n\n" + _table(["setting", "value"], sorted(settings.items()))


def _checks_md(checks: Sequence[Check]) -> str:
    rows = [(c.name, c.value, c.bar, "ok" if c.ok else "**FAIL**") for c in checks]
    return "## Checks\n\n" + _table(["check", "value", "bar", "result"], rows)


def _delivery_md(result: SoakResult) -> str:
    d, w, lat = result.delivery, result.writers, result.latencies
    rows: list[tuple[str, object]] = []
    if d:
        lost = f"{len(d.lost)}" + (
            ", e.g. " + ", ".join(f"{x.topic}/{x.key}#{x.id}" for x in d.lost[:5]) if d.lost else ""
        )
        order = f"{len(d.order_violations)}" + (
            f", e.g. {d.order_violations[:3]}" if d.order_violations else ""
        )
        rows += [
            ("events written (recorded commits)", d.written),
            ("delivered (distinct)", d.delivered),
            ("lost", lost),
            ("first deliveries out of per-key order", order),
            ("duplicate copies", d.duplicates),
            ("delivered from commits whose outcome was unknown", d.uncertain_delivered),
            ("devtools.fleet.check_delivery", d.fleet_check),
        ]
    rows += [
        ("writer transactions committed / failed before commit", f"{w.txns} / {w.failed_txns}"),
        ("events in commits whose outcome is unknown (commit raised)", len(w.uncertain)),
        ("writer errors", ", ".join(f"{k}: {n}" for k, n in w.errors.most_common(6)) or "none"),
        ("duplicate copies published before the first fault", result.duplicates_before_faults),
        ("duplicate bound (batch size x partitions at risk, summed over faults)", result.duplicate_bound),
        (
            "commit-to-consumer latency p50 / p99 / max (s)",
            f"{percentile(lat, 0.5):.3f} / {percentile(lat, 0.99):.3f} / {max(lat, default=float('nan')):.1f}",
        ),
        ("checking consumer vs final read-back", result.consumer_note),
    ]
    return "## Delivery\n\n" + _table(["figure", "value"], rows)


def _faults_md(faults: Sequence[FaultRecord]) -> str:
    rows = [
        (
            n + 1,
            f"{f.start:.1f}",
            f.kind,
            f.target,
            f"{f.took:.1f}",
            f.at_risk,
            f.duplicates,
            f.detail,
            f.counted,
            f.warnings,
            f.error,
        )
        for n, f in enumerate(faults)
    ]
    header = [
        "#",
        "at (s)",
        "fault",
        "target",
        "lasted (s)",
        "partitions at risk",
        "dup copies after",
        "detail",
        "relay counters until next fault",
        "relay warnings until next fault",
        "error",
    ]
    return (
        "## Fault timeline\n\nSeconds from the start; each fault is followed by a recovery gap. "
        "Duplicate copies are attributed to the last fault that began before they were published.\n\n"
        + _table(header, rows)
    )


def _relays_md(relays: Sequence[RelayInfo]) -> str:
    rows = []
    for r in relays:
        s = summarise_rss(r.rss)
        rss = (
            (
                f"{s.start:.0f} / {s.peak:.0f} / {s.end:.0f}",
                f"{s.first_quarter:.0f} -> {s.last_quarter:.0f}",
                "too short" if s.growth is None else f"{s.growth:+.0%}" + (" **FLAG**" if s.flagged else ""),
            )
            if s
            else ("-", "-", "-")
        )
        ready = f"{r.ready['ready']}/{r.ready['not-ready']}/{r.ready['unreachable']}"
        m = r.metrics
        counters = " / ".join(
            f"{m.get(k, 0):.0f}"
            for k in (
                "outbox_events_published",
                "outbox_events_dead_lettered",
                "outbox_publish_failures",
                "outbox_retries",
                "outbox_lease_changes",
            )
        )
        ended = "" if r.ended is None else f"{r.ended:.0f}"
        rows.append((r.instance_id, r.pid, f"{r.started:.0f}-{ended}", r.end, *rss, ready, counters))
    header = [
        "instance",
        "pid",
        "lived (s)",
        "end",
        "RSS start/peak/end MiB",
        "RSS q1 -> q4 median",
        "growth",
        "readyz ok/not/unreachable",
        "published / dead-lettered / publish failures / retries / lease changes",
    ]
    return "## Relays\n\n" + _table(header, rows)


def _dead_letters_md(rows: Sequence[dict[str, object]]) -> str:
    if not rows:
        return "## Dead letters\n\nnone\n"
    table = [(r["reason"], r["topic"], r["count"], r["archived_by"], r["last_error"]) for r in rows]
    return "## Dead letters\n\n" + _table(["reason", "topic", "count", "archived by", "a last_error"], table)


def _exits_md(relays: Sequence[RelayInfo]) -> str:
    exited = [r for r in relays if r.unexpected_exit]
    if not exited:
        return ""
    out = ["## Relays that exited on their own\n"]
    for r in exited:
        out.append(f"`{r.instance_id}` exited with code {r.exit_code} at {r.ended:.1f} s; last log lines:\n")
        out.append("```\n" + log_tail(r.log_path) + "\n```\n")
        problems = [
            line
            for line in log_tail(r.log_path, 400).splitlines()
            if '"level": "warning"' in line or '"level": "error"' in line or '"level": "critical"' in line
        ]
        if problems:
            out.append("Its last warnings and errors:\n\n```\n" + "\n".join(problems[-6:]) + "\n```\n")
    return "\n".join(out)


def _logs_md(result: SoakResult) -> str:
    found = log_findings(r.log_path for r in result.relays)
    rows = [(n, line) for n, line in found] or [("-", "none")]
    return (
        f"## Relay log warnings and errors\n\nMost frequent, over every relay (logs: `{result.log_dir}`).\n\n"
        + _table(["count", "level: message"], rows)
    )


def summary(result: SoakResult) -> str:
    lines = [f"soak {'PASS' if result.passed else 'FAIL'}"]
    lines += [f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.value} (bar {c.bar})" for c in result.checks]
    lines.append(
        "  faults: " + ", ".join(f"{f.kind}@{f.start:.0f}s" + ("!" if f.error else "") for f in result.faults)
    )
    return "\n".join(lines)
