"""Generated protobuf code (do not edit; run proto/generate.py).

Import the messages through ``offramp.core.wire`` rather than from here.
"""
