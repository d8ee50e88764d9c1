"""SLAs as Airflow 3 Deadline Alerts, derived from the DR plan's promises.

Each pgdr DAG must finish within a window measured from when its run was queued (a reference
that exists for scheduled, manual and asset-triggered runs alike; logical-date deadlines are
skipped by Airflow for runs without a logical date):

* ``pgdr_backup``: its RPO (a backup slower than the RPO breaks the RPO by itself);
* ``pgdr_verify_restore`` and ``pgdr_restore``: the RTO;

At 80 % of the window Slack gets a warning; at 100 % Slack gets a miss message and the plan's
recipients an SLA-miss e-mail. The triggerer runs the callbacks in :mod:`pgdr.airflow_glue.notify`.

``dag.test()`` cannot run DAGs with deadlines (it never fires them, and crashes at the end of
the run in Airflow 3.3.2), so pgdr's local runner sets ``PGDR_DEADLINES=off`` and the DAGs are
built without them there; deadline behaviour is tested under a real scheduler instead.
"""

from __future__ import annotations

import os
from datetime import timedelta

from pgdr.messages import short_duration
from pgdr.plan import DRPlan

DEADLINES_ENV_VAR = "PGDR_DEADLINES"
WARNING_FRACTION = 0.8


def scope_of(names: list[str]) -> str:
    """Return how a message names the databases a DAG covers."""
    return ", ".join(names) if len(names) <= 3 else f"{len(names)} databases"


def deadline_alerts(plan: DRPlan, dag_id: str, window: timedelta, target_name: str, scope: str) -> list:
    """Return the Deadline Alerts of one DAG: a Slack warning at 80 %, Slack and e-mail at 100 %.

    :param target_name: ``RPO`` or ``RTO``: what the window stands for, as messages say it.
    """
    if os.environ.get(DEADLINES_ENV_VAR, "on").lower() in ("off", "false", "0"):
        return []
    from airflow.configuration import conf
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    notify = plan.notify
    base_url = conf.get("api", "base_url", fallback="http://localhost:8080")
    target = f"{target_name} {short_duration(window)}"
    common = {"dag_id": dag_id, "scope": scope, "target": target, "base_url": base_url}
    alerts = []
    if notify.slack_conn_id:
        alerts.append(DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=window * WARNING_FRACTION,
            callback=AsyncCallback("pgdr.airflow_glue.notify.deadline_warning", kwargs={**common, "slack_conn_id": notify.slack_conn_id}),
        ))
        alerts.append(DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=window,
            callback=AsyncCallback("pgdr.airflow_glue.notify.deadline_missed_slack", kwargs={**common, "slack_conn_id": notify.slack_conn_id}),
        ))
    if notify.smtp_conn_id and notify.email_to:
        alerts.append(DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=window,
            callback=AsyncCallback("pgdr.airflow_glue.notify.deadline_missed_email", kwargs={
                **common, "smtp_conn_id": notify.smtp_conn_id, "email_to": list(notify.email_to),
                "email_from": notify.email_from,
            }),
        ))
    return alerts
