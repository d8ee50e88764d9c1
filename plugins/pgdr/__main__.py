"""``python -m pgdr``: the break-glass commands (see :mod:`pgdr.local.cli`)."""

import sys

from pgdr.local.cli import main

sys.exit(main())
