"""Which of pgdr's DAGs a parse of the DAG files builds: all of them, except while this process runs ``dag.test()``.

``dag.test()`` (Airflow 3.3) parses the whole DAGs folder and writes every DAG it finds to the metadata database on
each call (apache/airflow#64884), so that a DAG it triggers is there. One pgdr DAG triggers another
(:data:`TRIGGERS`), and building and serializing the others was a tenth of the CPU of the tests that run DAGs
in-process, and of every break-glass command (:mod:`pgdr.local.runner`). While :func:`only_building` is in force, a
DAG file builds its DAG only if it is one being tested in this process or one that such a DAG triggers; every other
parse (the scheduler's DAG processor, a worker's task process) builds all, as before.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager

_lock = threading.Lock()
_testing: Counter[str] = Counter()  # DAG id -> dag.test() calls of it (or of a DAG triggering it) running now

# The DAGs a pgdr DAG's tasks trigger: the task runner looks each up in the metadata database, so a dag.test() of the
# first must write the second there too (pgdr_restore's verify_evidence_copy: pgdr.tasks.restore). Checked against
# the code by tests/dags/test_dag_integrity.py.
TRIGGERS: dict[str, tuple[str, ...]] = {"pgdr_restore": ("pgdr_verify_restore",)}


def builds(dag_id: str) -> bool:
    """Whether the DAG file of ``dag_id`` should build it now (see the module's docstring)."""
    testing = set(_testing)  # a snapshot: another thread may start or end a dag.test() meanwhile
    return not testing or dag_id in testing


@contextmanager
def only_building(dag_id: str):
    """While the block runs (``dag.test()`` of ``dag_id``), parses build ``dag_id``, the DAGs it triggers
    (:data:`TRIGGERS`) and the DAGs other threads test, not the rest."""
    built = (dag_id, *TRIGGERS.get(dag_id, ()))
    with _lock:
        _testing.update(built)
    try:
        yield
    finally:
        with _lock:
            _testing.subtract(built)
            for name in built:
                if _testing[name] <= 0:
                    del _testing[name]
