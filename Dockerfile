# syntax=docker/dockerfile:1
# The Outbox Relay image (docs/installing.md):
#   docker build -t outbox-relay:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp -e OUTBOX_DATABASE_URL=... outbox-relay:0.1.0 migrate
#   docker run --rm --read-only --tmpfs /tmp -e OUTBOX_DATABASE_URL=... -e OUTBOX_KAFKA_BOOTSTRAP=... outbox-relay:0.1.0
# The entry point is the `outbox-relay` console script (default command: run); `outboxctl` is on PATH too.
# Non-root (uid 10001) and read-only-root friendly: nothing is written outside /tmp, and no bytecode.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the wheel, installed with its extras into a virtual environment ---------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY relay ./relay
COPY control ./control
COPY clients ./clients
COPY outbox_relay ./outbox_relay
# The extras: relay (migrate, run, control), cli (outboxctl), otlp (traces over OTLP).
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/outbox-relay \
    && /opt/outbox-relay/bin/pip install "$(ls /wheels/outbox_relay-*.whl)[relay,cli,otlp]" \
    && /opt/outbox-relay/bin/pip uninstall --yes pip \
    && /opt/outbox-relay/bin/python -m compileall -q /opt/outbox-relay/lib

# --- runtime: the virtual environment only ----------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Transactional-outbox relay: PostgreSQL to Kafka or Redis Streams" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/outbox-relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin relay
COPY --from=builder /opt/outbox-relay /opt/outbox-relay
USER 10001:10001
WORKDIR /tmp
# 9464: /metrics, /healthz, /readyz (OUTBOX_METRICS_ADDR=0.0.0.0:9464); 50051: the control plane.
EXPOSE 9464 50051
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
