"""Alerting under a real scheduler: deadline alerts, SLA-miss e-mail, one failure message per run, recovery."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from conftest import E2E_RTO_SECONDS
from support import wait_for

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "alerts"


def _for_run(texts: list[str], run_id: str) -> list[str]:
    return [t for t in texts if run_id in t]


def test_slow_run_misses_its_deadline_one_email_and_one_slack_message(
    standalone, e2e_mail, e2e_slack, e2e_plan, pg_server
):
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.backup import take_backup
    from pgdr.plan import load_plan
    from pgdr.postgres.client import PgEndpoint

    plan = load_plan(e2e_plan)
    db = plan.databases[0]
    store, layout = open_store(db.storage)
    endpoint = PgEndpoint("127.0.0.1", pg_server.port, "postgres", "shop", pg_server.password)
    backup_id = take_backup(db, endpoint, store, layout, db.storage.path.parent / "e2e-alert-work").manifest.backup_id

    # A verification takes longer than the plan's (deliberately tight) RTO of a few seconds.
    run_id = standalone.trigger("pgdr_verify_restore", {"database": "shop", "backup_id": backup_id})
    run = standalone.wait_for_run("pgdr_verify_restore", run_id)
    assert run["state"] == "success", run["task_states"]

    subject = f"[pgdr] SLA missed: pgdr_verify_restore 22 databases (RTO {E2E_RTO_SECONDS}s)"
    emails = wait_for(lambda: [m for m in e2e_mail.messages if run_id in e2e_mail.body(m)], timeout=60)
    assert len(emails) == 1
    email = emails[0]
    assert email["Subject"] == subject
    assert email["To"] == "oncall@example.com"
    body = e2e_mail.body(email)
    assert "Queued at" in body and "Deadline" in body
    assert f"{standalone.base_url}/dags/pgdr_verify_restore/runs/" in body

    missed = wait_for(lambda: [t for t in _for_run(e2e_slack.texts(), run_id) if "SLA missed" in t], timeout=60)
    assert len(missed) == 1
    assert missed[0].startswith(
        ":rotating_light: [pgdr] SLA missed: pgdr_verify_restore 22 databases did not finish within its RTO"
    )
    warnings = [t for t in _for_run(e2e_slack.texts(), run_id) if "SLA at risk" in t]
    assert len(warnings) == 1

    # Later tests back up 22 databases; their asset events must not start verifications here.
    standalone.api("PATCH", "/api/v2/dags/pgdr_verify_restore", {"is_paused": True})
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    (EXAMPLES / "sla-miss-email.txt").write_text(f"Subject: {email['Subject']}\nTo: {email['To']}\n\n{body}\n")
    (EXAMPLES / "slack-deadline-missed.txt").write_text(missed[0] + "\n")


def test_failed_run_alerts_once_and_the_next_good_run_recovers(standalone, e2e_slack, pg_server):
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS flaky")

    failed_id = standalone.trigger("pgdr_backup")
    failed = standalone.wait_for_run("pgdr_backup", failed_id)
    assert failed["state"] == "failed", failed["task_states"]
    failures = wait_for(
        lambda: [t for t in _for_run(e2e_slack.texts(), failed_id) if "[pgdr] pgdr_backup" in t], timeout=60
    )
    assert len(failures) == 1
    text = failures[0]
    assert text.startswith(":red_circle: [pgdr] pgdr_backup for database *flaky* failed")
    assert "phase `protect_pgdr_shop.back_up`" in text and 'database "flaky" does not exist' in text
    assert "Attempt 1 of 1" in text and f"{standalone.base_url}/dags/pgdr_backup/runs/" in text

    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE flaky TEMPLATE shop")
    try:
        good_id = standalone.trigger("pgdr_backup")
        good = standalone.wait_for_run("pgdr_backup", good_id)
        assert good["state"] == "success", good["task_states"]
        recovered = wait_for(lambda: [t for t in _for_run(e2e_slack.texts(), good_id) if "recovered" in t], timeout=60)
        assert len(recovered) == 1
        assert recovered[0].startswith(f":large_green_circle: [pgdr] pgdr_backup recovered: run {good_id} succeeded")
        assert f"run {failed_id})" in recovered[0]  # it names the run that started the failing streak
        # One failure message for the failed run, nothing more about it.
        assert len([t for t in e2e_slack.texts() if failed_id in t and "failed" in t and "recovered" not in t]) == 1
        EXAMPLES.mkdir(parents=True, exist_ok=True)
        (EXAMPLES / "slack-failure.txt").write_text(text + "\n")
        (EXAMPLES / "slack-recovery.txt").write_text(recovered[0] + "\n")
    finally:
        with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS flaky WITH (FORCE)")


def test_no_secret_reaches_any_alert(standalone, e2e_slack, e2e_mail, pg_server):
    everything = json.dumps(e2e_slack.messages) + "".join(e2e_mail.body(m) for m in e2e_mail.messages)
    assert pg_server.password not in everything
