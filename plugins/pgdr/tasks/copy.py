"""What the tasks of ``pgdr_copy`` do: bring one database's, or one server's, second copies up to date."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_DATABASE
from pgdr.airflow_glue.task_run import fail_fast

log = logging.getLogger(__name__)


def run_copy(database: str, context) -> dict[str, Any]:
    """Body of ``copy_backups``: copy the backups missing in each copy target of ``database``, check them there,
    apply retention there (:func:`pgdr.logical.copies.copy_database`)."""
    from pgdr.airflow_glue.connections import resources
    from pgdr.logical.copies import copy_database

    context[CONTEXT_DATABASE] = database
    with fail_fast():
        res = resources()
        summary = copy_database(res.plan.database(database), res, datetime.now(UTC))
    for target, done in summary["targets"].items():
        log.info(
            "Copy %r of %r: %d backups copied (%s), %d verification records brought over, %d deleted by retention.",
            target,
            database,
            len(done["copied"]),
            ", ".join(done["copied"]) or "none missing",
            done["verifications"],
            len(done["deleted"]),
        )
    return summary


def run_copy_server(server_name: str, context) -> dict[str, Any]:
    """Body of ``copy_server``: copy the WAL files and base backups missing in each copy target of ``server_name``,
    check them there, apply the server's retention there (:func:`pgdr.physical.copies.copy_server`)."""
    from pgdr.airflow_glue.connections import resources
    from pgdr.airflow_glue.task_run import CONTEXT_SERVER
    from pgdr.physical.copies import copy_server

    context[CONTEXT_SERVER] = server_name
    context[CONTEXT_DATABASE] = f"server {server_name}"
    with fail_fast():  # a damaged file fails the task at once (the next run tries again); unreachable: retried
        res = resources()
        return copy_server(res.plan.server(server_name), res, datetime.now(UTC))
