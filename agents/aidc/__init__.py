"""aidc: the node agent and tooling of the aidc operations suite.

Stages (one subpackage each): device, burnin, health, failover, audit, lab.
They exchange typed events (`aidc.events`) through a durable store (`aidc.store`).
"""

__version__ = "0.1.0"
