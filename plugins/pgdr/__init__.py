"""pgdr: a PostgreSQL disaster-recovery plan, as Airflow DAGs that really run.

The package is laid out so that ``ls`` says where each concern lives:

* the domain, Airflow-free (importable and testable without Airflow): :mod:`pgdr.plan` (the DR
  plan), :mod:`pgdr.identifiers` (the one rule for names), :mod:`pgdr.errors`,
  :mod:`pgdr.storage` (backends, key layout, the catalog of backups, retention),
  :mod:`pgdr.postgres` (the client side: connections, snapshots, counts, client tools, scratch
  databases), :mod:`pgdr.logical` (logical backup and restore with pg_dump/pg_restore),
  :mod:`pgdr.checks` (integrity checks and Great Expectations validation), :mod:`pgdr.incident`
  (incident restores: choosing a backup, targets, the swap), :mod:`pgdr.drill` (drill measures),
  :mod:`pgdr.health` (health checks), :mod:`pgdr.messages` (the words of every alert) and
  :mod:`pgdr.workdir`;
* :mod:`pgdr.airflow_glue`: connections, callbacks and notifiers, deadline alerts, pools, assets
  and the alert journal;
* :mod:`pgdr.tasks`: one module per DAG in ``dags/``, the thin layer only DAG files call;
* :mod:`pgdr.local`: the embedded PostgreSQL server, the in-process runner and the demo.

The physical side (base backups, WAL, PITR) gets its own package beside :mod:`pgdr.logical`.
"""

__version__ = "0.3.0.dev0"
