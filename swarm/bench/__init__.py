"""The measurements `swarm bench` runs: the pipeline against one process (``pipeline``) and
recovery from a lost peer (``recovery``). Off every serving path: nothing in swarm imports this."""
