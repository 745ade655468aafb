"""matplotlib where it is installed (the ``plot`` extra), on a backend that needs no display."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend, or None (and a warning) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'offramp[plot]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
