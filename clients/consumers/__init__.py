"""Consumers of the relay's messages that process each one effectively once, through the Postgres
inbox (clients.inbox): a Kafka consumer group and Redis Streams consumer groups. docs/consumers.md
explains their guarantees and settings; `outbox-relay consume` runs one from the command line.

    consumer = KafkaInboxConsumer(ConsumerSettings(), group="billing", pattern=r"orders\\..*",
                                  handler=on_order)
    await consumer.run()          # until consumer.request_stop()

Importing this package is light; aiokafka and redis load with the consumer that needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.consumers.handlers import HandlerError, load_handler
    from clients.consumers.kafka import KafkaInboxConsumer
    from clients.consumers.messages import InvalidMessageError, kafka_subscription, shard_streams
    from clients.consumers.processing import SchemaBehindError
    from clients.consumers.redis import RedisInboxConsumer
    from clients.consumers.settings import ConsumerSettings

_WHERE = {
    "ConsumerSettings": "settings",
    "HandlerError": "handlers",
    "InvalidMessageError": "messages",
    "KafkaInboxConsumer": "kafka",
    "RedisInboxConsumer": "redis",
    "SchemaBehindError": "processing",
    "kafka_subscription": "messages",
    "load_handler": "handlers",
    "shard_streams": "messages",
}
__all__ = [
    "ConsumerSettings",
    "HandlerError",
    "InvalidMessageError",
    "KafkaInboxConsumer",
    "RedisInboxConsumer",
    "SchemaBehindError",
    "kafka_subscription",
    "load_handler",
    "shard_streams",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'clients.consumers' has no attribute {name!r}")
    return getattr(importlib.import_module(f"clients.consumers.{module}"), name)
