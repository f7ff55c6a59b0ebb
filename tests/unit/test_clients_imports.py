"""The writer stays light: importing clients (and clients.writer) must not load the control client's
gRPC, protobuf or pydantic; the control-plane names still resolve from clients, on first use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("grpc", "google.protobuf", "pydantic")


def _modules_after(code: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


def _heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_importing_the_writer_loads_no_grpc_protobuf_or_pydantic() -> None:
    modules = _modules_after("import clients, clients.writer\nfrom clients import enqueue, aenqueue, OutboxEvent")
    assert _heavy(modules) == []
    assert "clients.control" not in modules


def test_control_names_still_resolve_from_clients() -> None:
    modules = _modules_after(
        "import clients, clients.control\n"
        "from clients import AsyncControlClient, ControlClient, ControlError, NotFound\n"
        "assert ControlClient is clients.control.ControlClient\n"
        "assert AsyncControlClient is clients.control.AsyncControlClient\n"
        "assert issubclass(NotFound, ControlError)\n"
        "assert set(clients.__all__) <= set(dir(clients))\n"
    )
    assert "grpc" in modules


def test_the_writer_and_leases_load_only_the_standard_library() -> None:
    """An application that only writes events installs the base package (no dependencies): importing
    what it uses may load nothing beyond the standard library (its own driver it imports itself)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    probe = (
        "import json, sys\nbaseline = set(sys.modules)\n"
        "import clients, clients.writer, clients.leases\n"
        "from clients import enqueue, aenqueue, enqueue_many, OutboxEvent, lease, lease_sync\n"
        "print(json.dumps(sorted(set(sys.modules) - baseline)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    foreign = [m for m in loaded if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "clients"]
    assert foreign == []
