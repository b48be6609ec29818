"""Stage peers: the methods we compare with and combine, as optional passes on a placed, canonical model, applied
and undone together by name (``registry``): ROMER (``romer``: router recalibration, expert replacement; they
simulate noise), HPD and low-bit digital experts (from ``transforms``)."""

from .registry import PEERS, Applied, PeerContext, PeerOptions, apply_peers, check_peer_options, check_peers

__all__ = ["PEERS", "Applied", "PeerContext", "PeerOptions", "apply_peers", "check_peer_options", "check_peers"]
