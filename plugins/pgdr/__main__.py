"""``python -m pgdr``: the break-glass commands (see :mod:`pgdr.local.cli`)."""

from pgdr.local.cli import main
from pgdr.local.runner import exit_now

exit_now(main())
