"""Imported once by each Celery worker before it forks (see :mod:`pgdr.airflow_glue.celery_config`): the libraries
pgdr's tasks import that are slow to import. Importing them starts no thread (checked by a test), so forking after
is safe. A module that cannot be imported here is imported by the task that needs it, with its own error there.

Third-party libraries only: pgdr's own modules are imported by each task, so that new plugin code deployed to a
running worker is what its next task runs (a library upgrade restarts the workers anyway). The one exception is the
correction to Airflow's task supervisor, which runs in the worker's pool processes, not in a task:
:mod:`pgdr.airflow_glue.task_exit` (a task's exit seen at once, not up to 5 s later)."""

from __future__ import annotations

import importlib
import logging
import os
import time

from pgdr.airflow_glue import task_exit

log = logging.getLogger(__name__)

MODULES = (
    "great_expectations",
    "great_expectations.expectations.expectation_configuration",
    "great_expectations.data_context.types.base",
    "psycopg",
    "boto3",
    "airflow.providers.amazon.aws.hooks.s3",
)


def warm_botocore() -> dict:
    """Parse botocore's endpoint and S3 model files once, in the worker, so that the tasks it forks share them
    (:func:`pgdr.airflow_glue.connections.s3_client`); return ``{data path: loader}``, or ``{}`` if that fails (boto3
    missing, an unreadable AWS config file): the worker starts all the same, and each task reads the files itself."""
    try:
        import boto3

        session = boto3.session.Session()  # boto3's session adds its own data path to the loader
        # A client made and dropped reads every file a task's client needs; explicit keys and endpoint, so that no
        # credential provider (an instance metadata service) is asked and nothing is connected to.
        session.client(
            "s3",
            region_name="us-east-1",
            endpoint_url="http://127.0.0.1:9",
            aws_access_key_id="-",
            aws_secret_access_key="-",
        )
        botocore_session = session._session
        return {botocore_session.get_config_variable("data_path"): botocore_session.get_component("data_loader")}
    except Exception as err:  # noqa: BLE001 - the tasks make their clients themselves, with their own errors
        log.warning("pgdr preload: botocore's files not read ahead (%s); each task reads them.", err)
        return {}


def preload(modules: tuple[str, ...] = MODULES) -> dict[str, float]:
    """Import ``modules``; return the seconds each took (a failed one is logged and skipped)."""
    took = {}
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # as pgdr.checks.validation sets it, before the import
    for name in modules:
        started = time.monotonic()
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - the task that needs it reports it, with its own context
            log.warning("pgdr preload: %s not imported (%s); the tasks import it themselves.", name, err)
            continue
        took[name] = time.monotonic() - started
    log.info("pgdr preload: %d modules imported in %.1fs before the pool forks.", len(took), sum(took.values()))
    return took


SECONDS = preload()
BOTOCORE_LOADERS = warm_botocore()
SUPERVISOR_WAITS_ON_EXIT = task_exit.install()
