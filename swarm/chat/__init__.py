"""swarm/chat: a conversation over a token engine (this process or the swarm)."""
