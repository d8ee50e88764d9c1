"""A task's exit seen when it happens, not at the task supervisor's next heartbeat tick.

Airflow 3.3 runs each task in a process forked by a supervisor (``airflow.sdk.execution_time.supervisor``) that
watches it through four sockets (stdout, stderr, logs, requests) and a ``select`` that wakes at least every
``[workers] min_heartbeat_interval`` (5 s). The task process closes the sockets as it exits. When the supervisor
handles the last end-of-file a moment before the kernel makes the process reapable (on a busy machine the woken
supervisor often runs first), it finds no exit status yet and selects again, on no socket at all: it sleeps the
whole interval before it looks again, and the worker slot stays taken. Measured on the Celery fleet
(``bench/celery_fleet.py``, 12 databases, 2 workers x 2 slots): 40 of 87 tasks ended exactly 5.0 s after their last
log line, 200 of the slots' 389 seconds.

:func:`install` changes that one step: when no socket is left to watch, the supervisor waits on the process itself
(``waitpid`` through psutil, bounded by the same interval) instead of on an empty ``select``. Nothing else in the
supervisor changes: while any socket is open it selects as before, heartbeats as before, and a process that closed
its sockets but keeps running is still waited for one interval at a time. The Celery workers install it before
they fork their pool (:mod:`pgdr.airflow_glue.preload`); pgdr's own ``airflow standalone`` (``make ui``, the
end-to-end tests) through the ``airflow_local_settings`` module that :func:`write_local_settings` puts in its
``$AIRFLOW_HOME/config`` (every Airflow process imports it at start). If Airflow's supervisor no longer has the parts
this relies on, nothing is changed and a warning says so.
"""

from __future__ import annotations

import functools
import logging
from contextlib import suppress
from pathlib import Path

log = logging.getLogger(__name__)

MARK = "_pgdr_waits_on_exit"


def install() -> bool:
    """Make Airflow's task supervisor wait on an exiting task process; return whether it is (now) installed."""
    try:
        from airflow.sdk.execution_time.supervisor import WatchedSubprocess
    except ImportError as err:
        log.warning("pgdr: Airflow's task supervisor not found (%s); task exits are seen at its next tick.", err)
        return False
    original = getattr(WatchedSubprocess, "_service_subprocess", None)
    if getattr(original, MARK, False):
        return True
    fields = getattr(WatchedSubprocess, "__attrs_attrs__", ())
    if original is None or not {"_exit_code", "_open_sockets", "_process"} <= {f.name for f in fields}:
        log.warning(
            "pgdr: Airflow's task supervisor has changed (no _service_subprocess, _exit_code, _open_sockets or "
            "_process); left as it is, so a task's exit may be seen up to [workers] min_heartbeat_interval late."
        )
        return False

    @functools.wraps(original)
    def _service_subprocess(self, max_wait_time: float, raise_on_timeout: bool = False, expect_signal=None):
        if self._exit_code is None and not self._open_sockets:  # every socket at end-of-file: it is exiting
            with suppress(self._process.TimeoutExpired, self._process.ProcessNotFound):  # the tracker's own
                self._process.wait(timeout=max(0.01, max_wait_time))
            max_wait_time = 0  # then the original only collects the exit status, without another wait
        return original(self, max_wait_time, raise_on_timeout=raise_on_timeout, expect_signal=expect_signal)

    setattr(_service_subprocess, MARK, True)
    WatchedSubprocess._service_subprocess = _service_subprocess
    return True


LOCAL_SETTINGS = '''"""Written by pgdr for an Airflow whose home it owns: the task supervisor sees a task's exit at once
(pgdr.airflow_glue.task_exit). Every Airflow process imports this module at start."""

from pgdr.airflow_glue.task_exit import install

__all__: list[str] = []  # no cluster policy here

install()
'''


def write_local_settings(airflow_home: Path) -> Path:
    """Write the ``airflow_local_settings`` module that installs this in every process of the Airflow at
    ``airflow_home`` (only for an Airflow home pgdr owns: the module replaces one already there); return its path."""
    path = airflow_home / "config" / "airflow_local_settings.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LOCAL_SETTINGS)
    return path
