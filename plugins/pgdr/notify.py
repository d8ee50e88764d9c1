"""Kept for deadline alerts stored by pgdr 0.2: they name their callbacks ``pgdr.notify.*``.

Airflow stores a Deadline Alert's callback as an import path with each DAG run; runs created
before the package was grouped (pgdr 0.2) still point here when their deadline passes. The
callbacks live in :mod:`pgdr.airflow_glue.notify`; new DAG runs name them there.
"""

from pgdr.airflow_glue.notify import deadline_missed_email, deadline_missed_slack, deadline_warning

__all__ = ["deadline_missed_email", "deadline_missed_slack", "deadline_warning"]
