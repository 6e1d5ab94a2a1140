"""swarm: LLM inference shared across the devices you already own."""

__version__ = "0.1.0"
