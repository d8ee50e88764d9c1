"""pgdr_drill and pgdr_health with dag.test(): measured numbers, reports, alerts on change only."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import statsd_packets
from pgdr.records import VerificationRecord
from support import copy_backup_as

pytestmark = pytest.mark.integration

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def second_database(pg_server, monkeypatch):
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS shop_eu WITH (FORCE)")
        conn.execute("CREATE DATABASE shop_eu TEMPLATE shop")
    with psycopg.connect(**pg_server.dsn("shop_eu"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")  # not trusted: the restore role may not create it
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_SHOP_EU", pg_server.connection_uri("shop_eu"))
    yield "shop_eu"
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS shop_eu WITH (FORCE)")


def test_drill_over_two_databases_measures_reports_and_flags_a_breached_rto(
    plan, run_dag, s3_server, s3_storage, second_database, slack, mail, monkeypatch, pg_server
):
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_SMTP", mail.connection())
    before_mail = len(mail.messages)
    p = plan(
        databases=[
            {"name": "shop", "conn_id": "pgdr_shop"},
            {"name": "shop_eu", "conn_id": "pgdr_shop_eu", "rto": "1s"},
        ],
        storage=s3_storage,
        defaults={
            "notify": {"slack_conn_id": "pgdr_slack", "smtp_conn_id": "pgdr_smtp", "email_to": ["dr@example.com"]}
        },
    )
    # An older verified backup of each, so the RPO numbers have history to read.
    run_dag("pgdr_backup")
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    store, layout = open_store(p.databases[0].storage)
    for name in ("shop", "shop_eu"):
        catalog = BackupCatalog(store, layout, name)
        catalog.record_verification(
            VerificationRecord.from_dict({"backup_id": catalog.latest().backup_id, "status": "verified"})
        )

    # Two incidents restored by hand (one this week, one too old for the year's trend) and a file that is not a
    # record: the drill's MTTR trend shows the first beside its own restores.
    from pgdr.incident_review import incident_record, store_incident_record

    for incident_id, days in (("INC-3", 3), ("INC-OLD", 400)):
        declared = datetime.now(UTC) - timedelta(days=days)
        measures = {"id": incident_id, "declared_at": declared.isoformat(), "mttr_seconds": 1260.0}
        record = incident_record("database restore", "shop", f"manual__{days}", "restored", measures, 3600.0)
        store_incident_record(store, layout, {**record, "data_loss_window_seconds": 300.0, "mode": "replace"})
    store.put_bytes(layout.incident_key("20261201T000000Z", "junk"), b"not a record")

    dag_run = run_dag("pgdr_drill")
    assert str(dag_run.state) == "success", dag_run.states  # a breach is reported, not a crash
    assert dag_run.states["publish_report"] == "success"

    keys = [
        o["Key"]
        for o in s3_server.client.list_objects_v2(
            Bucket="pgdr-test-backups", Prefix=f"{p.databases[0].storage.prefix}/v1/reports/drills/"
        )["Contents"]
    ]
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"drill.json", "drill.md", "drill.html", "trend.png"} <= names
    report = json.loads(store.get_bytes(next(k for k in keys if k.endswith("drill.json"))))
    by_db = {r["database"]: r for r in report["databases"]}
    assert set(by_db) == {"shop", "shop_eu"}
    for result in by_db.values():
        names = [ph["name"] for ph in result["phases"]]
        assert names == ["dump", "upload", "checksum", "download", "restore", "checks", "validation", "privileges"]
        for ph in result["phases"]:  # every duration is its own timestamps' difference
            span = (
                datetime.fromisoformat(ph["finished_at"]) - datetime.fromisoformat(ph["started_at"])
            ).total_seconds()
            assert abs(span - ph["seconds"]) < 0.01
        phases = {ph["name"]: ph for ph in result["phases"]}
        rto = result["checks"]["rto"]["achieved_s"]
        wall = (
            datetime.fromisoformat(phases["privileges"]["finished_at"])
            - datetime.fromisoformat(phases["checksum"]["started_at"])
        ).total_seconds()
        assert rto == pytest.approx(wall)
        assert (
            rto
            >= sum(
                phases[n]["seconds"] for n in ("checksum", "download", "restore", "checks", "validation", "privileges")
            )
            - 0.01
        )
        assert result["negative_control"]["rejected"] is True
        assert result["negative_control"]["message"].startswith("a flipped bit: rejected, content changed: SHA-256")
        # The RPO is read as it stood when the drill started: the drill's own backup is not in it.
        assert result["rpo"]["newest_verified_age_s"] > 0 and result["rpo"]["backups_in_window"] == 1
        assert result["validation"]["failed"] == 0
    assert by_db["shop"]["status"] == "pass" and by_db["shop"]["action_items"] == []
    assert by_db["shop"]["restored"]["extensions_created"] == []
    assert by_db["shop_eu"]["restored"]["extensions_created"] == ["pg_stat_statements"]
    breach = by_db["shop_eu"]
    assert breach["status"] == "fail" and breach["checks"]["rto"]["met"] is False
    assert any("over the RTO of 1.0s" in item for item in breach["action_items"])
    assert report["status"] == "fail"
    assert [i["id"] for i in report["incidents"]] == ["INC-3"]
    trend = report["mttr_trend"]
    assert [(r["what"], r["subject"], r["seconds"]) for r in trend if r["incident"]] == [
        ("incident INC-3", "shop", 1260.0)
    ]
    assert {r["subject"]: r["seconds"] for r in trend if not r["incident"]} == {
        "shop": by_db["shop"]["checks"]["rto"]["achieved_s"],
        "shop_eu": breach["checks"]["rto"]["achieved_s"],
    }
    markdown = store.get_bytes(next(k for k in keys if k.endswith("drill.md"))).decode()
    assert "## MTTR: incidents and drills" in markdown and "1 incident, MTTR median 21m" in markdown
    assert "| incident INC-3: database restore (replace), restored | shop | 21m" in markdown
    assert markdown.count("created by the server's own connection: pg_stat_statements") == 1

    html = store.get_bytes(next(k for k in keys if k.endswith("drill.html"))).decode()
    assert "data:image/png;base64," in html and "over the RTO of 1.0s" in html
    assert "<h2>MTTR: incidents and drills</h2>" in html and "incident INC-3" in html
    assert "created by the server&#x27;s own connection: pg_stat_statements" in html
    (summary,) = [t for t in slack.texts() if "DR drill" in t]
    assert "shop_eu: FAIL | RTO" in summary and "shop: PASS" in summary
    emails = mail.messages[before_mail:]
    assert (
        len(emails) == 1 and emails[0]["Subject"].startswith("[pgdr] DR drill ") and emails[0]["To"] == "dr@example.com"
    )

    if CHROMIUM:
        page = SCREENSHOTS.parent / "drill-report.html"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.write_text(html)
        import subprocess

        subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={p.path.parent / 'chromium'}",
                "--window-size=1200,1350",
                f"--screenshot={SCREENSHOTS / 'drill-report.png'}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        page.unlink()
        assert (SCREENSHOTS / "drill-report.png").stat().st_size > 20_000


@pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium to render the report: apt-get install chromium")
def test_drill_report_screenshot_exists():
    """The README shows the drill report as rendered by headless Chromium in the test above."""
    assert (SCREENSHOTS / "drill-report.png").exists()


def test_negative_control_that_passes_undetected_fails_the_drill(plan, run_dag, monkeypatch):
    """If verification could not tell a corrupted copy, the drill must fail."""
    import pgdr.logical.restore

    plan()
    monkeypatch.setattr(pgdr.logical.restore, "verify_checksums", lambda *a, **k: {"seconds": 0, "bytes": 0})
    dag_run = run_dag("pgdr_drill")
    assert dag_run.states["rehearse.negative_control[0]"] == "success"
    assert dag_run.states["publish_report"] == "failed"
    assert str(dag_run.state) == "failed"


def _stale_backup(p, days: float):
    """A verified backup of 'shop' whose recovery point lies ``days`` in the past."""
    from pgdr.airflow_glue.connections import database_endpoint, open_store
    from pgdr.logical.backup import take_backup
    from pgdr.logical.catalog import BackupCatalog

    db = p.databases[0]
    store, layout = open_store(db.storage)
    real = take_backup(db, database_endpoint(db), store, layout, db.storage.path.parent / "work").manifest
    catalog = BackupCatalog(store, layout, "shop")
    when = datetime.now(UTC) - timedelta(days=days)
    old_id = f"{when:%Y%m%dT%H%M%SZ}-abcdef"
    copy_backup_as(store, layout, real, old_id, when)
    catalog.delete_backup(real.backup_id)
    catalog.record_verification(
        VerificationRecord.from_dict({"backup_id": old_id, "status": "verified", "restore_seconds": 3.5})
    )
    return catalog


@pytest.fixture
def worker_metrics():
    """Initialise Airflow's metrics as a real task runner does (dag.test() runs tasks in-process and does not)."""
    from airflow.sdk.observability import stats
    from airflow.sdk.observability.metrics import stats_utils

    # Left initialised afterwards: the StatsD listener lives for the whole session.
    stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)


