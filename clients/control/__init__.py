"""Typed Python clients for the Outbox Relay control plane (gRPC ControlService).

    with ControlClient() as control:                      # config from OUTBOX_CONTROL_* env vars
        print(control.status().dead_letter_count)
        control.pause("orders.*", reason="broker maintenance", ttl=timedelta(minutes=30))

    async with AsyncControlClient("relay-control:50051", token=token, tls_ca="ca.pem") as control:
        page = await control.dead_letters(topic="orders", page_size=50)

Both clients return plain frozen dataclasses (aware ``datetime``, ``timedelta``, ``UUID``), never
protobuf messages, and raise one exception hierarchy, ``ControlError``, whose text is the server's
message. The bearer token is kept out of every ``str()``/``repr()`` of clients and errors.

Configuration: each argument of the constructors falls back to an environment variable. The client
certificate has its own names, OUTBOX_CONTROL_CLIENT_CERT/_KEY: the server's OUTBOX_CONTROL_TLS_CERT/_KEY
are not read, so the client can run in the server's environment (but OUTBOX_CONTROL_ADDR is shared):

    OUTBOX_CONTROL_ADDR             host:port of the control plane (default 127.0.0.1:50051)
    OUTBOX_CONTROL_TOKEN            bearer token (read or admin), or
    OUTBOX_CONTROL_TOKEN_FILE       a file holding it
    OUTBOX_CONTROL_TLS_CA           PEM CA bundle that signed the server's certificate: enables TLS
    OUTBOX_CONTROL_CLIENT_CERT/_KEY PEM client certificate and key, for mTLS (enables TLS)
    OUTBOX_CONTROL_TLS_SERVER_NAME  expected name in the server certificate, if not the address host
    OUTBOX_CONTROL_TLS              "true": TLS verified against the system CAs (no CA file needed)
    OUTBOX_CONTROL_TIMEOUT          per-call deadline in seconds (default 10)
    OUTBOX_CONTROL_OPERATOR         who is acting, recorded in the audit log (default: the OS user)

Deadlines and retries: every call has a deadline (``timeout``, default 10 s) that covers all of its
attempts. Calls that are safe to repeat are retried on UNAVAILABLE with exponential backoff and
jitter (``retries`` more attempts, default 3) as long as the deadline leaves time for it:

* every Get/List call (status, locks, pauses, stuck, dead_letters, dead_letter, audit);
* ``replay``: the server deduplicates by request_id, and a retry sends the same request_id, so a
  replay whose first attempt got through returns that attempt's result and replays nothing more;
* ``purge`` with ``dry_run=True`` (it changes nothing);
* ``pause``: an upsert of the pattern's row, so repeating it converges on the same pause (a ``ttl``
  is measured from the attempt that lands last, i.e. at most the backoff later);
* ``resume``: a delete of the pattern's row, so repeating it converges too; if a first attempt did
  remove the pause but its answer was lost, the retry reports "nothing was paused" (``None``).

A retried pause or resume writes one audit row per attempt that reached the server.

Never retried, because a repeat after a lost answer would fail, misreport or act again: ``release_lock`` (a
compare-and-release whose repeat fails with FailedPrecondition), ``park`` (whose repeat finds the
event gone), and ``purge`` without dry_run. Those raise ``Unavailable`` and leave it to the caller
to check the state (``locks()``, ``dead_letters()``) before trying again.
"""

from __future__ import annotations

from clients.control.aio import AsyncControlClient
from clients.control.calls import ALL_TOPICS as ALL_TOPICS
from clients.control.convert import parse_event_ref as parse_event_ref
from clients.control.errors import (
    ControlError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from clients.control.results import (
    AuditEntry,
    DeadLetter,
    DeadLetterSummary,
    Instance,
    Lock,
    Page,
    Pause,
    PurgeResult,
    ReplayRecord,
    ReplayResult,
    Status,
    StuckEvent,
    TopicBacklog,
)
from clients.control.settings import DEFAULT_ADDR, DEFAULT_TIMEOUT, ControlConfig
from clients.control.settings import DEFAULT_RETRIES as DEFAULT_RETRIES
from clients.control.sync import ControlClient

# Layout: errors (the exception hierarchy), results (the returned dataclasses), settings
# (ControlConfig: arguments, environment, token, TLS), convert (protobuf <-> Python), calls (every
# RPC described once, deadlines, retries, error mapping), aio and sync (the two clients, which only
# carry out the shared calls on their kind of channel).

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_TIMEOUT",
    "AsyncControlClient",
    "AuditEntry",
    "ControlClient",
    "ControlConfig",
    "ControlError",
    "DeadLetter",
    "DeadLetterSummary",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Instance",
    "InvalidArgument",
    "Lock",
    "NotFound",
    "Page",
    "Pause",
    "PermissionDenied",
    "PurgeResult",
    "ReplayRecord",
    "ReplayResult",
    "Status",
    "StuckEvent",
    "TopicBacklog",
    "Unauthenticated",
    "Unavailable",
]
