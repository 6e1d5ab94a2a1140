"""swarm/planner: joint device selection and partition. Pure: no torch, no zmq."""
