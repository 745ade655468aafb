"""The edge daemon: exit policy, offload client with fallback, and the local serving API."""
