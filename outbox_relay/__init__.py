"""The `outbox-relay` program: the composition root that wires the relay service (relay/), the
control plane (control/) and the consumers (clients/) into one command line.

Imports run one way: this package imports the others and nothing imports it, so relay/, control/
and clients/ stay free of each other's wiring (tests/unit/test_package_boundaries.py)."""
