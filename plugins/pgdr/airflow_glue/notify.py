"""Airflow callbacks that deliver pgdr's alerts (thin: the words come from :mod:`pgdr.messages`).

The run and task callbacks are notifiers (``BaseNotifier`` subclasses, Airflow's convention):

* ``TaskFailureJournal`` (every task, once it has no retries left) records the failure with its
  error in the :mod:`alert journal <pgdr.airflow_glue.alert_journal>` and logs it.
* ``RunFailureNotifier`` (every DAG, once per failed run) sends **one** Slack message naming every
  failed phase, so fifty failing mapped tasks do not page fifty times.
* ``RunRecoveryNotifier`` sends a recovery message when a DAG that was failing succeeds again.
* ``deadline_warning`` / ``deadline_missed`` are the Deadline Alert callbacks (run by the
  triggerer): Slack, and an SLA-miss e-mail through the smtp provider.

Slack goes through the provider's ``SlackWebhookNotifier`` when the plan names a Slack webhook
connection that exists; otherwise the alert is written to the log as one clear line, so a
missing Slack set-up never hides a failure. A callback never raises: a broken alert channel
must not replace the real error.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from airflow.sdk.bases.notifier import BaseNotifier

from pgdr.messages import TaskFailure, failure_message, first_line

log = logging.getLogger(__name__)

# Tasks put these keys in their context so that callbacks can name the database and backup.
CONTEXT_DATABASE = "pgdr_database"
CONTEXT_BACKUP_ID = "pgdr_backup_id"


def _base_url() -> str:
    from airflow.configuration import conf

    return conf.get("api", "base_url", fallback="http://localhost:8080")


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
    from pgdr.airflow_glue.connections import connection_exists
    from pgdr.plan import load_plan

    conn_id = load_plan().notifications_for(database).slack_conn_id
    if not connection_exists(conn_id):
        log.warning(
            "pgdr alert (no Slack connection %s is configured, so it is only logged):\n%s",
            repr(conn_id) if conn_id else "named in the plan's notify.slack_conn_id",
            text,
        )
        return False
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=text).notify(context)
    log.info("pgdr alert sent to Slack through connection %r.", conn_id)
    return True


def send_email(notify, subject: str, html: str, context) -> bool:
    """Send ``html`` to the plan's e-mail recipients through its SMTP connection; say whether it went.

    :param notify: the plan's :class:`~pgdr.plan.Notifications` (nothing is sent without recipients or connection).
    """
    from pgdr.airflow_glue.connections import connection_exists

    if not (notify.smtp_conn_id and notify.email_to and connection_exists(notify.smtp_conn_id)):
        return False
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    SmtpNotifier(
        from_email=notify.email_from,
        to=list(notify.email_to),
        smtp_conn_id=notify.smtp_conn_id,
        subject=subject,
        html_content=html,
    ).notify(context)
    return True


def on_task_failure(context) -> None:
    """``on_failure_callback`` of every pgdr task: journal the failure for the run's one alert."""
    try:
        from pgdr.airflow_glue.alert_journal import AlertJournal

        failure = _failure_from_context(context)
        log.error("pgdr task failure:\n%s", failure_message(failure))
        where = AlertJournal.for_plan().record_failure(failure, getattr(context["ti"], "map_index", -1))
        log.info("Failure recorded for the run's alert: %s", where)
    except Exception:  # noqa: BLE001 - a broken alert channel must not mask the task's own error
        log.exception("pgdr could not record the failure for alerting; the task's own error is above.")


def _run_identity(context) -> tuple[str, str]:
    ti = context.get("ti")
    dag_id = getattr(context.get("dag"), "dag_id", None) or getattr(ti, "dag_id", None)
    run_id = context.get("run_id") or getattr(ti, "run_id", None)
    return dag_id, run_id


def on_run_failure(context) -> None:
    """DAG ``on_failure_callback``: one Slack message per failed run, then mark the DAG failing."""
    try:
        from pgdr.airflow_glue.alert_journal import AlertJournal
        from pgdr.messages import run_failure_message, run_url

        dag_id, run_id = _run_identity(context)
        journal = AlertJournal.for_plan()
        failures, journal_error = journal.failures(dag_id, run_id)
        databases = {f.database for f in failures if f.database}
        text = run_failure_message(dag_id, run_id, failures, run_url(_base_url(), dag_id, run_id), journal_error)
        send_slack(text, databases.pop() if len(databases) == 1 else None, context)
        previous = journal.get_state(f"dag-{dag_id}") or {}
        if previous.get("state") != "failing":
            journal.set_state(
                f"dag-{dag_id}", {"state": "failing", "since": datetime.now(UTC).isoformat(), "run_id": run_id}
            )
    except Exception:  # noqa: BLE001 - never raise from a callback
        log.exception("pgdr could not send the run failure alert.")


