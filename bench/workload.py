"""The events every scenario and ceiling uses: the same payload bytes, keys and headers whether they
are bulk-inserted by SQL or built in Python for a raw ceiling."""

from __future__ import annotations

import json
import random
import time
import uuid

import asyncpg

KEYS = 1000
SIZES: dict[str, int] = {"200B": 200, "4KiB": 4096}
HEADERS = {"content-type": "application/json"}
HEADERS_JSON = json.dumps(HEADERS, separators=(",", ":"))

# Incompressible padding (random hex), one per key: Postgres TOAST-compresses large values, so a
# padding of one repeated character would make 4 KiB rows artificially cheap to store and read.
_PADS = [random.Random(key).randbytes(SIZES["4KiB"] // 2).hex() for key in range(KEYS)]
_BASE = '{{"n":{n},"key":"k{k}","pad":"{pad}"}}'


def key(n: int) -> str:
    return f"k{n % KEYS}"


def payload(n: int, size: int) -> bytes:
    """Event n's JSON payload, exactly `size` bytes (or the bare skeleton if `size` is smaller)."""
    bare = _BASE.format(n=n, k=n % KEYS, pad="")
    pad = _PADS[n % KEYS][: max(size - len(bare), 0)]
    return _BASE.format(n=n, k=n % KEYS, pad=pad).encode()


def timed_payload(n: int, size: int) -> bytes:
    """A payload carrying the wall-clock time it was made (for commit-to-consumer latency)."""
    stamp = f"{time.time():.6f}"
    bare = f'{{"t":{stamp},"n":{n},"pad":""}}'
    pad = _PADS[n % KEYS][: max(size - len(bare), 0)]
    return f'{{"t":{stamp},"n":{n},"pad":"{pad}"}}'.encode()


def kafka_headers() -> list[tuple[str, bytes]]:
    """What the relay sends: the row's headers plus a message-id."""
    return [("content-type", b"application/json"), ("message-id", str(uuid.uuid4()).encode())]


def redis_fields(n: int, size: int) -> dict[str, bytes | str]:
    """What the relay XADDs for a row (see relay/sinks/redis.py: stream_fields)."""
    return {
        "message-id": str(uuid.uuid4()),
        "payload": payload(n, size),
        "headers": HEADERS_JSON,
        "key": key(n),
    }


# One statement ("benchprobe" marks the bench's own statements in pg_stat_statements, which drops
# comments): as fast as Postgres inserts, independent of the writer API. Same bytes as payload().
_BULK_INSERT = """/* bench */
INSERT INTO "{schema}".outbox (topic, key, payload, headers)
SELECT $1, 'k' || (g % {keys}),
       convert_to(format('{{"n":%s,"key":"k%s","pad":"%s"}}', g, g % {keys},
           left(($4::text[])[g % {keys} + 1],
                greatest($3 - length(format('{{"n":%s,"key":"k%s","pad":""}}', g, g % {keys})), 0))),
           'UTF8'),
       $5::jsonb
FROM generate_series($2::bigint, $2::bigint + $6 - 1) AS benchprobe_rows(g)
"""


async def bulk_insert(
    conn: asyncpg.Connection, schema: str, topic: str, count: int, size: int, *, first: int = 0
) -> float:
    """Insert `count` pending rows in one statement (one commit); returns the seconds it took."""
    started = time.perf_counter()
    await conn.execute(
        _BULK_INSERT.format(schema=schema, keys=KEYS), topic, first, size, _PADS, HEADERS_JSON, count
    )
    return time.perf_counter() - started


_LARGE_PADS = (
    16  # distinct paddings: TOAST compresses each value alone, so repeating them across rows is fine
)


def _large_pads(size: int) -> list[str]:
    return [random.Random(KEYS + i).randbytes(size // 2 + 1).hex()[:size] for i in range(_LARGE_PADS)]


_BULK_INSERT_LARGE = """/* bench */
INSERT INTO "{schema}".outbox (topic, key, payload, headers)
SELECT $1, 'k' || (g % {keys}),
       convert_to(format('{{"n":%s,"key":"k%s","pad":"%s"}}', g, g % {keys},
           left(($4::text[])[g % {pads} + 1],
                greatest($3 - length(format('{{"n":%s,"key":"k%s","pad":""}}', g, g % {keys})), 0))),
           'UTF8'),
       $5::jsonb
FROM generate_series($2::bigint, $2::bigint + $6 - 1) AS benchprobe_rows(g)
"""


async def bulk_insert_large(
    conn: asyncpg.Connection, schema: str, topic: str, count: int, size: int, *, first: int = 0
) -> float:
    """Like bulk_insert, for payloads of any size (e.g. 256 KiB): the same JSON shape, exactly `size`
    bytes, padded with incompressible random hex. One statement, one commit; returns its seconds."""
    started = time.perf_counter()
    await conn.execute(
        _BULK_INSERT_LARGE.format(schema=schema, keys=KEYS, pads=_LARGE_PADS),
        topic,
        first,
        size,
        _large_pads(size),
        HEADERS_JSON,
        count,
        timeout=1800,
    )
    return time.perf_counter() - started
