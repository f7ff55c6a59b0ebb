"""The peers' own venv (`.venv-peers`, created on first use): a Python 3.12+ interpreter when the
machine has one (omni-box needs it), the peers installed from PyPI at the versions the runners were
written against. Bump a pin after reading that release's docs and checking its runner still follows them."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent.parent
VENV = ROOT / ".venv-peers"

# peer -> (distribution whose version is reported, pip requirements, runner module, minimum Python)
PEERS: dict[str, tuple[str, tuple[str, ...], str, tuple[int, int]]] = {
    "txoutbox": (
        "txoutbox",
        ("txoutbox[postgres]==0.2.2", "aiokafka"),
        "bench.peers.txoutbox_runner",
        (3, 11),
    ),
    "faststream-outbox": (
        "faststream-outbox",
        ("faststream-outbox[asyncpg]==0.19.0", "faststream[kafka]"),
        "bench.peers.faststream_outbox_runner",
        (3, 11),
    ),
    "omni-box": ("omni-box", ("omni-box[postgres,kafka]==0.3.1",), "bench.peers.omnibox_runner", (3, 12)),
}
WANTED = (3, 12)  # the highest minimum above


@dataclass
class PeersEnv:
    python: Path | None
    versions: dict[str, str] = field(default_factory=dict)  # peer -> installed version
    skipped: dict[str, str] = field(default_factory=dict)  # peer -> why it is not measured

    @property
    def available(self) -> list[str]:
        return [peer for peer in PEERS if peer in self.versions]


def python_version(executable: str) -> tuple[int, int] | None:
    """(major, minor) of an interpreter, or None when it does not run."""
    try:
        out = subprocess.run(
            [executable, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def candidates(environ: dict[str, str] | None = None) -> list[str]:
    """Interpreters to try, best first: PEERS_PYTHON, python3.12/3.13/3.14 on PATH, pyenv's versions,
    then the bench's own Python (good for every peer but omni-box when it is 3.11)."""
    env = os.environ if environ is None else environ
    found: list[str] = []
    if env.get("PEERS_PYTHON"):
        found.append(env["PEERS_PYTHON"])
    for name in ("python3.12", "python3.13", "python3.14"):
        path = shutil.which(name, path=env.get("PATH"))
        if path:
            found.append(path)
    pyenv_root = env.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    for minor in (12, 13, 14):
        found += sorted(glob.glob(os.path.join(pyenv_root, "versions", f"3.{minor}.*", "bin", "python")))
    found.append(sys.executable)
    return list(dict.fromkeys(found))


def choose_python(
    options: Iterable[str], version_of: Callable[[str], tuple[int, int] | None] = python_version
) -> tuple[str | None, tuple[int, int] | None]:
    """The first interpreter that is WANTED or newer, else the newest one that is 3.11 or newer."""
    best: tuple[str | None, tuple[int, int] | None] = (None, None)
    for option in options:
        version = version_of(option)
        if version is None:
            continue
        if version >= WANTED:
            return option, version
        if version >= (3, 11) and (best[1] is None or version > best[1]):
            best = (option, version)
    return best


def requirements(peers: Iterable[str]) -> list[str]:
    return [req for peer in peers for req in PEERS[peer][1]]


def ensure(venv: Path = VENV) -> PeersEnv:
    """Creates (or reuses) the peers' venv and installs the peers; never raises for a peer that cannot
    be installed: it is reported as skipped with the reason."""
    venv_python = venv / "bin" / "python"
    current = python_version(str(venv_python)) if venv_python.exists() else None
    if current is None or current < WANTED:
        chosen, version = choose_python(candidates())
        if chosen is None or version is None:
            return PeersEnv(None, skipped=dict.fromkeys(PEERS, "no Python 3.11 or newer found"))
        if current is None or version > current:
            log.info("creating %s with %s (Python %d.%d)", venv, chosen, *version)
            if venv.exists():
                shutil.rmtree(venv)
            subprocess.run([chosen, "-m", "venv", str(venv)], check=True)
            current = version
    env = PeersEnv(venv_python)
    wanted = []
    for peer, (_, _, _, minimum) in PEERS.items():
        if current < minimum:
            env.skipped[peer] = (
                f"needs Python {minimum[0]}.{minimum[1]}+; the newest found is {current[0]}.{current[1]}"
                " (set PEERS_PYTHON to a newer interpreter)"
            )
        else:
            wanted.append(peer)
    reqs = requirements(wanted)
    stamp = venv / f".installed-{hashlib.sha1(' '.join(reqs).encode()).hexdigest()[:12]}"
    if not stamp.exists():
        log.info("installing the peers into %s: %s", venv, " ".join(reqs))
        done = subprocess.run(
            [str(venv_python), "-m", "pip", "install", "-q", *reqs], capture_output=True, text=True
        )
        if done.returncode != 0:
            reason = f"pip install failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
            env.skipped.update(dict.fromkeys(wanted, reason))
            return env
        for old in venv.glob(".installed-*"):
            old.unlink()
        stamp.touch()
    env.versions = installed_versions(venv_python, [PEERS[p][0] for p in wanted], wanted)
    for peer in wanted:
        if peer not in env.versions:
            env.skipped[peer] = "not importable after installation"
    return env


def installed_versions(python: Path, distributions: list[str], peers: list[str]) -> dict[str, str]:
    code = (
        "import json, sys\nfrom importlib import metadata\nout = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try: out[name] = metadata.version(name)\n"
        "    except metadata.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run(
        [str(python), "-c", code, *distributions], capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout)
    return {peer: found[dist] for peer, dist in zip(peers, distributions, strict=True) if dist in found}


def library_versions(
    python: Path, names: Iterable[str] = ("aiokafka", "asyncpg", "SQLAlchemy", "faststream")
) -> str:
    """`aiokafka 0.14.0, asyncpg 0.32.0, ...` in the peers' venv (for the results' machine table)."""
    names = list(names)
    versions = installed_versions(python, names, names)
    return ", ".join(f"{name} {versions[name]}" for name in names if name in versions)
