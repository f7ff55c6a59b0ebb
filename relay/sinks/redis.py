"""Redis Streams sink: XADD to the stream named by the topic (optionally sharded by key)."""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, NoReturn

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay.config import RelaySettings
from relay.events import DEFERRED, PUBLISHED, OutboxRow, Outcome, PublishResult
from relay.faults import Fault, classify_redis_error, classify_redis_reply_error
from relay.sinks.base import (
    MESSAGE_ID_HEADER,
    ConnectFailure,
    ConnectState,
    SinkUnavailableError,
    is_tls_error,
)

log = logging.getLogger(__name__)


def stream_name(row: OutboxRow, shards: dict[str, int]) -> str:
    count = shards.get(row.topic)
    if not count:
        return row.topic
    shard_by = row.key if row.key is not None else str(row.message_id)
    return f"{row.topic}:{zlib.crc32(shard_by.encode()) % count}"


# One XADD per entry. KEYS: the batch's streams, each once. ARGV[1]: the approximate MAXLEN (0: none);
# ARGV[2]: the entries, one after the other, as length-prefixed strings ("<length>:<bytes>"): the
# entry's stream (its 1-based index in KEYS), its number of fields, then the field-value pairs. One
# argument rather than one per field: redis-py packs each argument in Python, which cost the relay
# more than the XADDs cost Redis. Returns, per entry, the new entry id, or '!' and the error: one
# entry's failure (say WRONGTYPE) neither stops nor undoes the others, but after a stream's entry
# failed its later entries are not added ('!DEFERRED'), so an event never lands ahead of an earlier
# event of its key (a key always maps to one stream).
XADD_BATCH_SCRIPT = """
local maxlen = tonumber(ARGV[1])
local entries = ARGV[2]
local at = 1
local function take()
  local colon = string.find(entries, ':', at, true)
  local stop = colon + tonumber(string.sub(entries, at, colon - 1))
  local value = string.sub(entries, colon + 1, stop)
  at = stop + 1
  return value
end
local ids = {}
local failed = {}
while at <= #entries do
  local stream = KEYS[tonumber(take())]
  local fields = tonumber(take())
  local args = {stream}
  if maxlen > 0 then
    args[2], args[3], args[4] = 'MAXLEN', '~', maxlen
  end
  args[#args + 1] = '*'
  for _ = 1, 2 * fields do
    args[#args + 1] = take()
  end
  local i = #ids + 1
  if failed[stream] then
    ids[i] = '!DEFERRED'
  else
    local reply = redis.pcall('XADD', unpack(args))
    if type(reply) == 'table' and reply.err then
      ids[i] = '!' .. reply.err
      failed[stream] = true
    else
      ids[i] = reply
    end
  end
end
return ids
"""


def stream_fields(row: OutboxRow) -> dict[str, bytes | str]:
    fields: dict[str, bytes | str] = {
        MESSAGE_ID_HEADER: str(row.message_id),
        "payload": row.payload,
        "headers": headers_json(row.headers),
    }
    if row.key is not None:
        fields["key"] = row.key
    if "traceparent" in row.headers:
        fields["traceparent"] = row.headers["traceparent"]
    return fields


def script_args(
    maxlen: int | None, entries: Iterable[tuple[str, dict[str, bytes | str]]]
) -> tuple[list[str], list[bytes | int]]:
    """KEYS and ARGV of XADD_BATCH_SCRIPT for (stream, fields) entries, in order."""
    streams: dict[str, int] = {}
    packed: list[bytes] = []
    for stream, fields in entries:
        index = streams.setdefault(stream, len(streams) + 1)
        packed.append(_entry_head(index, len(fields)))
        for name, value in fields.items():
            data = value.encode() if isinstance(value, str) else value
            packed += (_prefixed_name(name), b"%d:" % len(data), data)
    return list(streams), [maxlen or 0, b"".join(packed)]


@lru_cache(maxsize=256)
def _entry_head(index: int, fields: int) -> bytes:
    return _prefixed(b"%d" % index) + _prefixed(b"%d" % fields)


