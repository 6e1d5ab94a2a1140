from swarm.cli import run

run()
