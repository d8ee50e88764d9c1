"""The thin Airflow-facing layer: one module per DAG in ``dags/`` (``tasks/backup.py`` for
``dags/pgdr_backup.py``...) plus :mod:`pgdr.tasks.common`. Only DAG files import these modules."""
