"""Airflow callbacks that deliver pgdr's alerts (thin: the words come from :mod:`pgdr.alerts`).

Slack goes through the provider's ``SlackWebhookNotifier`` when the plan names a Slack webhook
connection that exists; otherwise the alert is written to the task log as one clear line, so a
missing Slack set-up never hides a failure. A callback never raises: a broken alert channel
must not replace the real error in the task's state.
"""

from __future__ import annotations

import logging

from pgdr.alerts import TaskFailure, failure_message, first_line

log = logging.getLogger(__name__)

# Tasks put these keys in their context so that callbacks can name the database and backup.
CONTEXT_DATABASE = "pgdr_database"
CONTEXT_BACKUP_ID = "pgdr_backup_id"


def _failure_from_context(context) -> TaskFailure:
    ti = context["ti"]
    database = context.get(CONTEXT_DATABASE) or getattr(ti, "rendered_map_index", None)
    params = context.get("params") or {}
    database = database or params.get("database")
    return TaskFailure(
        dag_id=ti.dag_id,
        task_id=ti.task_id,
        run_id=ti.run_id,
        database=database,
        backup_id=context.get(CONTEXT_BACKUP_ID) or params.get("backup_id") or None,
        error=first_line(context.get("exception")),
        try_number=ti.try_number,
        max_tries=(getattr(ti, "max_tries", 0) or 0) + 1,
        log_url=ti.log_url,
    )


def send_slack(text: str, database: str | None, context) -> bool:
    """Post ``text`` to the plan's Slack webhook for ``database``; say whether it was sent."""
    from pgdr.connections import connection_exists
    from pgdr.plan import load_plan

    conn_id = load_plan().notifications_for(database).slack_conn_id
    if not connection_exists(conn_id):
        log.warning(
            "pgdr alert (no Slack connection %s is configured, so it is only logged):\n%s",
            repr(conn_id) if conn_id else "named in the plan's notify.slack_conn_id", text,
        )
        return False
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=text).notify(context)
    log.info("pgdr alert sent to Slack through connection %r.", conn_id)
    return True


def on_task_failure(context) -> None:
    """``on_failure_callback`` of every pgdr task: tell Slack (or the log) what failed."""
    try:
        failure = _failure_from_context(context)
        send_slack(failure_message(failure), failure.database, context)
    except Exception:  # noqa: BLE001 - a broken alert channel must not mask the task's own error
        log.exception("pgdr could not deliver the failure alert; the task's own error is above.")
