"""What the relay, the control plane and the outboxctl CLI share, and nothing else: a leaf that imports
nothing of the service, so that every package may depend on it and none of them on each other.

- identifiers: SQL identifiers (the schema name) and how they are quoted
- database: DatabaseSettings, the settings of every command that touches the database
- redaction: secrets kept out of every log line, error and message
- dburl: database URLs for asyncpg, psycopg and SQLAlchemy
- config_errors: configuration errors as operators read them (one line per variable, no secret)
- sqlblocks: files of named SQL blocks (`-- name --`) loaded into name -> statement mappings
- version: the distribution's version (the one place it is written)
- launch: what both console scripts do first: --version, the missing-extra message, gRPC core's verbosity
"""
