"""Airflow's ``hostname_callable`` for the Celery harness: each local process says its own name.

In docker-compose each component is a container with a host name of its own; here they share a
machine, so each reads ``PGDR_TEST_HOSTNAME`` (set by tests/celery_cluster.py).
"""

import os
import socket


def hostname() -> str:
    return os.environ.get("PGDR_TEST_HOSTNAME") or socket.getfqdn()