@lru_cache(maxsize=64)
def _prefixed_name(name: str) -> bytes:
    return _prefixed(name.encode())


def _prefixed(data: bytes) -> bytes:
    return b"%d:%b" % (len(data), data)


def headers_json(headers: dict[str, str]) -> str:
    return _compact_json(tuple(headers.items())) if headers else "{}"


@lru_cache(maxsize=4096)
def _compact_json(items: tuple[tuple[str, str], ...]) -> str:
    # Events of one producer tend to carry the same headers: encode each set once.
    return json.dumps(dict(items), separators=(",", ":"))


class RedisSink:
    name = "redis"

    def __init__(self, settings: RelaySettings) -> None:
        if settings.redis_url is None:
            raise ValueError("OUTBOX_REDIS_URL is required when a topic routes to Redis")
        self._settings = settings
        self._client: aioredis.Redis | None = None
        self._connected = False
        self._xadd_batch: Any = None
        self.connection = ConnectState("redis", log)

    async def start(self) -> None:
        if self._client is None:
            assert self._settings.redis_url is not None
            self._client = aioredis.from_url(
                self._settings.redis_url.get_secret_value(),
                socket_timeout=self._settings.publish_timeout,
                socket_connect_timeout=5,
                health_check_interval=10,
            )
            self._xadd_batch = self._client.register_script(XADD_BATCH_SCRIPT)
            # Readiness should not wait for the first event routed here; an unreachable Redis at
            # start is not fatal (publish retries it), it only leaves the sink "not connected".
            try:
                await self._client.ping()
            except (RedisError, OSError) as exc:
                self._connect_failed(exc)
            else:
                self._connected = True
                self.connection.connected()

    def _connect_failed(self, exc: BaseException) -> None:
        """Counts and reports a failed connection; an error, not "not reachable yet", when it is
        not the network (a wrong password, a TLS failure...)."""
        kind = redis_connect_failure(exc)
        detail = type(exc).__name__ if kind is ConnectFailure.NETWORK else f"{type(exc).__name__}: {exc}"
        self.connection.failed(kind, detail)

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def is_connected(self) -> bool:
        return self._client is not None and self._connected

    def destination(self, row: OutboxRow) -> tuple[str, int | None]:
        """The stream (a shard of the topic's when OUTBOX_REDIS_SHARDS says so); no partition."""
        return stream_name(row, self._settings.redis_shards), None

    async def probe(self) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            self._connect_failed(exc)
            return False
        self._connected = True
        self.connection.connected()
        return True

    async def publish(self, rows: Sequence[OutboxRow]) -> list[PublishResult]:
        client = self._client
        if client is None:
            raise RuntimeError("RedisSink.publish before start")
        try:
            if self._settings.redis_scripts:
                results = await self._publish_scripted(client, rows)
            else:
                results = await self._publish_pipelined(client, rows)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self._connected = False
            if redis_connect_failure(exc) is not ConnectFailure.NETWORK:
                self._connect_failed(exc)
            raise SinkUnavailableError(f"redis unreachable: {type(exc).__name__}") from exc
        self._connected = True
        return results

    async def _publish_scripted(
        self, client: aioredis.Redis, rows: Sequence[OutboxRow]
    ) -> list[PublishResult]:
        """The whole batch in one command of three arguments: redis-py's packing and reply parsing
        per command (and per argument) cost more than the XADDs themselves."""
        shards = self._settings.redis_shards
        streams, args = script_args(
            self._settings.redis_maxlen, ((stream_name(row, shards), stream_fields(row)) for row in rows)
        )
        try:
            replies = await self._xadd_batch(keys=streams, args=args, client=client)
        except ResponseError as exc:
            # Not one entry's fault (those come back per entry): scripts refused (NOPERM), out of
            # memory, busy. Counting attempts would dead-letter good events, so: unavailable.
            self._refused(exc, "OUTBOX_REDIS_SCRIPTS=false uses plain XADDs")
        return [self._classify_scripted(reply) for reply in replies]

    async def _publish_pipelined(
        self, client: aioredis.Redis, rows: Sequence[OutboxRow]
    ) -> list[PublishResult]:
        """In MULTI/EXEC: Redis refuses a server state (OOM, READONLY...) when a command is queued and
        then runs none of them, so a stream never gets a later entry without the earlier ones."""
        pipe = client.pipeline(transaction=True)
        for row in rows:
            self._xadd(pipe, row, stream_name(row, self._settings.redis_shards), stream_fields(row))
        try:
            replies = await pipe.execute(raise_on_error=False)
        except ResponseError as exc:
            self._refused(exc, "")
        return [self._classify(reply) for reply in replies]

    def _refused(self, exc: ResponseError, hint: str) -> NoReturn:
        self._connected = False
        fault, _ = classify_redis_error(exc)
        if fault is Fault.SINK_UNAVAILABLE:
            log.warning("redis cannot take writes now: %s", exc)
        else:
            log.error("redis refused the batch: %s%s", exc, f" ({hint})" if hint else "")
        raise SinkUnavailableError(f"redis refused the batch: {exc}") from exc

    def _xadd(self, pipe: Any, row: OutboxRow, stream: str, fields: dict[str, bytes | str]) -> None:
        maxlen = self._settings.redis_maxlen
        if maxlen:
            pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)
        else:
            pipe.xadd(stream, fields)

    @staticmethod
    def _classify_scripted(reply: object) -> PublishResult:
        if isinstance(reply, bytes) and reply.startswith(b"!"):
            message = reply[1:].decode(errors="replace")
            return DEFERRED if message == "DEFERRED" else _reply_error(message)
        return PUBLISHED

    @staticmethod
    def _classify(reply: object) -> PublishResult:
        if isinstance(reply, Exception):
            return _outcome_of(*classify_redis_error(reply), f"{type(reply).__name__}: {reply}")
        return PUBLISHED

    async def publish_dead_letters(self, letters: Sequence[tuple[OutboxRow, str]]) -> None:
        if self._client is None:
            raise SinkUnavailableError("not connected to redis")
        pipe = self._client.pipeline(transaction=False)
        for row, reason in letters:
            pipe.xadd(f"{row.topic}.dlq", stream_fields(row) | {"dead-letter-reason": reason})  # type: ignore[arg-type]
        await pipe.execute()


