"""The gRPC control plane of Outbox Relay: status, leases, pauses, dead letters and replays (see docs/control.md)."""
