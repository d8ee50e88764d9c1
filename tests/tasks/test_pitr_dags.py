"""pgdr_basebackup and pgdr_verify_pitr under dag.test(), against the archiving embedded server and S3."""

from __future__ import annotations

import json

import pytest
from conftest import BUCKET, PITR_PREFIX, PITR_SERVER

pytestmark = pytest.mark.integration


@pytest.fixture
def pitr_plan(plan, env, pitr_server, monkeypatch):
    """A plan with the PITR server: its database 'shop', WAL archive and base backups on S3."""
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_PITR", pitr_server.connection_uri("shop"))
    storage = {"s3": {"type": "s3", "bucket": BUCKET, "prefix": PITR_PREFIX, "aws_conn_id": "pgdr_s3"}}
    return plan(
        databases=[{"name": "shop", "conn_id": "pgdr_pitr", "server": PITR_SERVER}],
        storage=storage,
        servers={PITR_SERVER: {"pitr": {"storage": "s3", "keep_window": "7d", "full_schedule": "@daily",
                                         "incremental_schedule": "@hourly", "archive_timeout": "10s"}}},
    )


def catalog_of(s3_server):
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.storage.backends import S3Store
    from pgdr.storage.layout import PhysicalLayout

    return BaseBackupCatalog(S3Store(s3_server.client, BUCKET), PhysicalLayout(PITR_PREFIX), PITR_SERVER)


def test_base_backups_then_a_verified_point_in_time_recovery(pitr_plan, run_dag, s3_server, slack):
    catalog = catalog_of(s3_server)
    before = {e.backup_id for e in catalog.backups()}
    full = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
    assert full.get_state() == "success", full.states
    incremental = run_dag("pgdr_basebackup", run_conf={"kind": "incremental"})
    assert incremental.get_state() == "success", incremental.states
    new = [e for e in catalog.backups() if e.backup_id not in before]
    assert [e.record.kind for e in new] == ["full", "incremental"]
    assert new[1].record.parent == new[0].backup_id

    verify = run_dag("pgdr_verify_pitr", run_conf={"server": PITR_SERVER})
    assert verify.get_state() == "success", verify.states
    entry = catalog.get(new[1].backup_id)
    assert entry.status == "verified", json.dumps(entry.verification, indent=2, default=str)
    record = entry.verification
    assert record["chain"] == [new[0].backup_id, new[1].backup_id]
    recovery = record["recovery"]
    assert recovery["achieved_recovery_point"] <= record["target"] < recovery["stopped_before_commit_at"]
    assert recovery["wal_bytes_replayed"] > 0 and recovery["replay_seconds"] > 0
    assert record["target_check"]["heartbeats_before_target"] >= 1
    assert record["databases"]["shop"]["integrity"]["amcheck_ok"] is True
    assert record["databases"]["shop"]["validation"]["failed"] == 0
    assert slack.messages == []
