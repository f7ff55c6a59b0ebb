"""The gRPC control plane of Outbox Relay: status, leases, pauses, dead letters and replays.

Modules: server (ControlServer, ControlSettings, serve_forever), auth (bearer tokens, roles), servicer
(request -> store -> proto), validation, convert, store (all SQL, from control/queries.sql), errors (the
status table), model (domain values), paging (page tokens), codegen (stubs in _generated/ from proto/).
"""
