"""Log set-up for every command: readable lines for people, or one JSON object per line for collectors.

``--log-format json`` writes each record as ``{"time", "level", "logger", "message"}`` (plus ``"process"``
for a cloud worker and ``"exception"`` with the traceback), which log shippers (Loki, Elasticsearch,
Cloud Logging) read without a parser of their own.
"""
from __future__ import annotations

import json
import logging
from typing import Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if self.process is not None:
            entry["process"] = self.process
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: int | str, fmt: LogFormat = "text", process: str | None = None) -> None:
    """Log to stderr at ``level`` in ``fmt``; ``process`` names the process in each line (a cloud worker).

    As ``logging.basicConfig``, it leaves a root logger that already has handlers (a host application's, a
    test runner's) as it is, but for the level."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT if process is None
                                               else f"%(asctime)s %(levelname)s [{process}] %(name)s: %(message)s"))
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(level)
