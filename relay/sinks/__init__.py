"""Sinks are the only code that talks to brokers."""

from relay.sinks.base import Sink, SinkUnavailableError

__all__ = ["Sink", "SinkUnavailableError"]
