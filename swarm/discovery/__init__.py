"""swarm/discovery: mDNS announcements, link probes and liveness."""
