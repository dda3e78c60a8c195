"""``python -m sandbox_mcp``: the same as the ``sandbox-mcp`` command."""

import sys

from .cli import main

sys.exit(main())
