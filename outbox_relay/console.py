"""The `outbox-relay` console script: answers --version and names a missing extra before importing the
commands (outbox_relay.cli), which need the `relay` extra: pip install 'outbox-relay[relay]'."""

from __future__ import annotations

from collections.abc import Callable

from relay.shared.launch import launch


def _commands() -> Callable[[], None]:
    from outbox_relay.cli import main

    return main


def main() -> None:
    launch("outbox-relay", "relay", _commands)


if __name__ == "__main__":
    main()
