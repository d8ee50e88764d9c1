"""The alert journal: what failed in a run, and whether a DAG is currently failing.

Airflow calls a task's failure callback once per failed task (with the exception) and a DAG's
failure callback once per failed run (without it). pgdr wants one message per failed run that
still names every failing phase and its error, and a recovery message when a failing DAG
succeeds again. So each task failure is written to the journal, the run-level callback reads
them back and sends one message, and the DAG's alerting state (failing or ok) is kept where it
survives worker restarts: in the plan's storage target, next to the backups.

When the storage target is itself the problem (S3 down), failures are written to the local work
directory instead, so the run-level message still carries the errors on a single machine.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

from pgdr.messages import TaskFailure

log = logging.getLogger(__name__)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


class AlertJournal:
    """Failures per run and alerting state, in a store (with a local fallback for failures)."""

    def __init__(self, store, layout, local_root: Path):
        self.store = store
        self.layout = layout
        self.local_root = local_root

    @classmethod
    def for_plan(cls) -> AlertJournal:
        """Return the journal of the plan in force (its default storage target)."""
        from pgdr.airflow_glue.connections import open_store
        from pgdr.plan import load_plan
        from pgdr.workdir import work_dir_root

        plan = load_plan()
        target = plan.default_storage or plan.databases[0].storage
        store, layout = (None, None)
        try:
            store, layout = open_store(target, plan)
        except Exception as err:  # noqa: BLE001 - a missing AWS connection must not stop alerting
            log.warning(
                "The alert journal cannot use storage %s (%s); using the local work directory.", target.name, err
            )
        return cls(store, layout, work_dir_root() / "pgdr-alert-journal")

    def _run_prefix(self, dag_id: str, run_id: str) -> tuple[str, ...]:
        return ("runs", _safe(dag_id), _safe(run_id))

    # -- failures of a run -------------------------------------------------------------------------
    def record_failure(self, failure: TaskFailure, map_index: int = -1) -> str:
        """Write one task failure; return where (a store location or a local path)."""
        name = f"{_safe(failure.task_id)}-{map_index}.json"
        data = json.dumps(asdict(failure), default=str).encode()
        parts = (*self._run_prefix(failure.dag_id, failure.run_id), name)
        if self.store is not None:
            try:
                key = self.layout.alert_key(*parts)
                self.store.put_bytes(key, data)
                return self.store.describe(key)
            except Exception as err:  # noqa: BLE001 - fall back to the local disk, below
                log.warning("Could not write the alert journal to storage (%s); writing it locally.", err)
        path = self.local_root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def failures(self, dag_id: str, run_id: str) -> tuple[list[TaskFailure], str | None]:
        """Return the recorded failures of a run, and the storage error if storage could not be read."""
        found: dict[str, TaskFailure] = {}
        storage_error = None
        prefix = self._run_prefix(dag_id, run_id)
        if self.store is not None:
            try:
                for obj in self.store.list(self.layout.alert_key(*prefix) + "/"):
                    found[obj.key.rsplit("/", 1)[-1]] = TaskFailure(**json.loads(self.store.get_bytes(obj.key)))
            except Exception as err:  # noqa: BLE001 - reported in the alert itself
                storage_error = str(err)
        local = self.local_root.joinpath(*prefix)
        if local.is_dir():
            for path in sorted(local.glob("*.json")):
                found.setdefault(path.name, TaskFailure(**json.loads(path.read_text())))
        return sorted(found.values(), key=lambda f: (f.task_id, f.database or "")), storage_error

    # -- alerting state of a DAG (or of a health check) ------------------------------------------------
    def get_state(self, name: str) -> dict | None:
        """Return the stored state ``name`` (``None`` if never set or unreadable)."""
        if self.store is None:
            return None
        try:
            return json.loads(self.store.get_bytes(self.layout.alert_key("state", f"{_safe(name)}.json")))
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - an unreadable state must not stop the alert
            log.warning("Could not read alerting state %s: %s", name, err)
            return None

    def set_state(self, name: str, state: dict) -> None:
        """Store the state ``name``; a storage failure is logged, not raised."""
        if self.store is None:
            return
        try:
            self.store.put_bytes(
                self.layout.alert_key("state", f"{_safe(name)}.json"), json.dumps(state, default=str).encode()
            )
        except Exception as err:  # noqa: BLE001 - alerting must not fail on its bookkeeping
            log.warning("Could not store alerting state %s: %s", name, err)
