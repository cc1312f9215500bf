"""Fleet health: the figure (aidc.fleet.figure), the node and GPU views the health API serves
(aidc.fleet.views, aidc.fleet.api) and its thin client (aidc.fleet.client)."""
