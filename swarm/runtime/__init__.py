"""swarm/runtime: the ZeroMQ pipeline of async shard servers."""
