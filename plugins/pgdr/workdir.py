"""Where pgdr keeps per-task work files on a worker: dumps being uploaded, downloads being restored.

``$PGDR_WORK_DIR`` (or the system's temporary folder). Every task try works in a private
directory below it that is removed whatever happens (:func:`pgdr.tasks.common.task_workdir`);
the disk there must hold the largest backup a worker handles.
"""

from __future__ import annotations

import os
from pathlib import Path


def work_dir_root() -> Path:
    """Return where pgdr keeps per-task work files (``$PGDR_WORK_DIR`` or the system temp dir)."""
    import tempfile

    return Path(os.environ.get("PGDR_WORK_DIR") or tempfile.gettempdir())
