"""swarm/model: one model cut into units; shards of contiguous units (torch side)."""
