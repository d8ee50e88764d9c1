"""What every pgdr task shares: default arguments, failing fast, work directories, scratch databases.

DAG files stay short by calling these. Each function reads the plan and connections at run
time (never at parse time), keeps its work files in a private directory that is always
removed, and turns :class:`~pgdr.errors.PermanentFailure` into ``AirflowFailException`` so that a
failure retrying cannot fix pages at once instead of retrying.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pgdr.airflow_glue.notify import TaskFailureJournal
from pgdr.errors import PermanentFailure
from pgdr.plan import DRPlan
from pgdr.runtime import STOP_REQUESTED_ENV_VAR

log = logging.getLogger(__name__)

OWNER = "pgdr"
MAX_RETRY_DELAY = timedelta(minutes=30)


def default_args(plan: DRPlan, execution_timeout: timedelta) -> dict[str, Any]:
    """Return the ``default_args`` every pgdr DAG uses: retries with backoff, alerts, timeout."""
    return {
        "owner": OWNER,
        "retries": plan.retries,
        "retry_delay": plan.retry_delay,
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": MAX_RETRY_DELAY,
        "execution_timeout": execution_timeout,
        "on_failure_callback": TaskFailureJournal(),
    }


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
    drop_leftovers(scratch.server, kind, database, run_id, lambda other: ti.get_dagrun_state(dag_id=ti.dag_id, run_id=other))
    scratch.create(scratch_comment(purpose, run_id))
    return scratch.name


def scratch_roles_marker(purpose: str, context) -> str:
    """Return what marks the roles a run created for its scratch restore of ``purpose`` (its teardown drops them)."""
    return f"{purpose} ({context['ti'].run_id})"


def drop_scratch_and_roles(scratch, purpose: str, context) -> bool:
    """Drop this run's scratch database, then the roles it created for it that nothing else uses; say whether it existed."""
    from pgdr.logical.privileges import drop_created_roles

    dropped = scratch.drop()
    gone = drop_created_roles(scratch.server, scratch_roles_marker(purpose, context))
    if gone:
        log.info("Roles created for %s and dropped again: %s.", purpose, ", ".join(gone))
    return dropped


def restore_into_scratch(scratch, dump_dir: Path, jobs: int, workdir: Path, purpose: str, context) -> tuple[float, list[str]]:
    """Restore a downloaded dump into this run's scratch database as an incident restore would; return
    ``(seconds, roles created)``.

    The scratch database is made again (empty, a failed try's half restore gone) with the backup's
    encoding and locale; the roles the backup names that the server lacks are created first (NOLOGIN,
    marked as pgdr's: the teardown drops them again when nothing uses them).
    """
    from pgdr.logical.privileges import backup_needs, create_roles, globals_of, missing_roles, read_toc
    from pgdr.logical.restore import restore_dump
    from pgdr.postgres.scratch import scratch_comment

    needs = backup_needs(read_toc(dump_dir), workdir)
    created = create_roles(scratch.server, missing_roles(needs, scratch.server), scratch_roles_marker(purpose, context),
                           globals_of(dump_dir))
    scratch.create(scratch_comment(purpose, context["ti"].run_id), needs.database_options)
    return restore_dump(scratch.endpoint, dump_dir, jobs, workdir), created


CONTEXT_SERVER = "pgdr_server"  # the PITR server a mapped task is about (map_index_template)


def pitr_server_context(server_name: str, context):
    """Return ``(plan, server, store, archive, catalog)`` of a PITR server, and name it in the task's context."""
    from pgdr.airflow_glue.connections import open_archive
    from pgdr.airflow_glue.notify import CONTEXT_DATABASE
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.plan import load_plan

    context[CONTEXT_SERVER] = server_name
    context[CONTEXT_DATABASE] = f"server {server_name}"
    plan = load_plan()
    server = plan.server(server_name)
    store, layout, archive = open_archive(server, plan)
    return plan, server, store, archive, BaseBackupCatalog(store, layout, server.name)


def recover_scratch_cluster(context, key: str, purpose: str, catalog, entry, store, archive, target, login: str):
    """Recover ``entry``'s chain in this run's scratch cluster for ``key``; return ``(cluster, prepared, result)``.

    Clusters of finished runs on this worker are removed first (by marker, only when Airflow says their run is
    over), and so is a previous try's cluster of this run: a retry starts again from the stored bytes. A cluster
    whose recovery fails is removed before the error goes up; one that recovered is the caller's to destroy.

    :param target: the recovery target time, or ``None`` for the end of the archive.
    """
    from pgdr.physical.cluster import ScratchCluster, cluster_dir_name, remove_leftover_clusters
    from pgdr.physical.recovery import prepare_data_directory, recover_cluster
    from pgdr.workdir import work_dir_root

    ti = context["ti"]
    root = work_dir_root()
    root.mkdir(parents=True, exist_ok=True)
    cluster = ScratchCluster(root / cluster_dir_name(ti.dag_id, ti.run_id, key), entry.record.pg_version, login=login)

    remove_leftover_clusters(root, lambda dag_id, run_id: ti.get_dagrun_state(dag_id=dag_id, run_id=run_id), keep=cluster.root)
    cluster.destroy()
    cluster.write_marker(ti.dag_id, ti.run_id, purpose)
    try:
        with task_workdir(context, f"pitr-{key}") as workdir:
            workdir.chmod(0o755)  # the cluster's user reads the extracted files through it
            prepared = prepare_data_directory(catalog, entry, store, workdir, cluster.data_dir, archive)
            result = recover_cluster(cluster, archive, target)
    except BaseException:
        cluster.destroy()
        raise
    return cluster, prepared, result
