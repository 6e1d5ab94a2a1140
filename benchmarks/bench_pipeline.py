"""Pipeline benchmark (same as `swarm bench`): python benchmarks/bench_pipeline.py [--json] [--model PATH]."""

import sys

from swarm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
