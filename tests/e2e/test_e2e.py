"""End to end: the incident restore through a real Airflow, its REST API and its UI."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest
from conftest import source_row_counts

pytestmark = pytest.mark.e2e

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def seeded_backup(e2e_plan, pg_server):
    """A real backup of 'shop' in the standalone's store."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.backup import take_backup
    from pgdr.plan import load_plan
    from pgdr.postgres.client import PgEndpoint

    plan = load_plan(e2e_plan)
    db = plan.databases[0]
    store, layout = open_store(db.storage)
    endpoint = PgEndpoint("127.0.0.1", pg_server.port, "postgres", "shop", pg_server.password)
    work = db.storage.path.parent / "e2e-seed-work"
    return take_backup(db, endpoint, store, layout, work).manifest.backup_id


def test_restore_triggered_through_the_rest_api(standalone, seeded_backup, pg_server, e2e_slack):
    run_id = standalone.trigger(
        "pgdr_restore",
        {"database": "shop", "backup": "latest", "mode": "new-database", "target_name": "shop_e2e_restored"},
    )
    run = standalone.wait_for_run("pgdr_restore", run_id)
    assert run["state"] == "success", (run["task_states"], standalone.log_tail())
    assert run["task_states"]["swap_into_place"] == "skipped"
    try:
        assert source_row_counts(pg_server, "shop_e2e_restored") == source_row_counts(pg_server, "shop")
        assert any("Restore of *shop* restored" in text for text in e2e_slack.texts())
    finally:
        with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS shop_e2e_restored WITH (FORCE)")


@pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium for screenshots: apt-get install chromium")
def test_trigger_form_screenshot(standalone):
    """Open the trigger form in headless Chromium; save the screenshot the README shows."""
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOTS / "restore-trigger-form.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1250})
            page.goto(f"{standalone.base_url}/dags/pgdr_restore", wait_until="networkidle")
            page.get_by_role("button", name="Trigger").first.click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_text("Run Parameters").wait_for()
            text = dialog.inner_text()
            page.screenshot(path=str(target))
        finally:
            browser.close()
    labels = ("Database", "Backup", "Mode", "Confirm (replace and server only)", "Tables (optional)", "Dry run")
    for label in (*labels, "Incident declared at (UTC, optional)", "Incident id (optional)"):
        assert label in text
    assert "latest-verified (the newest backup proven to restore)" in text
    assert "(the database's own server)" in text  # the empty choice has a label: never the word null
    assert target.stat().st_size > 20_000
