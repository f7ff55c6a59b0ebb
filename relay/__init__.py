"""Outbox Relay: moves committed outbox rows from PostgreSQL to Kafka or Redis Streams."""

from relay.shared.version import __version__

__all__ = ["__version__"]
