"""Relay configuration, read from `OUTBOX_*` environment variables (see docs/configuration.md).

DatabaseSettings (OUTBOX_DATABASE_URL, OUTBOX_SCHEMA) is shared with the control plane and lives in
relay.shared.database; it stays importable from here."""

from __future__ import annotations

import os
import socket
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from relay.shared.database import DatabaseSettings
from relay.shared.redaction import remember_secret, url_password

__all__ = [
    "DatabaseSettings",
    "InboxCleanupSettings",
    "RelaySettings",
    "SettleMode",
    "SinkKind",
    "default_instance_id",
]


class SinkKind(StrEnum):
    KAFKA = "kafka"
    REDIS = "redis"


class SettleMode(StrEnum):
    DELETE = "delete"
    RETAIN = "retain"


# The Kafka settings aiokafka accepts, checked at start (a wrong value exits 2 naming the variable and
# these values) instead of failing later, in the background, on every connection attempt.
KafkaCompression = Literal["gzip", "snappy", "lz4", "zstd"]
KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
# GSSAPI (Kerberos) and OAUTHBEARER need a ticket or a token provider the relay does not configure.
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
# The package each codec of aiokafka needs (pip install aiokafka[<extra>]).
_CODEC_EXTRAS = {"snappy": "snappy", "lz4": "lz4", "zstd": "zstd"}


def default_instance_id() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}:{os.getpid()}"


# The consumers' inbox (clients.inbox, table `inbox`): its retention clean-up, by `outbox-relay
# inbox-cleanup` or by the leader (OUTBOX_INBOX_CLEANUP), reads the same variables.
InboxRetention = Annotated[
    float, Field(gt=0, description="Seconds processed inbox rows are kept (a redelivery after that runs again).")
]
InboxCleanupBatchSize = Annotated[
    int, Field(ge=1, le=100_000, description="Inbox rows the clean-up deletes per statement.")
]
DEFAULT_INBOX_RETENTION = 7 * 86_400.0


class InboxCleanupSettings(DatabaseSettings):
    """What `outbox-relay inbox-cleanup` reads (its options override them)."""

    inbox_retention: InboxRetention = DEFAULT_INBOX_RETENTION
    inbox_cleanup_batch_size: InboxCleanupBatchSize = 1000


