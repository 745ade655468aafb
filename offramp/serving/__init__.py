"""Parts both daemons and the experiment baselines serve with: settings and their config files, daemon
plumbing and security, batching, streams, requests, replies.

Layering: this package uses the core (models, codec, wire) and training (the calibration an edge config
records); ``edge_node``, ``cloud_node`` and ``orchestrator`` use it, and it imports none of them.
"""

# Environment variable naming the pid whose death should end a daemon (``DaemonProcess(die_with_parent=True)``).
DIE_WITH_PARENT = "OFFRAMP_DIE_WITH_PARENT"
