"""The S3 client pgdr makes from an Airflow connection: the connection's endpoint, keys and region with pgdr's timeouts,
without walking the call stack for a user agent (39 % of a Celery task's CPU, measured), and with botocore's data
files parsed once per process (or once per Celery worker, before it forks)."""

from __future__ import annotations

import inspect

import botocore.loaders
import pytest
from conftest import BUCKET
from support import botocore_read_recorder


def _target(prefix: str):
    from pgdr.plan import StorageTarget

    return StorageTarget(name="s3", kind="s3", bucket=BUCKET, prefix=prefix, aws_conn_id="pgdr_s3")


@pytest.fixture
def files_read(monkeypatch):
    """The botocore data files read from disk while the test runs."""
    read = []
    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file", botocore_read_recorder(read))
    return read


def test_the_store_speaks_to_the_connections_endpoint_with_pgdrs_timeouts_and_no_stack_walk(
    env, s3_server, monkeypatch
):
    from pgdr.airflow_glue.connections import open_store

    walks = []  # the provider swallows any error of its probe, so the walks are counted, not failed
    monkeypatch.setattr(inspect, "stack", lambda *args, **kwargs: walks.append(args) or [])
    store, layout = open_store(_target(env["prefix"]))
    assert walks == []

    key = f"{env['prefix']}/probe"
    store.put_bytes(key, b"pgdr")  # a real round trip through moto's HTTP server
    assert store.get_bytes(key) == b"pgdr"
    assert layout.prefix == env["prefix"]
    meta = store.client.meta
    assert meta.endpoint_url == f"http://127.0.0.1:{s3_server.port}" and meta.region_name == "us-east-1"
    config = meta.config
    assert (config.connect_timeout, config.read_timeout, config.max_pool_connections) == (5, 60, 16)
    assert config.retries == {"total_max_attempts": 4, "mode": "standard"}  # botocore's name: 1 try + 3 retries
    from pgdr import __version__

    assert f"pgdr/{__version__}" in config.user_agent_extra
    credentials = store.client._request_signer._credentials  # the connection's keys, not the environment's
    assert (credentials.access_key, credentials.secret_key) == ("testing-key", "testing-secret")


def test_a_second_store_in_the_process_reads_no_botocore_file_again(env, files_read):
    from pgdr.airflow_glue.connections import open_store

    first, _ = open_store(_target(env["prefix"]))
    files_read.clear()
    second, _ = open_store(_target(env["prefix"]))
    assert files_read == []
    assert second.client is not first.client
    assert (
        second.client.list_objects_v2(Bucket=BUCKET, Prefix=env["prefix"])["ResponseMetadata"]["HTTPStatusCode"] == 200
    )
