"""Addresses and sockets (swarm.runtime.sockets): a real ROUTER and DEALER on loopback."""

from __future__ import annotations

import zmq

from swarm.runtime import sockets


def test_addresses_are_split_for_ipv4_and_ipv6():
    assert sockets.port_of("tcp://10.0.0.2:5555") == 5555 and sockets.port_of("tcp://[::1]:6000") == 6000
    assert sockets.host_of("tcp://10.0.0.2:5555") == "10.0.0.2" and sockets.host_of("tcp://[::1]:6000") == "::1"
    # The data socket is reached at the host the control socket was reached at.
    assert sockets.data_address("tcp://10.0.0.2:5555", 5600) == "tcp://10.0.0.2:5600"
    assert sockets.data_address("tcp://[::1]:5555", 5600) == "tcp://[::1]:5600"
    assert sockets.local_host_towards("tcp://127.0.0.1:5555") == "127.0.0.1"


def test_a_dealer_reaches_a_router_bound_on_a_random_loopback_port():
    ctx = sockets.new_sync_context()
    try:
        router, address = sockets.bind_router(ctx, "127.0.0.1", 0)
        assert sockets.port_of(address) > 0
        dealer = sockets.connect_dealer(ctx, address, identity=b"src-test")
        dealer.send_multipart([b"hello"])
        assert router.poll(5000) == zmq.POLLIN
        identity, body = router.recv_multipart()
        assert (identity, body) == (b"src-test", b"hello")
        router.send_multipart([identity, b"back"])  # the router answers by identity
        assert dealer.poll(5000) == zmq.POLLIN and dealer.recv_multipart() == [b"back"]
        dealer.close()
        router.close()
    finally:
        ctx.term()