def test_health_alerts_on_change_of_state_only(plan, run_dag, slack, worker_metrics):
    p = plan()
    catalog = _stale_backup(p, days=2)

    first = run_dag("pgdr_health")
    assert str(first.state) == "success"  # failing checks are reported, not failed
    (alert,) = slack.texts()
    assert alert.startswith(":red_circle: [pgdr] health check failing:")
    assert "shop: backup_age: the newest backup" in alert and "2d" not in alert.split("the RPO")[1][:5]
    assert "shop: verified_age:" in alert
    assert "source" not in alert and "storage" not in alert  # those are fine: not news

    slack.clear()
    second = run_dag("pgdr_health")
    assert str(second.state) == "success"
    assert slack.messages == []  # still failing, nothing new to say

    from pgdr.airflow_glue.connections import database_endpoint, open_store
    from pgdr.logical.backup import take_backup

    db = p.databases[0]
    store, layout = open_store(db.storage)
    fresh = take_backup(db, database_endpoint(db), store, layout, db.storage.path.parent / "work2").manifest
    catalog.record_verification(
        VerificationRecord.from_dict({"backup_id": fresh.backup_id, "status": "verified", "restore_seconds": 2.5})
    )
    statsd_packets()
    run_dag("pgdr_health")
    (recovery,) = slack.texts()
    assert recovery.startswith(":large_green_circle: [pgdr] health check recovered:")
    assert "shop: backup_age:" in recovery and "shop: verified_age:" in recovery
    metrics = statsd_packets()
    assert any(m.startswith("airflow.pgdr.backup_age_seconds.shop:") and m.endswith("|g") for m in metrics), metrics
    assert any(m.startswith("airflow.pgdr.last_restore_seconds.shop:2.5|g") for m in metrics), metrics


def test_health_storage_check_writes_one_probe_per_database_and_never_deletes(plan, run_dag, slack):
    """The workers' credentials need no delete (README, least privilege): the probe is one object per database,
    written again by every run, never a pile of them."""
    p = plan()
    run_dag("pgdr_health")
    run_dag("pgdr_health")
    probes = sorted(path.name for path in (p.databases[0].storage.path / "v1" / "_probe").glob("*"))
    assert probes == ["shop"]
    from pgdr.airflow_glue.alert_journal import AlertJournal

    state = AlertJournal.for_plan().get_state("health-storage-shop")
    assert state["ok"] is True and "is writable" in state["detail"]
