"""The pure part of fast takeover: which lease holders died, from looks at their liveness locks."""

from __future__ import annotations

from relay.config import RelaySettings
from relay.liveness import PeerTracker, liveness_key_prefix
from relay.sql import queries


def test_a_holder_seen_alive_then_without_its_lock_is_dead_once() -> None:
    tracker = PeerTracker()
    assert tracker.observe({"a": True, "b": True}) == ([], [])
    assert tracker.observe({"a": False, "b": True}) == (["a"], [])
    # Reported once: its leases were expired; a later look that still lists it finds nothing new.
    assert tracker.observe({"a": False, "b": True}) == ([], [])
    assert tracker.seen_alive == {"b"}


def test_a_holder_whose_leases_a_quicker_peer_expired_has_vanished() -> None:
    """Another survivor expired them first: this one must still look at once (its share grew)."""
    tracker = PeerTracker()
    tracker.observe({"a": True, "b": True})
    assert tracker.observe({"b": True}) == ([], ["a"])
    assert tracker.observe({"b": True}) == ([], [])


def test_a_holder_never_seen_with_a_lock_is_left_to_the_ttl() -> None:
    """Fast takeover off, an older relay, or one that died before anyone looked."""
    tracker = PeerTracker()
    assert tracker.observe({"old": False}) == ([], [])
    assert tracker.observe({"old": False}) == ([], [])


def test_a_frozen_holder_keeps_its_lock_and_is_never_dead() -> None:
    tracker = PeerTracker()
    for _ in range(5):
        assert tracker.observe({"frozen": True}) == ([], [])


def test_a_holder_that_comes_back_is_watched_again() -> None:
    tracker = PeerTracker()
    tracker.observe({"a": True})
    assert tracker.observe({"a": False}) == (["a"], [])
    assert tracker.observe({"a": True}) == ([], [])
    assert tracker.observe({"a": False}) == (["a"], [])


def test_a_holder_without_leases_is_forgotten() -> None:
    tracker = PeerTracker()
    tracker.observe({"a": True})
    assert tracker.observe({}) == ([], ["a"])
    assert tracker.observe({"a": False}) == ([], []), "not seen alive since it last held a lease"


def test_lock_keys_are_per_schema() -> None:
    assert liveness_key_prefix("s1") != liveness_key_prefix("s2")
    assert liveness_key_prefix("s1") + "relay-1" != liveness_key_prefix("s1") + "relay-2"


def test_fast_takeover_is_on_by_default_and_can_be_switched_off(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("OUTBOX_DATABASE_URL", "postgresql://u@h/db")
    assert RelaySettings().fast_takeover is True
    monkeypatch.setenv("OUTBOX_FAST_TAKEOVER", "false")
    assert RelaySettings().fast_takeover is False


def test_the_expiry_is_guarded_by_the_lock_in_the_same_statement() -> None:
    q = queries("s")
    assert "pg_locks" in q["liveness_expire_dead"] and "NOT EXISTS" in q["liveness_expire_dead"]
    assert "hashtextextended($1 || h.holder, 0)" in q["liveness_peers"]
