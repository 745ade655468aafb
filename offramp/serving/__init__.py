"""Parts both daemons and the experiment baselines serve with: batching, streams, requests, replies.

Layering: this package uses the core (models, codec, wire) and is used by
``edge_node``, ``cloud_node`` and ``orchestrator``; it imports none of them.
"""
