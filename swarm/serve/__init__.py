"""`swarm serve`: the OpenAI-compatible HTTP API (protocol, text, generation, app, state)."""
