"""swarm/view: pure functions from state snapshots to rich renderables."""
