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
