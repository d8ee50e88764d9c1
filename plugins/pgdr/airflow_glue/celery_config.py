"""The Celery configuration of pgdr's workers: Airflow's own, plus modules imported once per worker.

Point ``[celery] celery_config_options`` (``AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS``) at
``pgdr.airflow_glue.celery_config.CELERY_CONFIG``, as docker-compose.yaml does. The worker imports
:mod:`pgdr.airflow_glue.preload` at start, before it forks its pool; every task process Airflow then
forks from the pool (Airflow 3's supervisor forks, it does not start a new interpreter) has Great
Expectations (and the other libraries the preload names; not pgdr's own modules) in memory already,
instead of importing them again (about 3-5 s a ``validate_data`` task on a 2-core machine).
"""

from __future__ import annotations

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

CELERY_CONFIG = {
    **DEFAULT_CELERY_CONFIG,
    "imports": (*DEFAULT_CELERY_CONFIG.get("imports", ()), "pgdr.airflow_glue.preload"),
}