def redis_connect_failure(exc: BaseException) -> ConnectFailure:
    """The kind of a failed connection to Redis (see relay.sinks.base.ConnectFailure)."""
    if is_tls_error(exc):
        return ConnectFailure.TLS
    if isinstance(exc, AuthenticationError | AuthorizationError):
        return ConnectFailure.AUTHENTICATION
    if isinstance(exc, ResponseError):
        # NOAUTH, WRONGPASS and "AUTH ... without any password configured" are the credentials';
        # an unknown command (HELLO, CLIENT) on a server too old for the client is unsupported.
        text = str(exc).upper()
        if any(word in text for word in ("NOAUTH", "WRONGPASS", "AUTH", "NOPERM")):
            return ConnectFailure.AUTHENTICATION
        if "UNKNOWN COMMAND" in text:
            return ConnectFailure.UNSUPPORTED
        return ConnectFailure.OTHER
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | TimeoutError):
        return ConnectFailure.NETWORK
    return ConnectFailure.OTHER


def _reply_error(message: str) -> PublishResult:
    """One XADD's error reply: a server state (OOM, READONLY...) is the sink's, anything else the entry's."""
    return _outcome_of(*classify_redis_reply_error(message), f"ResponseError: {message}")


def _outcome_of(fault: Fault, reason: str, detail: str) -> PublishResult:
    if fault is Fault.SINK_UNAVAILABLE:
        return PublishResult(Outcome.UNAVAILABLE, reason, detail)
    return PublishResult(Outcome.RETRY, reason, detail)
