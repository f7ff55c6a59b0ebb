"""Outbox Relay: moves committed outbox rows from PostgreSQL to Kafka or Redis Streams."""

__version__ = "0.1.0"
