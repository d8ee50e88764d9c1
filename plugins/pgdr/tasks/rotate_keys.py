"""What the tasks of ``pgdr_rotate_keys`` do: re-wrap each encrypted database's backups, then report."""

from __future__ import annotations

import logging
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_DATABASE
from pgdr.airflow_glue.task_run import fail_fast

log = logging.getLogger(__name__)


def run_rewrap(database: str, context) -> dict[str, Any]:
    """Body of ``rewrap``: every backup of ``database`` wrapped by an older master key gets the current one."""
    from pgdr.airflow_glue.connections import encryption_keys, open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.logical.rotation import rewrap_backups
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = database
    with fail_fast():
        plan = load_plan()
        db = plan.database(database)
        keys = encryption_keys(db, plan)
        store, layout = open_store(db.storage, plan)
        result = rewrap_backups(BackupCatalog(store, layout, db.name), keys, db.encryption_key_conn_id)
    log.info(
        "%s: %d backups re-wrapped under master key %r, %d already were, %d unencrypted, %d left as they are.",
        database,
        len(result.rewrapped),
        keys.current,
        len(result.already_current),
        len(result.unencrypted),
        len(result.problems),
    )
    return result.to_dict()


def run_rotation_report(results: list[dict[str, Any]], context) -> dict[str, Any]:
    """Body of ``report``: per key connection, which old key ids no retained backup needs any more.

    :raises PermanentFailure: when a backup could not be re-wrapped (it keeps its old key, which must stay).
    """
    from pgdr.airflow_glue.connections import master_keys
    from pgdr.errors import PermanentFailure
    from pgdr.logical.rotation import RotationResult, keys_no_longer_needed
    from pgdr.plan import load_plan

    with fail_fast():
        plan = load_plan()
        by_conn: dict[str, list[RotationResult]] = {}
        for raw in results:
            result = RotationResult(**raw)
            by_conn.setdefault(result.key_conn_id, []).append(result)
        report: dict[str, Any] = {}
        for conn_id, group in by_conn.items():
            keys = master_keys(conn_id, "master keys of encrypted backups", plan)
            unneeded = keys_no_longer_needed(keys, group)
            report[conn_id] = {
                "current_key": keys.current,
                "rewrapped": sum(len(r.rewrapped) for r in group),
                "key_ids_in_use": sorted({k for r in group for k in r.keys_in_use}),
                "key_ids_no_longer_needed": unneeded,
                "problems": {f"{r.database}/{b}": p for r in group for b, p in r.problems.items()},
            }
            if unneeded:
                log.info(
                    "Connection %r: no retained backup needs master key(s) %s any more. Remove them from the "
                    "connection's previous_keys once your key escrow holds a copy (a backup restored from elsewhere "
                    "may still need one).",
                    conn_id,
                    ", ".join(unneeded),
                )
            else:
                log.info(
                    "Connection %r: every key it holds is still needed, or it holds only the current key %r.",
                    conn_id,
                    keys.current,
                )
        problems = {k: v for entry in report.values() for k, v in entry["problems"].items()}
        if problems:
            listed = "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:5])
            raise PermanentFailure(
                f"{len(problems)} backups keep their old master key and could not be re-wrapped: {listed}. Keep "
                "every old key in the connection until they are re-wrapped, expire, or are deleted on purpose."
            )
    return report
