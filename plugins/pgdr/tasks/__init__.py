"""One module per DAG: the bodies of its tasks, each a thin call into the domain.

DAG files call them through :func:`call`, so a DAG file parses without importing pgdr's rules
(the scheduler parses DAG files often; the rules load when a task runs).
"""

from __future__ import annotations

from typing import Any


def call(body: str, *args: Any, **kwargs: Any) -> Any:
    """Run the task body ``<module>.<function>`` of ``pgdr.tasks`` with the running task's context after ``args``.

    The context is Airflow's own (``get_current_context()``), not a copy: what a body puts in it
    (the database and backup it is about) reaches the failure callback that names them in alerts.
    """
    from importlib import import_module

    from airflow.sdk import get_current_context

    module, function = body.rsplit(".", 1)
    return getattr(import_module(f"pgdr.tasks.{module}"), function)(*args, get_current_context(), **kwargs)
