"""What the tasks of ``pgdr_rotate_keys`` do: re-wrap each encrypted database's backups, then report."""

from __future__ import annotations

import logging
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_DATABASE
from pgdr.airflow_glue.task_run import fail_fast

log = logging.getLogger(__name__)


def run_rewrap(database: str, context) -> dict[str, Any]:
    """Body of ``rewrap``: every backup of ``database`` wrapped by an older master key gets the current one, in its
    storage target and in each of its copies."""
    from pgdr.airflow_glue.connections import encryption_keys, open_store
    from pgdr.errors import PgdrError
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.logical.rotation import rewrap_backups
    from pgdr.messages import first_line
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = database
    with fail_fast():
        plan = load_plan()
        db = plan.database(database)
        keys = encryption_keys(db, plan)
        store, layout = open_store(db.storage, plan)
        result = rewrap_backups(BackupCatalog(store, layout, db.name), keys, db.encryption_key_conn_id)
        for target in db.copies:  # a copy's manifests name the same data keys: re-wrapped too, or no key is retired
            try:
                copy_store, copy_layout = open_store(target, plan)
                copied = rewrap_backups(
                    BackupCatalog(copy_store, copy_layout, db.name), keys, db.encryption_key_conn_id
                )
                result.add_copy(target.name, copied)
            except PgdrError as err:
                log.error("The copy %r of %s could not be re-wrapped: %s", target.name, database, err)
                result.add_copy(target.name, None, first_line(str(err)))
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
    """Body of ``report``: per key connection, which old key ids no retained backup needs any more
    (:func:`pgdr.logical.rotation.rotation_report`)."""
    from pgdr.airflow_glue.connections import master_keys
    from pgdr.airflow_glue.evidence import record_evidence
    from pgdr.errors import PgdrError
    from pgdr.logical.rotation import rotation_report
    from pgdr.plan import load_plan

    with fail_fast():
        plan = load_plan()
        subject = {"key_connections": sorted({r["key_conn_id"] for r in results if r.get("key_conn_id")})}
        try:
            report = rotation_report(
                results, lambda conn_id: master_keys(conn_id, "master keys of encrypted backups", plan)
            )
        except PgdrError as err:  # backups left under their old key: the rotation is not complete
            record_evidence(context, plan, "keys_rotated", subject, "failed", {"error": str(err)})
            raise
    record_evidence(context, plan, "keys_rotated", subject, "ok", {"report": report})
    return report
