"""A/B of the relay's latency at steady load, for changes too small to see in the benchmark's
end-to-end p99 on a noisy machine.

    .venv/bin/python -m devtools.latency_ab --other ../worktree-of-the-other-version [--reps 4]

Runs the benchmark's peers latency scenario (bench.peers.scenario.latency_once: single-event commits
at --rate for --seconds, one `outbox-relay run`, the benchmark's consumer) alternately with this
checkout's relay (A) and the one in --other (B, put first on the relay's PYTHONPATH), in pairs whose
order flips every repetition. Besides the end-to-end figures it prints, per record, the relay's own
Kafka leg as devtools/kafka_leg_probe times it inside the relay: the wait for the batch before it in
its partition (chain), in aiokafka's queue for the broker connection (queue), the produce request
(request), and their sum (append -> acknowledgement). That leg is what the relay decides about the
broker leg; the rest (the broker's acknowledgement to the consumer's fetch) is the same for both.
Without --other, both sides run this checkout (how much two identical runs differ). The schema comes
from this checkout's migrations for both sides, so B may differ from A in code, not in schema.

Servers: the benchmark's (bench.stack.Servers: embedded, or OUTBOX_BENCH_* for external ones)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.peers import scenario
from bench.plan import Plan
from bench.stack import Servers
from bench.stats import percentile

PROBE = Path(__file__).resolve().parent / "kafka_leg_probe"
LEGS = ("chain", "queue", "request", "append->ack")


@dataclass
class Side:
    name: str
    tree: Path | None  # None: this checkout


@dataclass
class Measured:
    side: str
    p50: float
    p99: float
    pickup_p99: float
    broker_p99: float
    legs: dict[str, tuple[float, float]]  # leg -> (p50, p99) in ms


def relay_legs(directory: Path) -> dict[str, tuple[float, float]]:
    rows = [
        tuple(float(x) * 1000 for x in line.split())
        for path in directory.glob("*.txt")
        for line in path.read_text().splitlines()
        if line
    ]
    if not rows:
        raise SystemExit(f"the probe wrote nothing in {directory}: was the relay's Kafka path used?")
    columns = [[row[i] for row in rows] for i in range(3)] + [[sum(row) for row in rows]]
    return {leg: (percentile(values, 50), percentile(values, 99)) for leg, values in zip(LEGS, columns, strict=True)}


async def measure(side: Side, servers: Servers, plan: Plan) -> Measured:
    ours = scenario.Contender(scenario.OURS, Path(sys.executable), scenario.OUR_RUNNER, "ab")
    with tempfile.TemporaryDirectory(prefix="kafka-leg-") as out:
        paths = [str(PROBE)] + ([str(side.tree)] if side.tree else [])
        saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "KAFKA_LEG_PROBE_DIR")}
        os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
        os.environ["KAFKA_LEG_PROBE_DIR"] = out
        try:
            run = await scenario.latency_once(ours, servers, plan)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if run.received < run.expected:
            raise SystemExit(f"{side.name}: {run.expected - run.received} events never arrived")
        return Measured(
            side.name, run.summary["p50"], run.summary["p99"], run.pickup["p99"], run.broker["p99"], relay_legs(Path(out))
        )


def show(m: Measured) -> None:
    legs = " | ".join(f"{leg} {p50:5.2f}/{p99:6.2f}" for leg, (p50, p99) in m.legs.items())
    print(
        f"{m.side}: p50 {m.p50:6.2f} p99 {m.p99:7.2f} (pickup p99 {m.pickup_p99:6.2f}, broker leg p99 "
        f"{m.broker_p99:7.2f}) ms; relay's Kafka leg p50/p99 ms: {legs}",
        flush=True,
    )


def summary(pairs: list[tuple[Measured, Measured]]) -> None:
    print(f"\nB below A in {len(pairs)} pairs:")
    rows = [("end-to-end", lambda m: (m.p50, m.p99))] + [
        (leg, lambda m, leg=leg: m.legs[leg]) for leg in LEGS
    ]
    for label, figure in rows:
        p50_wins = sum(figure(b)[0] < figure(a)[0] for a, b in pairs)
        p99_wins = sum(figure(b)[1] < figure(a)[1] for a, b in pairs)
        print(f"  {label:12s} p50 {p50_wins}/{len(pairs)}  p99 {p99_wins}/{len(pairs)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", type=Path, help="a checkout (git worktree) of the version to compare (B)")
    parser.add_argument("--reps", type=int, default=4, help="pairs (default 4)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds written per run (default 20)")
    parser.add_argument("--rate", type=int, default=500, help="single-event commits/s (default 500)")
    args = parser.parse_args()
    if args.other is not None and not (args.other / "relay" / "__init__.py").is_file():
        parser.error(f"--other {args.other}: no relay/ package there")
    a, b = Side("A", None), Side("B", args.other.resolve() if args.other else None)
    plan = Plan(peers_rate=args.rate, peers_latency_seconds=args.seconds)
    servers = await asyncio.to_thread(Servers.start)
    try:
        pairs = []
        for rep in range(args.reps):
            first, second = (a, b) if rep % 2 == 0 else (b, a)
            one, two = await measure(first, servers, plan), await measure(second, servers, plan)
            show(one)
            show(two)
            pairs.append((one, two) if first is a else (two, one))
        summary(pairs)
    finally:
        await asyncio.to_thread(servers.stop)


if __name__ == "__main__":
    asyncio.run(main())
