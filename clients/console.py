"""The `outboxctl` console script: answers --version and names a missing extra before importing the
CLI (clients.cli), which needs the `cli` extra: pip install 'outbox-relay[cli]'."""

from __future__ import annotations

from collections.abc import Callable

from relay.shared.launch import launch


def _cli() -> Callable[[], None]:
    from clients.cli import main

    return main


def main() -> None:
    launch("outboxctl", "cli", _cli, error_prefix="outboxctl: error: ")


if __name__ == "__main__":
    main()
