"""Which consumer of a group works on which stream: one at a time, or per-key order would not hold
(a Redis consumer group hands a stream's entries to whichever member reads first).

Each member heartbeats into a sorted set (`outbox:consumers:<group>:members`, scored by the Redis
server's clock) and owns streams through leases (`outbox:consumers:<group>:owner:<stream>`, SET NX
PX, renewed by compare-and-expire). A member aims at its fair share, ceil(streams / live members):
it takes free streams up to it and gives back any above it, so streams spread as members come and
go; a dead member's leases expire after OUTBOX_REDIS_LEASE_TTL and are taken by the others."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
return redis.call('ZCARD', KEYS[1])
"""
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def fair_share(streams: int, members: int) -> int:
    return math.ceil(streams / max(1, members))


def preference(streams: Sequence[str], member: str) -> list[str]:
    """The order in which `member` tries free streams: rotated by its name, so members starting
    together go for different streams first."""
    if not streams:
        return []
    start = zlib.crc32(member.encode()) % len(streams)
    return [*streams[start:], *streams[:start]]


class StreamOwnership:
    def __init__(self, client: Any, group: str, member: str, streams: Sequence[str], ttl: float) -> None:
        self.client = client
        self.member = member
        self.streams = list(streams)
        self.ttl_ms = int(ttl * 1000)
        self.prefix = f"outbox:consumers:{group}"
        self._heartbeat = client.register_script(HEARTBEAT)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)

    def owner_key(self, stream: str) -> str:
        return f"{self.prefix}:owner:{stream}"

    async def members(self) -> int:
        return int(await self._heartbeat(keys=[f"{self.prefix}:members"], args=[self.member, self.ttl_ms]))

    async def renew(self, stream: str) -> bool:
        return bool(await self._renew(keys=[self.owner_key(stream)], args=[self.member, self.ttl_ms]))

    async def acquire(self, stream: str) -> bool:
        return bool(await self.client.set(self.owner_key(stream), self.member, nx=True, px=self.ttl_ms))

    async def release(self, stream: str) -> None:
        await self._release(keys=[self.owner_key(stream)], args=[self.member])

    async def leave(self) -> None:
        await self.client.zrem(f"{self.prefix}:members", self.member)

    async def plan(self, owned: set[str]) -> tuple[set[str], set[str], set[str]]:
        """One round: (kept, newly acquired, to give back). Renews what is owned (what fails to
        renew is lost: neither kept nor given back), then moves toward the fair share."""
        share = fair_share(len(self.streams), await self.members())
        kept = {stream for stream in sorted(owned) if await self.renew(stream)}
        surplus = set(sorted(kept)[share:]) if len(kept) > share else set()
        acquired: set[str] = set()
        for stream in preference(self.streams, self.member):
            if len(kept) + len(acquired) >= share:
                break
            if stream not in kept and await self.acquire(stream):
                acquired.add(stream)
        return kept - surplus, acquired, surplus
