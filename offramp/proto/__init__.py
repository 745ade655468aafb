"""Generated protobuf code (do not edit; run proto/generate.py).

Import the messages through ``offramp.wire`` rather than from here.
"""
