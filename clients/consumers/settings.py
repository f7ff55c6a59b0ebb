"""What `outbox-relay consume` and the consumer classes read: OUTBOX_* environment variables, as the
relay (docs/consumers.md lists them). The inbox's own settings (OUTBOX_INBOX_LOCK_STALE_THRESHOLD,
OUTBOX_INBOX_MAX_ATTEMPTS, POD_NAME) are read by clients.inbox."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from relay.shared.database import DatabaseSettings
from relay.shared.redaction import remember_secret, url_password


class ConsumerSettings(DatabaseSettings):
    """Each field is the env var `OUTBOX_<NAME>`."""

    kafka_bootstrap: str | None = Field(None, description="Kafka bootstrap servers, host:port[,host:port].")
    redis_url: SecretStr | None = Field(None, description="Redis URL for the Redis Streams consumer.")
    consumer_concurrency: int = Field(
        8, ge=1, le=1024, description="Messages handled at once (each partition or stream one at a time)."
    )
    consumer_batch_size: int = Field(100, ge=1, le=10_000, description="Messages fetched per read.")
    consumer_backoff_initial: float = Field(0.2, gt=0, description="First retry delay of a message, seconds.")
    consumer_backoff_max: float = Field(10.0, gt=0, description="Longest retry delay of a message, seconds.")
    consumer_shutdown_grace: float = Field(
        30.0, gt=0, description="Seconds the handlers in progress get to finish on SIGTERM."
    )
    consumer_startup_timeout: float = Field(
        300.0, ge=0, description="Seconds to wait for the database at start (0: forever)."
    )
    kafka_session_timeout: float = Field(
        10.0, ge=1, description="Seconds without heartbeat before the group gives a member's partitions away."
    )
    kafka_metadata_max_age: float = Field(
        30.0, gt=0, description="Seconds between looks for new topics matching a pattern."
    )
    kafka_security_protocol: str = Field("PLAINTEXT")
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    redis_claim_idle: float = Field(
        60.0, gt=0, description="Seconds a delivered entry may stay unacknowledged before it is reclaimed."
    )
    redis_max_deliveries: int = Field(
        10, ge=1, description="Deliveries of one entry before it is moved to '<stream>:dlq'."
    )
    redis_lease_ttl: float = Field(
        10.0, ge=1, description="Seconds a consumer owns a stream without renewing (then another takes it)."
    )
    metrics_addr: str | None = Field(None, description="Serve /metrics, /healthz, /readyz here.")

    @model_validator(mode="after")
    def _remember_secrets(self) -> ConsumerSettings:
        if self.redis_url is not None:
            remember_secret(url_password(self.redis_url.get_secret_value()))
        if self.kafka_sasl_password is not None:
            remember_secret(self.kafka_sasl_password.get_secret_value())
        if self.consumer_backoff_max < self.consumer_backoff_initial:
            raise ValueError("OUTBOX_CONSUMER_BACKOFF_MAX must be at least OUTBOX_CONSUMER_BACKOFF_INITIAL")
        return self
