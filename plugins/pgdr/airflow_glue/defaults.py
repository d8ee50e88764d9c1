"""What every pgdr DAG's tasks share by default: retries with backoff, the failure notifier, a timeout."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pgdr.airflow_glue.notify import TaskFailureJournal
from pgdr.plan import DRPlan

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


RESTORE_TIMEOUT_FLOOR = timedelta(hours=6)
RESTORE_TIMEOUT_RTO_FACTOR = 4


def restore_timeout(plan: DRPlan) -> timedelta:
    """Return the ``execution_timeout`` of the restore's tasks: four times the plan's largest RTO, never under 6 h.

    A timeout only ever stops a stuck task; a restore that runs past its RTO is already alerted by the
    DAG's deadline and must be left to finish (a 500 GB database with an 8-hour RTO gets 32 hours, not
    6 hours that would kill it near the end).
    """
    largest = max((db.rto for db in plan.databases), default=timedelta(0))
    return max(RESTORE_TIMEOUT_FLOOR, RESTORE_TIMEOUT_RTO_FACTOR * largest)
