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
        alerts.append(
            DeadlineAlert(
                reference=DeadlineReference.DAGRUN_QUEUED_AT,
                interval=window * WARNING_FRACTION,
                callback=AsyncCallback(
                    "pgdr.airflow_glue.notify.deadline_warning",
                    kwargs={**common, "slack_conn_id": notify.slack_conn_id},
                ),
            )
        )
        alerts.append(
            DeadlineAlert(
                reference=DeadlineReference.DAGRUN_QUEUED_AT,
                interval=window,
                callback=AsyncCallback(
                    "pgdr.airflow_glue.notify.deadline_missed_slack",
                    kwargs={**common, "slack_conn_id": notify.slack_conn_id},
                ),
            )
        )
    if notify.smtp_conn_id and notify.email_to:
        alerts.append(
            DeadlineAlert(
                reference=DeadlineReference.DAGRUN_QUEUED_AT,
                interval=window,
                callback=AsyncCallback(
                    "pgdr.airflow_glue.notify.deadline_missed_email",
                    kwargs={
                        **common,
                        "smtp_conn_id": notify.smtp_conn_id,
                        "email_to": list(notify.email_to),
                        "email_from": notify.email_from,
                    },
                ),
            )
        )
    return alerts


def dag_deadline(plan: DRPlan, dag_id: str) -> list | None:
    """Return the Deadline Alerts of one pgdr DAG, the window taken from the promise the DAG keeps.

    * ``pgdr_backup``: the smallest RPO of the plan's databases; ``pgdr_basebackup``: of its servers
      (``None`` without servers);
    * ``pgdr_restore`` and ``pgdr_verify_restore``: the smallest RTO (a slower restore breaks it);
    * ``pgdr_drill``: the drill's ``max_duration``.
    """
    databases = scope_of(plan.database_names)
    if dag_id == "pgdr_backup":
        return deadline_alerts(plan, dag_id, min(db.rpo for db in plan.databases), "RPO", databases)
    if dag_id == "pgdr_basebackup":
        if not plan.servers:
            return None
        return deadline_alerts(plan, dag_id, min(s.pitr.rpo for s in plan.servers), "RPO", scope_of(plan.server_names))
    if dag_id in ("pgdr_restore", "pgdr_verify_restore"):
        return deadline_alerts(plan, dag_id, min(db.rto for db in plan.databases), "RTO", databases)
    if dag_id == "pgdr_drill":
        return deadline_alerts(plan, dag_id, plan.drill.max_duration, "drill limit", databases)
    raise ValueError(f"{dag_id} keeps no promise with a deadline")