def on_run_success(context) -> None:
    """DAG ``on_success_callback``: a recovery message if the DAG was failing."""
    try:
        from pgdr.airflow_glue.alert_journal import AlertJournal
        from pgdr.messages import recovery_message, run_url

        dag_id, run_id = _run_identity(context)
        journal = AlertJournal.for_plan()
        previous = journal.get_state(f"dag-{dag_id}") or {}
        if previous.get("state") == "failing":
            text = recovery_message(
                dag_id, run_id, previous.get("since"), previous.get("run_id"), run_url(_base_url(), dag_id, run_id)
            )
            send_slack(text, None, context)
            journal.set_state(
                f"dag-{dag_id}", {"state": "ok", "since": datetime.now(UTC).isoformat(), "run_id": run_id}
            )
    except Exception:  # noqa: BLE001 - never raise from a callback
        log.exception("pgdr could not send the recovery message.")


class _Notifier(BaseNotifier):
    """A pgdr notifier: nothing templated (the words come from pgdr.messages), so nothing is rendered.

    Rendering would need the DAG's template environment, which the serialized DAG a run-level
    callback gets (``dag.test()``, the DAG processor) does not have.
    """

    def render_template_fields(self, context, jinja_env=None) -> None:
        return None


class TaskFailureJournal(_Notifier):
    """``on_failure_callback`` of every pgdr task: journal the failure for the run's one alert."""

    def notify(self, context) -> None:
        on_task_failure(context)


class RunFailureNotifier(_Notifier):
    """DAG ``on_failure_callback``: one Slack message per failed run, then mark the DAG failing."""

    def notify(self, context) -> None:
        on_run_failure(context)


class RunRecoveryNotifier(_Notifier):
    """DAG ``on_success_callback``: a recovery message if the DAG was failing."""

    def notify(self, context) -> None:
        on_run_success(context)


def run_callbacks() -> dict:
    """Return the DAG-level callbacks every pgdr DAG uses (splat into ``@dag``): notifiers, as Airflow's convention
    is."""
    return {"on_failure_callback": RunFailureNotifier(), "on_success_callback": RunRecoveryNotifier()}


# -- Deadline Alert callbacks (run by the triggerer; context: dag_run dict and deadline) -------------


def _deadline_facts(context, base_url: str) -> dict[str, str]:
    from pgdr.messages import run_url

    dag_run = (context or {}).get("dag_run") or {}
    deadline = (context or {}).get("deadline") or {}
    dag_id = dag_run.get("dag_id", "?")
    run_id = dag_run.get("dag_run_id") or dag_run.get("run_id") or "?"
    return {
        "run_id": run_id,
        "queued_at": str(dag_run.get("queued_at") or "unknown"),
        "deadline_time": str(deadline.get("deadline_time") or "unknown"),
        "url": run_url(base_url, dag_id, run_id),
    }


async def deadline_warning(
    *, dag_id: str, scope: str, target: str, slack_conn_id: str, base_url: str, context=None
) -> str:
    """Deadline Alert callback at 80 % of the target: a Slack warning."""
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    from pgdr.messages import deadline_message

    facts = _deadline_facts(context, base_url)
    text = deadline_message(
        "warning", dag_id, scope, target, facts["run_id"], facts["queued_at"], facts["deadline_time"], facts["url"]
    )
    await asyncio.to_thread(SlackWebhookNotifier(slack_webhook_conn_id=slack_conn_id, text=text).notify, context or {})
    return "slack warning sent"


async def deadline_missed_slack(
    *, dag_id: str, scope: str, target: str, slack_conn_id: str, base_url: str, context=None
) -> str:
    """Deadline Alert callback at 100 % of the target: a Slack message."""
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    from pgdr.messages import deadline_message

    facts = _deadline_facts(context, base_url)
    text = deadline_message(
        "missed", dag_id, scope, target, facts["run_id"], facts["queued_at"], facts["deadline_time"], facts["url"]
    )
    await asyncio.to_thread(SlackWebhookNotifier(slack_webhook_conn_id=slack_conn_id, text=text).notify, context or {})
    return "slack miss sent"


async def deadline_missed_email(
    *,
    dag_id: str,
    scope: str,
    target: str,
    smtp_conn_id: str,
    email_to: list[str],
    email_from: str,
    base_url: str,
    context=None,
) -> str:
    """Deadline Alert callback at 100 % of the target: the SLA-miss e-mail."""
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    from pgdr.messages import sla_miss_email

    facts = _deadline_facts(context, base_url)
    subject, body = sla_miss_email(
        dag_id, scope, target, facts["run_id"], facts["queued_at"], facts["deadline_time"], facts["url"]
    )
    # notify() sends the fields as they are (rendering happens only when a notifier is called).
    notifier = SmtpNotifier(
        from_email=email_from, to=list(email_to), subject=subject, html_content=body, smtp_conn_id=smtp_conn_id
    )
    await asyncio.to_thread(notifier.notify, context or {})
    return f"SLA-miss e-mail sent to {', '.join(email_to)}"