class RelaySettings(DatabaseSettings):
    """Everything `outbox-relay run` reads. Each field is the env var `OUTBOX_<NAME>`."""

    instance_id: str = Field(
        default_factory=default_instance_id, description="Defaults to POD_NAME, else hostname:pid."
    )
    kafka_bootstrap: str | None = Field(None, description="Kafka bootstrap servers, host:port[,host:port].")
    redis_url: SecretStr | None = Field(None, description="Redis URL for the Redis Streams sink.")
    default_sink: SinkKind = Field(SinkKind.KAFKA, description="Sink for topics no route matches.")
    routes: str = Field("", description="Comma-separated pattern=sink, shell-style, first match wins.")

    batch_size: int = Field(500, ge=1, le=10_000, description="Rows claimed per batch and partition.")
    claim_max_bytes: int = Field(
        8 * 2**20,
        ge=1024,
        description="Payload+key+header bytes one claim returns at most (but always one event).",
    )
    inflight_max_bytes: int = Field(
        128 * 2**20,
        ge=1024,
        description="Bytes of claimed events one instance holds at once, all partitions together.",
    )
    lease_ttl: float = Field(10.0, gt=0.5, description="Seconds a partition lease lives without renewal.")
    poll_interval: float = Field(1.0, gt=0, description="Seconds between polls when no notification arrives.")
    listen: bool = Field(
        True, description="LISTEN for insert notifications; false for poll-only (PgBouncer)."
    )
    fast_takeover: bool = Field(
        True,
        description="Hold a liveness lock on a dedicated session so peers take a crashed instance's"
        " partitions within a second; false behind transaction pooling (the lease TTL then bounds it).",
    )
    fast_takeover_interval: float = Field(
        0.2, gt=0, le=5, description="Seconds between looks at the peers' liveness locks."
    )
    max_attempts: int = Field(10, ge=1, description="Publish attempts before an event is dead-lettered.")
    backoff_initial: float = Field(0.5, gt=0, description="First retry delay in seconds.")
    backoff_max: float = Field(300.0, gt=0, description="Longest retry delay in seconds.")
    backoff_multiplier: float = Field(2.0, ge=1.0)
    sink_backoff_max: float = Field(
        30.0, gt=0, description="Longest pause between retries of an unreachable sink."
    )
    sink_handover_after: float = Field(
        30.0,
        ge=0,
        description="Seconds a sink may be unavailable to this instance alone before it hands its"
        " partitions to healthy peers (0: never).",
    )
    publish_timeout: float = Field(
        30.0, gt=0, description="Seconds to wait for broker acknowledgement of a batch."
    )
    unknown_topic_grace: float = Field(
        60.0, ge=0, description="Seconds an unknown topic is retried as an outage."
    )
    settle_mode: SettleMode = Field(SettleMode.DELETE, description="delete published rows, or retain them.")
    settle_delay: float = Field(
        0.05,
        ge=0,
        le=1.0,
        description="Seconds an acknowledged batch that left nothing waiting may wait to be marked done in"
        " the same statement as its partition's next claim (one round trip instead of two); 0 marks"
        " every batch done at once.",
    )
    retention: float = Field(3600.0, ge=0, description="Seconds published rows are kept in retain mode.")
    cleanup_batch_size: int = Field(1000, ge=1)
    inbox_cleanup: bool = Field(
        False, description="The leader deletes processed inbox rows older than OUTBOX_INBOX_RETENTION."
    )
    inbox_retention: InboxRetention = DEFAULT_INBOX_RETENTION
    inbox_cleanup_batch_size: InboxCleanupBatchSize = 1000
    inbox_lock_stale_threshold: float = Field(
        300.0, gt=0, description="The consumers' inbox stale threshold: the leader counts older claims."
    )
    audit_retention: int = Field(
        90 * 86_400, ge=0, description="Seconds audit_log rows are kept; the leader deletes older (0: forever)."
    )
    replay_log_retention: int = Field(
        90 * 86_400,
        ge=0,
        description="Seconds replay records are kept once their dead letter is gone (0: forever).",
    )
    dead_letter_retention: int = Field(
        0, ge=0, description="Seconds dead letters are kept (0, the default: forever; they are data)."
    )
    max_payload_bytes: int = Field(1_000_000, ge=1, description="Larger events are dead-lettered at once.")
    dlq_publish: bool = Field(False, description="Also publish dead letters to '<topic>.dlq'.")
    partitions: int = Field(16, ge=1, le=4096, description="Partition count; set at first migration.")
    run_migrations: bool = Field(False, description="Migrate to head at start (`run --migrate`).")
    pool_size: int = Field(24, ge=2, description="Most database connections this instance opens.")
    statement_cache_size: int = Field(100, ge=0, description="0 behind PgBouncer transaction pooling < 1.21.")
    startup_timeout: float = Field(
        300.0, ge=0, description="Seconds to wait for the database at start before giving up (0: forever)."
    )
    shutdown_grace: float = Field(20.0, gt=0, description="Seconds in-flight batches get on SIGTERM.")
    supervisor_give_up: float = Field(
        300.0,
        gt=0,
        description="Seconds a task may keep failing (database outages aside) before the relay exits 1.",
    )

    kafka_acks: Literal["all", "0", "1", "-1"] = Field("all", description="Producer acks; keep all.")
    kafka_compression: KafkaCompression | None = Field(
        None, description="none, gzip, snappy, lz4 or zstd; unset: none."
    )
    kafka_linger_ms: int = Field(
        0, ge=0, description="Milliseconds a batch may wait for more rows while others are in flight."
    )
    kafka_connections: int = Field(
        1,
        ge=1,
        le=32,
        description="Producers (each with its own connection to every broker); a Kafka partition"
        " always uses the same one, so up to this many produce requests to one broker overlap.",
    )
    kafka_max_request_size: int = Field(1_048_576, ge=1024)
    kafka_idempotence: bool = Field(False, description="Idempotent producer (the embedded broker lacks it).")
    kafka_security_protocol: KafkaSecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    kafka_sasl_mechanism: KafkaSaslMechanism | None = Field(
        None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; needs a SASL_* protocol."
    )
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None

    redis_maxlen: int | None = Field(None, ge=1, description="Approximate MAXLEN trimming per stream.")
    redis_shards: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description="topic=N,... shards a topic over streams 'topic:0'..'topic:N-1' by key.",
    )
    redis_scripts: bool = Field(
        True, description="One server-side script call per batch; false: a pipeline of XADDs."
    )

    control_addr: str | None = Field(None, description="Serve the gRPC control plane here inside `run`.")
    metrics_addr: str | None = Field(None, description="Serve /metrics, /healthz, /readyz here.")

    @model_validator(mode="after")
    def _remember_secrets(self) -> RelaySettings:
        if self.redis_url is not None:
            remember_secret(url_password(self.redis_url.get_secret_value()))
        if self.kafka_sasl_password is not None:
            remember_secret(self.kafka_sasl_password.get_secret_value())
        return self

    @model_validator(mode="after")
    def _check_byte_budgets(self) -> RelaySettings:
        if self.inflight_max_bytes < self.claim_max_bytes:
            raise ValueError(
                f"OUTBOX_INFLIGHT_MAX_BYTES ({self.inflight_max_bytes}) must be at least"
                f" OUTBOX_CLAIM_MAX_BYTES ({self.claim_max_bytes}): every claim takes that much of it"
            )
        return self

    @field_validator("kafka_compression", mode="before")
    @classmethod
    def _compression_name(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return None if value in ("", "none") else value
        return value

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        if isinstance(value, str):
            return value.strip().upper() or None
        return value

    @field_validator("kafka_compression")
    @classmethod
    def _codec_installed(cls, value: str | None) -> str | None:
        if value in _CODEC_EXTRAS:
            from aiokafka import codec

            if not getattr(codec, f"has_{value}")():
                raise ValueError(
                    f"OUTBOX_KAFKA_COMPRESSION={value} needs its codec, which is not installed"
                    f" (pip install 'aiokafka[{_CODEC_EXTRAS[value]}]'), or choose gzip or none"
                )
        return value

    @model_validator(mode="after")
    def _check_kafka_security(self) -> RelaySettings:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and self.kafka_sasl_mechanism is None:
            raise ValueError(
                f"OUTBOX_KAFKA_SASL_MECHANISM is required with OUTBOX_KAFKA_SECURITY_PROTOCOL="
                f"{self.kafka_security_protocol} (one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)"
            )
        if not sasl and self.kafka_sasl_mechanism is not None:
            raise ValueError(
                f"OUTBOX_KAFKA_SASL_MECHANISM={self.kafka_sasl_mechanism} needs"
                " OUTBOX_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT or SASL_SSL"
                f" (it is {self.kafka_security_protocol})"
            )
        if sasl and (not self.kafka_sasl_username or self.kafka_sasl_password is None):
            raise ValueError(
                f"OUTBOX_KAFKA_SASL_MECHANISM={self.kafka_sasl_mechanism} needs"
                " OUTBOX_KAFKA_SASL_USERNAME and OUTBOX_KAFKA_SASL_PASSWORD (or OUTBOX_KAFKA_SASL_PASSWORD_FILE)"
            )
        return self

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, value: str) -> str:
        if value.strip():  # a bad route is a configuration error, reported with the others at start
            from relay.sinks.router import parse_routes

            parse_routes(value)
        return value

    @field_validator("redis_shards", mode="before")
    @classmethod
    def _parse_shards(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        shards: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            topic, sep, count = item.partition("=")
            if not sep or not topic.strip() or not count.isdigit() or int(count) < 1:
                raise ValueError(f"OUTBOX_REDIS_SHARDS item {item!r} must be topic=N with N >= 1")
            shards[topic.strip()] = int(count)
        return shards
