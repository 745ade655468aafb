"""``python -m offramp.cli``: the ``offramp`` command."""
import sys

from offramp.cli.main import main

sys.exit(main())
