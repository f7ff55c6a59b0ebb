"""The operations endpoint on OUTBOX_METRICS_ADDR: /metrics for Prometheus, /healthz for
liveness, /readyz for readiness. A tiny HTTP/1.1 responder: three GETs need no web framework."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Readiness:
    """The /readyz answer: one boolean per check, and why the failing ones fail."""

    checks: dict[str, bool]
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(self.checks.values())

    def body(self) -> dict[str, object]:
        """The checks, plus a "reasons" object (failing check -> why) only when not ready."""
        body: dict[str, object] = dict(self.checks)
        if not self.ready:
            body["reasons"] = {
                name: self.reasons.get(name, "failed") for name, ok in self.checks.items() if not ok
            }
        return body


ReadinessCheck = Callable[[], Awaitable[Readiness]]


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"address {addr!r} must be host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


class OpsServer:
    def __init__(self, addr: str, registry: CollectorRegistry, readiness: ReadinessCheck) -> None:
        self._host, self._port = split_addr(addr)
        self._registry = registry
        self._readiness = readiness
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self._host, self._port)
            log.info("serving /metrics, /healthz and /readyz on %s:%s", self._host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, content_type, body = await self._respond(method, path.split("?", 1)[0])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            readiness = await self._readiness()
            status = "200 OK" if readiness.ready else "503 Service Unavailable"
            return status, "application/json", json.dumps(readiness.body()).encode() + b"\n"
        return "404 Not Found", "text/plain", b"try /metrics, /healthz or /readyz\n"
