"""Failover: turn fault events into guarded quarantines through a scheduler backend."""
