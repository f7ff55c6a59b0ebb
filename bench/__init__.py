"""Outbox Relay benchmarks: `python -m bench` (or `./dev bench`). See bench/README.md.

Every figure that matters is a ratio to a raw ceiling measured in the same run on the same machine
(asyncpg, aiokafka, redis.asyncio doing the same work without the relay), and every figure is the
median of `--reps` repetitions."""
