"""Other outbox relays measured beside ours (`python -m bench --peers`; see bench/README.md).

The runner modules (`*_runner.py`) run in the peers' own venv (`.venv-peers`), one process per
command, and import nothing of the relay: only `bench.peers.runner`, `bench.pacing` and
`bench.workload` (stdlib and asyncpg). The harness side (`bench.peers.venv`, `bench.peers.scenario`)
runs in the bench's venv."""
