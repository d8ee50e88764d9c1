"""What every pgdr task body shares: failing fast, timing a phase, work directories, this run's scratch.

Each body reads the plan and connections at run time (never at parse time), keeps its work files
in a private directory that is always removed, and turns :class:`~pgdr.errors.PermanentFailure`
into ``AirflowFailException`` so that a failure retrying cannot fix pages at once instead of
retrying. The DAGs' default arguments are :mod:`pgdr.airflow_glue.defaults`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgdr.errors import PermanentFailure
from pgdr.runtime import STOP_REQUESTED_ENV_VAR

if TYPE_CHECKING:
    from pgdr.logical.restore import ScratchRestore

log = logging.getLogger(__name__)


@contextmanager
def fail_fast() -> Iterator[None]:
    """Re-raise a :class:`PermanentFailure` as ``AirflowFailException`` (no retry).

    A run that its operator stopped (Ctrl-C on ``python -m pgdr restore``, which sets
    ``$PGDR_STOP_REQUESTED``) does no more work: every later task and retry fails at once.
    """
    if os.environ.get(STOP_REQUESTED_ENV_VAR):
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            "Stopped by the operator (Ctrl-C on the command line): nothing more is done. The live database was not "
            "changed unless the report says so; a half-restored copy of this run was dropped."
        )
    try:
        yield
    except PermanentFailure as err:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(err)) from err


@contextmanager
def task_workdir(context, label: str) -> Iterator[Path]:
    """Yield a private work directory for one task try; it is removed whatever happens.

    It names its owner, and every new one removes the directories of killed tries on this host
    (:mod:`pgdr.workdir`, "Leftovers").
    """
    from pgdr.workdir import claim, remove_dead_workdirs, work_dir_root

    root = work_dir_root()
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_workdirs(root)
    path = Path(tempfile.mkdtemp(prefix=f"pgdr-{label}-{context['ti'].map_index}-", dir=root))
    try:
        claim(path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _airflow_info(context) -> dict[str, Any]:
    ti = context["ti"]
    logical_date = context.get("logical_date")
    return {
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": ti.task_id,
        "try_number": ti.try_number,
        "logical_date": logical_date.isoformat() if logical_date else None,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat()


@contextmanager
def timed() -> Iterator[dict[str, Any]]:
    """Yield a phase's result, to fill in: ``started_at`` now, ``finished_at`` when the block ends without error."""
    out: dict[str, Any] = {"started_at": _now()}
    yield out
    out["finished_at"] = _now()


def run_scratch(kind: str, db, plan, context, key: str):
    """Return this run's scratch database of ``kind`` for ``db`` (the same name on every retry).

    :param key: what, within the run, the scratch database is for (a database, a backup).
    """
    from pgdr.airflow_glue.connections import database_endpoint, restore_endpoint
    from pgdr.postgres.scratch import ScratchDatabase, scratch_name

    server = database_endpoint(db, plan, conn_id=db.verify_conn_id)
    restorer = restore_endpoint(db, plan, server)
    return ScratchDatabase(server, scratch_name(kind, db.name, f"{context['ti'].run_id}/{key}"), restorer)


def create_run_scratch(scratch, kind: str, database: str, purpose: str, context) -> str:
    """Drop scratch databases of ``kind`` left by killed runs, then create this run's; return its name."""
    from pgdr.plan import load_plan
    from pgdr.postgres.client import check_restore_role
    from pgdr.postgres.scratch import drop_leftovers, scratch_comment

    ti = context["ti"]
    run_id = ti.run_id
    check_restore_role(scratch.endpoint, load_plan().database(database).restore_as_superuser)
    drop_leftovers(
        scratch.server, kind, database, run_id, lambda other: ti.get_dagrun_state(dag_id=ti.dag_id, run_id=other)
    )
    scratch.create(scratch_comment(purpose, run_id))
    return scratch.name


def scratch_roles_marker(purpose: str, context) -> str:
    """Return what marks the roles a run created for its scratch restore of ``purpose`` (its teardown drops them)."""
    return f"{purpose} ({context['ti'].run_id})"


def drop_scratch_and_roles(scratch, purpose: str, context) -> bool:
    """Drop this run's scratch database and the roles created for it that nothing else uses
    (:func:`pgdr.logical.restore.drop_scratch`)."""
    from pgdr.logical.restore import drop_scratch

    return drop_scratch(scratch, scratch_roles_marker(purpose, context))


def restore_into_scratch(scratch, dump_dir: Path, jobs: int, workdir: Path, purpose: str, context) -> ScratchRestore:
    """Restore a downloaded dump into this run's scratch database
    (:func:`pgdr.logical.restore.restore_into_scratch`)."""
    from pgdr.logical.restore import restore_into_scratch as restore
    from pgdr.postgres.scratch import scratch_comment

    return restore(
        scratch,
        dump_dir,
        jobs,
        workdir,
        scratch_comment(purpose, context["ti"].run_id),
        scratch_roles_marker(purpose, context),
        f"The backup restored for {purpose}",
    )


CONTEXT_SERVER = "pgdr_server"  # the PITR server a mapped task is about (map_index_template)


def pitr_server_context(server_name: str, context, read_from: str | None = None, pruning: bool = False):
    """Return ``(plan, server, store, archive, catalog)`` of a PITR server (in its copy ``read_from`` when given; with
    the pruner's credentials when ``pruning``), and name it in the task's context."""
    from pgdr.airflow_glue.connections import open_archive
    from pgdr.airflow_glue.notify import CONTEXT_DATABASE
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.plan import load_plan

    context[CONTEXT_SERVER] = server_name
    context[CONTEXT_DATABASE] = f"server {server_name}"
    plan = load_plan()
    server = plan.server(server_name)
    target = server.pitr.storage_named(read_from) if read_from else None
    store, layout, archive = open_archive(server, plan, target, pruning)
    return plan, server, store, archive, BaseBackupCatalog(store, layout, server.name)


def recover_scratch_cluster(context, key: str, purpose: str, catalog, entry, store, archive, target, login: str):
    """Recover ``entry``'s chain in this run's scratch cluster for ``key``
    (:func:`pgdr.physical.recovery.recover_in_scratch`)."""
    from pgdr.physical.recovery import recover_in_scratch

    ti = context["ti"]
    with task_workdir(context, f"pitr-{key}") as workdir:
        return recover_in_scratch(
            (ti.dag_id, ti.run_id, key),
            purpose,
            catalog,
            entry,
            store,
            archive,
            target,
            login,
            workdir,
            lambda dag_id, run_id: ti.get_dagrun_state(dag_id=dag_id, run_id=run_id),
        )


class AirflowTaskRun:
    """:class:`pgdr.resources.TaskRun` of the running Airflow task: what a domain rule needs of it."""

    def __init__(self, context):
        self.context = context
        self.run_id = context["ti"].run_id

    def workdir(self, label: str):
        return task_workdir(self.context, label)

    def info(self) -> dict[str, Any]:
        return _airflow_info(self.context)

    def recover(self, key: str, purpose: str, catalog, entry, store, archive, target, login: str):
        return recover_scratch_cluster(self.context, key, purpose, catalog, entry, store, archive, target, login)
