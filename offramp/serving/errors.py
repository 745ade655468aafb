"""The one error type a server turns into a per-request status."""
from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request refused or failed: its reply carries ``code``, and the stream goes on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
