"""pgdr: a PostgreSQL disaster-recovery plan, as Airflow DAGs that really run.

The package is split by concern: :mod:`pgdr.plan` (the DR plan), :mod:`pgdr.layout` and
:mod:`pgdr.storage` (where bytes live), :mod:`pgdr.postgres` (the database side),
:mod:`pgdr.catalog` (manifests and states), :mod:`pgdr.backup`, :mod:`pgdr.retention`,
:mod:`pgdr.alerts` and :mod:`pgdr.notify` (alerting), and :mod:`pgdr.tasks`, the thin layer the
DAG files in ``dags/`` call.
"""

__version__ = "0.2.0"
