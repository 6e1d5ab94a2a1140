#!/usr/bin/env bash
# A namespaced local testbed (the scenario-driven one, with CPU quotas and per-pair
# shaping, is homenet.py next to this): peers in their own network namespaces on one bridge,
# each upload (and optionally download) shaped with tc tbf. Needs root and iproute2.
#
#   testbed.sh up TAG NAME:MBIT [NAME:MBIT ...]   namespaces TAG-hub (bridge) and TAG-NAME,
#                                                 NAME gets 10.77.0.<k+1>/24; prints "NAME NS IP"
#   testbed.sh shape TAG NAME MBIT up|down        (re)shape NAME's upload or download
#   testbed.sh down TAG                           kill what runs inside, delete the namespaces
#
# Then e.g.:  ip netns exec TAG-a swarm join --interface 10.77.0.2
#             ip netns exec TAG-src swarm peers --interface 10.77.0.1
# mDNS stays inside the bridge: nothing reaches the machine's real interfaces.
# tbf needs a burst above one MTU (smaller drops full packets): 32 kB here; no netem in this kernel.
set -euo pipefail

tbf() {  # NS DEV MBIT
  ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$3mbit" burst 32kb latency 400ms
}

index_of() {  # TAG NAME -> k, from the veth name recorded in the namespace
  ip -n "$1-$2" -o link show | sed -n 's/^[0-9]*: \(v[0-9]*\)@.*/\1/p' | head -1 | tr -d v
}

case "${1:-}" in
  up)
    tag=$2; shift 2
    ip netns add "$tag-hub"
    ip -n "$tag-hub" link set lo up
    ip -n "$tag-hub" link add br0 type bridge
    ip -n "$tag-hub" link set br0 up
    k=0
    for spec in "$@"; do
      name=${spec%%:*}; mbit=${spec#*:}; ns="$tag-$name"; ip_addr="10.77.0.$((k + 1))"
      ip netns add "$ns"
      ip -n "$ns" link set lo up
      ip link add "v$k" netns "$ns" type veth peer name "v${k}h" netns "$tag-hub"
      ip -n "$ns" addr add "$ip_addr/24" dev "v$k"
      ip -n "$ns" link set "v$k" up
      ip -n "$tag-hub" link set "v${k}h" master br0
      ip -n "$tag-hub" link set "v${k}h" up
      tbf "$ns" "v$k" "$mbit"
      echo "$name $ns $ip_addr"
      k=$((k + 1))
    done
    ;;
  shape)
    tag=$2; name=$3; mbit=$4; k=$(index_of "$tag" "$name")
    if [ "$5" = up ]; then tbf "$tag-$name" "v$k" "$mbit"; else tbf "$tag-hub" "v${k}h" "$mbit"; fi
    ;;
  down)
    tag=$2
    for ns in $(ip netns list | awk '{print $1}' | grep "^$tag-" || true); do
      for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns"
    done
    ;;
  *)
    sed -n '2,14p' "$0"; exit 2 ;;
esac
