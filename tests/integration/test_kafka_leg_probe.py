"""devtools/kafka_leg_probe wraps private parts of aiokafka and of the relay's Kafka batches: this
fails when an upgrade moves them, instead of the A/B harness quietly measuring nothing. The probe
runs in a child process, since it patches classes for good."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from devtools.embedded import StackEndpoints
from devtools.latency_ab import LEGS, PROBE, relay_legs

CHILD = textwrap.dedent(
    """
    import asyncio, importlib.util, sys
    from pathlib import Path
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap, topic, probe_file, out = sys.argv[1:5]
    spec = importlib.util.spec_from_file_location("kafka_leg_probe", probe_file)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    probe._install(Path(out))
    from relay.sinks.kafka_batches import SharedBatches

    async def main():
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(topic, 1, 1)])
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            await producer.partitions_for(topic)
            shared = SharedBatches(producer)
            batches = [shared.append(topic, 0, b"key", b"event %d" % n, []) for n in range(3)]
            await asyncio.wait({batch.delivery for batch in batches})
            assert all(batch.delivery.exception() is None for batch in batches)
        finally:
            await producer.stop()
            await admin.delete_topics([topic])
            await admin.close()

    asyncio.run(main())
    """
)


def test_the_probe_times_every_record_through_the_relays_kafka_batches(
    stack: StackEndpoints, tmp_path: Path
) -> None:
    topic = f"probe.{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, stack.kafka_bootstrap, topic, str(PROBE / "sitecustomize.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    [written] = tmp_path.glob("*.txt")
    lines = written.read_text().splitlines()
    assert len(lines) == 3  # one per record, whichever batch carried it
    assert all(float(value) >= 0 for line in lines for value in line.split())
    legs = relay_legs(tmp_path)
    assert set(legs) == set(LEGS)
    assert legs["append->ack"][0] > 0  # a produce request to a real broker takes time
