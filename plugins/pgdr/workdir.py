"""Where pgdr keeps per-task work files on a worker, and what killed runs leave behind.

``$PGDR_WORK_DIR`` (or the system's temporary folder). Every task try works in a private
directory below it that is removed whatever happens (:func:`pgdr.airflow_glue.task_run.task_workdir`);
the disk there must hold the largest backup a worker handles.

**Leftovers.** A try killed with SIGKILL (an out-of-memory kill, a worker that died) cannot clean
up. What it leaves is removed by a later task, by one policy per kind of owner:

* a *work directory* names its process (host, pid, start time): it is removed once that process
  no longer runs on this host (:func:`remove_dead_workdirs`);
* a *scratch database* and a *scratch cluster* name their Airflow run: they are removed once that
  run is over (:func:`run_is_over`): Airflow says ``success`` or ``failed``, or cannot give a
  state (a run that was deleted; the question comes from a running task, so Airflow itself
  answers). A run that is queued or running keeps its own, so two runs at once (backfills) never
  remove each other's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OWNER_FILE = ".pgdr-owner"
RUN_OVER = ("success", "failed")


def work_dir_root() -> Path:
    """Return where pgdr keeps per-task work files (``$PGDR_WORK_DIR`` or the system temp dir)."""
    import tempfile

    return Path(os.environ.get("PGDR_WORK_DIR") or tempfile.gettempdir())


def state_of_run(ask: Callable[..., Any] | None, *run: str) -> str | None:
    """Return the Airflow state of ``run`` as ``ask`` gives it, ``None`` when it cannot (no such run)."""
    if ask is None:
        return None
    try:
        state = ask(*run)
    except Exception as err:  # noqa: BLE001 - a run Airflow cannot find is not running
        log.debug("No state for run %s: %s", run, err)
        return None
    return str(getattr(state, "value", state)) if state is not None else None


def run_is_over(state: str | None) -> bool:
    """The one leftover policy: a run's scratch databases and clusters go once it is over (see the module)."""
    return state is None or state.lower().rsplit(".", 1)[-1] in RUN_OVER


def process_identity(pid: int) -> dict[str, Any] | None:
    """Return this host's name, ``pid`` and the process's start time (``None`` if it does not run)."""
    try:
        # Field 22 of /proc/<pid>/stat is the start time: a reused pid has another one.
        stat = Path(f"/proc/{pid}/stat").read_text()
        started = stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        started = None
    return {"host": socket.gethostname(), "pid": pid, "started": started}


def still_runs(owner: Any) -> bool:
    """Whether the process ``owner`` names (a :func:`process_identity` read back from a marker) is the one running
    now: the same pid with the same start time, on this host. A malformed marker names no process."""
    try:
        return isinstance(owner, dict) and process_identity(int(owner.get("pid") or 0)) == owner
    except (TypeError, ValueError):
        return False


def claim(path: Path) -> None:
    """Write this process's identity into work directory ``path``: it is a leftover once the process is gone."""
    (path / OWNER_FILE).write_text(json.dumps(process_identity(os.getpid())))


def remove_dead_workdirs(root: Path) -> list[Path]:
    """Remove work directories under ``root`` whose owning process on this host no longer runs."""
    removed = []
    for owner_file in root.glob(f"pgdr-*/{OWNER_FILE}"):
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            continue  # being written right now, or not ours to judge
        if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
            continue
        if still_runs(owner):
            continue
        shutil.rmtree(owner_file.parent, ignore_errors=True)
        removed.append(owner_file.parent)
        log.warning(
            "Removed %s, the work directory of a task that was killed (pid %s).", owner_file.parent, owner.get("pid")
        )
    return removed
