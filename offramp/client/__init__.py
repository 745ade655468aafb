"""Offramp's client library, for applications on the device: ``EdgeClient`` (blocking) and ``AsyncEdgeClient``
(asyncio) send pictures, clips, bytes or arrays to an edge's local API and return one ``Answer`` each.

Layer: serving (it speaks the wire); the daemons, experiments and the command line use it.
"""
from offramp.client.edge import Answer, AsyncEdgeClient, EdgeClient, Input, request

__all__ = ["Answer", "AsyncEdgeClient", "EdgeClient", "Input", "request"]
