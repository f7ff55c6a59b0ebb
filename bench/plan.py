"""What a run measures and how big: full (the published figures) or --quick (a smoke test)."""

from __future__ import annotations

from dataclasses import dataclass

SCENARIOS = ("ceilings", "drain", "latency", "keepup", "memory", "memory_large", "dbcost", "startup")
# Not part of a default run (it installs the peers into their own venv): --peers or --only peers.
PEERS = "peers"


@dataclass(frozen=True)
class Plan:
    reps: int = 3
    quick: bool = False
    backlog: int = 100_000  # rows per backlog drain
    raw_messages: int = 100_000  # messages per raw produce / XADD ceiling
    latency_seconds: float = 30.0
    latency_rates: tuple[int, ...] = (500, 2000)
    latency_warmup: float = 2.0  # seconds written at the rate before measuring
    keepup_seconds: float = 20.0
    memory_backlog: int = 1_000_000
    large_backlog: int = 12_000  # events of large_size: 3 GiB, far more than a 512 MiB container
    large_size: int = 256 * 1024
    dbcost_rows: int = 20_000
    dbcost_batches: tuple[int, ...] = (50, 200, 1000)
    writer_seconds: float = 4.0
    writer_concurrency: tuple[int, ...] = (4, 8, 16)
    kafka_chunk: int = 2000  # raw produce: send() this many, then gather their futures
    redis_chunk: int = 2000  # raw XADD: pipeline depth
    pg_drain_batch: int = 500  # the relay's default OUTBOX_BATCH_SIZE
    pg_drain_loops: int = 4
    peers_backlog: int = 50_000  # events per peer backlog drain
    peers_rate: int = 500  # single-event commits/s in the peers' latency runs
    peers_latency_seconds: float = 20.0
    peers_timeout: float = 600.0  # seconds the consumer waits for a drain's last event
    startup_starts: int = 5  # relay starts (and raw client starts) per repetition

    @classmethod
    def full(cls, reps: int = 3) -> Plan:
        return cls(reps=reps)

    @classmethod
    def smoke(cls, reps: int = 3) -> Plan:
        return cls(
            reps=reps,
            quick=True,
            backlog=10_000,
            raw_messages=10_000,
            latency_seconds=5.0,
            keepup_seconds=5.0,
            memory_backlog=100_000,
            large_backlog=2_000,  # 500 MiB
            dbcost_rows=5_000,
            writer_seconds=1.5,
            peers_backlog=5_000,
            peers_latency_seconds=5.0,
            peers_timeout=180.0,
            startup_starts=2,
        )

    @property
    def floor_seconds(self) -> float:
        """The raw produce-to-consume floor runs as long as the relay runs: Tansu's latency grows as a
        topic fills (p99 14 ms in the first 5 s, 277 ms after 25 s at 2,000/s without any relay)."""
        return self.latency_seconds


def needed_ceilings(scenarios: tuple[str, ...]) -> set[str]:
    """Raw ceilings a selection of scenarios compares against."""
    needs = {
        "ceilings": {"pg", "kafka", "redis", "pipeline", "writer"},
        "drain": {"pg", "kafka", "redis", "pipeline"},
        "keepup": {"writer"},
        "memory": set(),
        "memory_large": set(),
        "dbcost": set(),
        "latency": set(),
        "startup": set(),
        PEERS: set(),
    }
    out: set[str] = set()
    for name in scenarios:
        out |= needs[name]
    return out


def parse_only(value: str | None, peers: bool = False) -> tuple[str, ...]:
    """`--only drain,latency` -> ("drain", "latency"); None -> every scenario; `peers` (--peers) adds
    the peers scenario."""
    if not value:
        names = SCENARIOS
    else:
        names = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
        known = (*SCENARIOS, PEERS)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if peers and PEERS not in names:
        names = (*names, PEERS)
    return names
