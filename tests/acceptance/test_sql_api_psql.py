"""The SQL API (docs/sql-api.md) from plain SQL, as a service in another language or an operator
uses it: every function called through psql (the embedded server's, as in test_migrate_cli)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from relay.shared.dburl import plain_postgres_url
from tests.acceptance.test_migrate_cli import COMMAND_TIMEOUT, _psql_executable

SCRIPT = r"""
\set QUIET on
SET search_path = :"schema";
-- Publish: bytes, text and JSON payloads; a retry of the same event returns the same id.
SELECT publish_outbox('orders', 'order-1', convert_to('{"id":1}', 'UTF8'),
                      '{"content-type": "application/json"}',
                      '3f1c9a52-8e0b-5f4d-9d61-2a8f0c7e4b11') AS published;
SELECT publish_outbox('orders', 'order-1', convert_to('{"id":1}', 'UTF8'),
                      '{"content-type": "application/json"}',
                      '3f1c9a52-8e0b-5f4d-9d61-2a8f0c7e4b11') AS retried;
SELECT publish_outbox('orders', 'order-1', 'plain text'::text) IS NOT NULL AS text_payload;
SELECT publish_outbox('orders', 'order-1', '{"id": 2}'::jsonb) IS NOT NULL AS json_payload;
SELECT publish_outbox('orders', 'order-1', 'an untyped literal is text') IS NOT NULL AS untyped_literal;
-- A message_id written again with other content: SQLSTATE OBX01, nothing written.
\set ON_ERROR_STOP off
\set VERBOSITY verbose
SELECT publish_outbox('orders', 'order-1', convert_to('{"id":9}', 'UTF8'), '{}',
                      '3f1c9a52-8e0b-5f4d-9d61-2a8f0c7e4b11');
-- And bad input: SQLSTATE 22023 with the writer's message.
SELECT publish_outbox('', NULL, ''::bytea);
\set ON_ERROR_STOP on
SELECT count(*) AS events FROM outbox;
-- Leases for a job of your own.
SELECT acquire_lock('job:nightly', 'worker-a', 30) AS token \gset
SELECT :token AS token;
SELECT acquire_lock('job:nightly', 'worker-b', 30) IS NULL AS taken;
SELECT extend_lock('job:nightly', 'worker-a', :token, 30) AS extended;
SELECT release_lock('job:nightly', 'worker-a', :token) AS released;
SELECT cleanup_expired_locks() AS cleaned;
-- The relay's steps, fenced by the partition's lease.
SELECT DISTINCT partition FROM outbox \gset
SELECT acquire_lock('partition:' || :partition, 'sql-relay', 30) AS ptoken \gset
SELECT array_agg(id ORDER BY id) AS ids FROM claim_outbox_events(:partition, 'partition:' || :partition,
                                                                  'sql-relay', :ptoken, 10) \gset
SELECT cardinality(:'ids'::bigint[]) AS claimed;
SELECT complete_outbox_event((:'ids'::bigint[])[1:1], 'partition:' || :partition, 'sql-relay', :ptoken) AS completed;
SELECT record_outbox_failure((:'ids'::bigint[])[2:2], 'partition:' || :partition, 'sql-relay', :ptoken,
                             ARRAY[0.0], ARRAY['broker said no']) AS failed;
SELECT count(*) AS archived FROM archive_dead_letter((:'ids'::bigint[])[2:2], 'partition:' || :partition,
                                                     'sql-relay', :ptoken, ARRAY['rejected'], ARRAY['too big']);
SELECT id AS dead_letter_id FROM dead_letter_archive \gset
SELECT replayed FROM record_replay(NULL, NULL, NULL, NULL, NULL, 'replay-1', NULL, 0, :dead_letter_id, 100,
                                   false, 'ops');
SELECT count(*) AS pending FROM outbox;
"""

EXPECTED = """\
published
3f1c9a52-8e0b-5f4d-9d61-2a8f0c7e4b11
retried
3f1c9a52-8e0b-5f4d-9d61-2a8f0c7e4b11
text_payload
t
json_payload
t
untyped_literal
t
events
4
token
1
taken
t
extended
t
released
t
cleaned
0
claimed
4
completed
1
failed
1
archived
1
replayed
t
pending
3
"""


def test_every_function_of_the_sql_api_works_from_psql(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    script = tmp_path / "api.sql"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [
            _psql_executable(),
            "-X",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"schema={schema}",
            "-P",
            "footer=off",
            "-f",
            str(script),
            plain_postgres_url(database_url),
        ],
        env={name: value for name, value in os.environ.items() if not name.startswith("PG")},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXPECTED, result.stdout
    errors = result.stderr
    assert "ERROR:  OBX01: message_id 3f1c9a52-8e0b-5f4d-9d61-2a8f0c7e4b11 is already in the outbox" in errors
    assert "with a different payload and headers" in errors
    assert "ERROR:  22023: topic must not be empty or blank" in errors
