"""Fault events from many node agents to one failover controller (HTTPS, mutual TLS).

`wire` is the request format and its validation, `forwarder` the agent's side (the store as
an outbox), `ingest` the controller's side. See docs/architecture.md, "Events from many hosts".
"""
