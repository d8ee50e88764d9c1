"""A database as unfriendly as production schemas round-trips through every pgdr path, exactly.

``tests/sql/hostile.sql`` holds quoted, mixed-case, unicode and emoji names, reserved words, a
leading dash, ``%``, braces, colons and double quotes in names, two tables that a bare dot would
confuse (``"a.b".c`` and ``a."b.c"``), identity and generated columns, citext and hstore, enum and
domain types, a deferrable composite foreign key, a partitioned, an unlogged and a key-less table,
a trigger, views, a sequence near its maximum, large objects, and objects owned by and granted to
roles that the second server does not have. The database's own name has spaces, ``=``, a quote
and unicode. After each restore, a content fingerprint computed in SQL must equal the source's.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from conftest import source_row_counts
from psycopg import sql
from support import fingerprint, load_sql, xcom_of

pytestmark = pytest.mark.integration

HOSTILE_DB = 'Hostile DB=ü -x "q"'
SQL_FILE = Path(__file__).parents[1] / "sql" / "hostile.sql"
ACCOUNTS = '"Sales Dept"."Customer Accounts"'
SUITES = {
    "accounts.yaml": f"""
table: '{ACCOUNTS}'
expectations:
  - type: expect_column_values_to_match_regex
    description: every e-mail has an @
    kwargs: {{column: E-Mail, regex: "@"}}
  - type: expect_column_values_to_be_in_set
    kwargs: {{column: Status, value_set: [new, Active, on hold, closed ✓]}}
""",
    "percent.yaml": """
table: '"%pct {x}:y"."100% {done}:now"'
expectations:
  - type: expect_column_values_to_not_be_null
    kwargs: {column: "p%s"}
  - type: expect_column_values_to_be_in_set
    kwargs: {column: "{b}", value_set: ["{}"]}
""",
}


def _drop(server, name: str) -> None:
    with psycopg.connect(**server.dsn("postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _databases(server) -> set[str]:
    with psycopg.connect(**server.dsn("postgres")) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate")}


@pytest.fixture(scope="module")
def hostile(pg_server, pg_server_b):
    """The hostile database on the shared server, and its fingerprint; everything made from it is dropped after."""
    before = (_databases(pg_server), _databases(pg_server_b))
    load_sql(pg_server, HOSTILE_DB, SQL_FILE)
    yield fingerprint(pg_server.dsn(HOSTILE_DB))
    for server, old in zip((pg_server, pg_server_b), before, strict=True):
        for name in _databases(server) - old:
            _drop(server, name)


@pytest.fixture
def hostile_plan(plan, hostile, pg_server, pg_server_b, monkeypatch, tmp_path):
    suites = tmp_path / "gx" / "hostile"
    suites.mkdir(parents=True)
    for name, text in SUITES.items():
        (suites / name).write_text(text)
    monkeypatch.setenv("PGDR_GX_SUITES", str(suites.parent))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_HOSTILE", pg_server.connection_uri("postgres"))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_OTHER", pg_server_b.connection_uri("postgres"))
    # Verification runs on the second server, which has none of the source's roles.
    return plan(
        databases=[{"name": "hostile", "conn_id": "pgdr_hostile", "dbname": HOSTILE_DB, "verify_conn_id": "pgdr_other"}]
    )


def _ok(dag_run) -> None:
    bad = {task: state for task, state in dag_run.states.items() if state not in ("success", "skipped")}
    assert not bad, dag_run.states


def test_hostile_database_round_trips_through_backup_verify_and_every_restore_mode(
    hostile_plan, hostile, run_dag, pg_server, pg_server_b, slack
):
    from pgdr.airflow_glue.connections import open_store
    from pgdr.incident import render_plan
    from pgdr.logical.catalog import BackupCatalog

    _ok(run_dag("pgdr_backup"))
    store, layout = open_store(hostile_plan.databases[0].storage)
    catalog = BackupCatalog(store, layout, "hostile")
    entry = catalog.latest()
    counts = entry.manifest.row_counts
    # One key per table, written as SQL writes it; the dotted pair stays apart.
    assert counts['"a.b".c'] == 3 and counts['a."b.c"'] == 5
    assert counts[ACCOUNTS] == 301 and counts['"Sales Dept"."Events"'] == 8000
    assert counts['"-dash"."-table"'] == 11 and counts['public."order"'] == 7 and counts['"quote""s"."ta""ble"'] == 19
    assert entry.manifest.large_objects == 2
    assert counts == source_row_counts(pg_server, HOSTILE_DB)  # read from the dump: equal to count(*) on each table

    verify = run_dag("pgdr_verify_restore", run_conf={"database": "hostile", "backup_id": entry.backup_id})
    _ok(verify)
    record = catalog.get(entry.backup_id).verification
    assert record.status == "verified", record
    assert record.validation["failed"] == 0 and len(record.validation["user_suites"]) == 2
    assert record.integrity["large_objects"] == 2 and record.integrity["amcheck_ok"]
    roles = {"pgdr_hostile_owner", "Reporting Role", "Night\nShift"}  # a newline in a name: PostgreSQL accepts it
    assert roles <= set(record.phases["restore_backup"]["roles_created"])
    page = store.get_bytes(layout.validation_key("hostile", entry.backup_id, "report.html")).decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)</script>" not in page
    assert slack.messages == []

    # new-database on the live server, into a target name with spaces and unicode
    _ok(run_dag("pgdr_restore", run_conf={"database": "hostile", "target_name": "Hostile Copy ✓"}))
    assert fingerprint(pg_server.dsn("Hostile Copy ✓")) == hostile

    # new-database onto another server of the plan, where the owning and granted roles do not exist: the restore
    # plan names the roles it will create, a newline in a name shown escaped
    elsewhere = {
        "database": "hostile",
        "target_conn_id": "pgdr_other",
        "target_name": "hostile elsewhere",
        "restore_roles": True,
    }
    dry = run_dag("pgdr_restore", run_conf={**elsewhere, "dry_run": True})
    _ok(dry)
    (line,) = [x for x in render_plan(xcom_of(dry, "plan_restore")).splitlines() if "roles created " in x]
    assert "Night\\x0aShift" in line and "Reporting Role" in line, line
    _ok(run_dag("pgdr_restore", run_conf=elsewhere))
    assert fingerprint(pg_server_b.dsn("hostile elsewhere")) == hostile
    with psycopg.connect(**pg_server_b.dsn("hostile elsewhere")) as conn:
        assert conn.execute(
            "SELECT has_table_privilege(%s, 'public.owned_elsewhere', 'SELECT'), "
            "pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'public.owned_elsewhere'::regclass",
            ("Night\nShift",),
        ).fetchone() == (True, "pgdr_hostile_owner")
    (report,) = [
        text
        for o in store.list(layout.backup_prefix("hostile", entry.backup_id))
        if "/restores/" in o.key
        and o.key.endswith(".md")
        and "Roles created on the target" in (text := store.get_bytes(o.key).decode())
    ]
    assert "Night\\x0aShift" in report and "\nShift" not in report  # the name cannot start a line of its own

    # table-level: two quoted tables, one of the dotted pair, and a partitioned table with its partitions
    wanted = [ACCOUNTS, '"a.b".c', '"Sales Dept"."Events"']
    run = run_dag("pgdr_restore", run_conf={"database": "hostile", "tables": wanted, "target_name": "hostile tables"})
    _ok(run)
    restored = fingerprint(pg_server.dsn("hostile tables"))["tables"]
    filled = {
        ("Sales Dept", "Customer Accounts"),
        ("a.b", "c"),
        ("Sales Dept", "Events 2025"),
        ("Sales Dept", "Events 2026"),
    }
    assert {t: restored[t] for t in filled} == {t: hostile["tables"][t] for t in filled}
    assert restored[("a", "b.c")][0] == 0 and restored[("Sales Dept", "Orders")][0] == 0

    # replace: the restored copy takes the live name; the live database is kept
    before = {n for n in _databases(pg_server) if "_pre_restore_" in n}
    _ok(run_dag("pgdr_restore", run_conf={"database": "hostile", "mode": "replace", "confirm": HOSTILE_DB}))
    assert fingerprint(pg_server.dsn(HOSTILE_DB)) == hostile
    (kept,) = {n for n in _databases(pg_server) if "_pre_restore_" in n} - before
    assert kept.startswith(HOSTILE_DB)
    reports = [
        json.loads(store.get_bytes(o.key))
        for o in store.list(layout.backup_prefix("hostile", entry.backup_id))
        if "/restores/" in o.key and o.key.endswith(".json")
    ]
    assert sorted(r["status"] for r in reports) == ["dry-run"] + ["restored"] * 4


def test_a_backup_written_by_pgdr_0_2_still_verifies_and_restores(plan, run_dag, pg_server, slack):
    """``tests/fixtures/pgdr-0.2-backup`` was written by pgdr 0.2 (commit 2d84e0d): manifest format 1,
    whose row counts join schema and table with a bare dot (``Sales Dept.Customer Accounts``)."""
    import shutil

    fixture = Path(__file__).parents[1] / "fixtures" / "pgdr-0.2-backup"
    (backup_id,) = [p.name for p in (fixture / "v1" / "legacy").iterdir()]
    assert json.loads((fixture / "v1/legacy" / backup_id / "manifest.json").read_text()).get("manifest_format") == 1
    p = plan(databases=[{"name": "legacy", "conn_id": "pgdr_shop", "dbname": "legacy_live"}])
    root = p.databases[0].storage.path
    shutil.copytree(fixture / "v1", root / "v1")

    verify = run_dag("pgdr_verify_restore", run_conf={"database": "legacy", "backup_id": backup_id})
    _ok(verify)
    record = json.loads((root / "v1/legacy" / backup_id / "verification.json").read_text())
    assert record["status"] == "verified" and record["integrity"]["rows_checked"] == 290

    try:
        _ok(run_dag("pgdr_restore", run_conf={"database": "legacy", "target_name": "legacy_copy"}))
        _ok(
            run_dag(
                "pgdr_restore",
                run_conf={
                    "database": "legacy",
                    "target_name": "legacy_accounts",
                    "tables": ['"Sales Dept"."Customer Accounts"'],
                },
            )
        )
        with psycopg.connect(**pg_server.dsn("legacy_copy")) as conn:
            assert conn.execute('SELECT count(*) FROM "Sales Dept"."Customer Accounts"').fetchone() == (40,)
            assert conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone() == (1,)
        with psycopg.connect(**pg_server.dsn("legacy_accounts")) as conn:
            assert conn.execute('SELECT count(*) FROM "Sales Dept"."Customer Accounts"').fetchone() == (40,)
            assert conn.execute("SELECT count(*) FROM public.items").fetchone() == (0,)
    finally:
        for name in ("legacy_copy", "legacy_accounts"):
            _drop(pg_server, name)


def test_a_backup_written_by_pgdr_0_3_still_verifies_and_restores_with_its_owners(plan, run_dag, pg_server, slack):
    """``tests/fixtures/pgdr-0.3-backup`` was written by pgdr 0.3.0.dev0 (commit fc6ce83, before the typed records,
    the thin tasks and the moves of wave 3): manifest format 2 with the source server's roles (``globals.sql``), a
    schema and a table owned by a role the test server lacks, a grant to another, a large object and a database
    setting. Written by ``tests/fixtures/make_0_3_backup.py`` run on that commit."""
    import shutil

    fixture = Path(__file__).parents[1] / "fixtures" / "pgdr-0.3-backup"
    (backup_id,) = [p.name for p in (fixture / "v1" / "legacy3").iterdir()]
    p = plan(databases=[{"name": "legacy3", "conn_id": "pgdr_shop", "dbname": "legacy3_live"}])
    root = p.databases[0].storage.path
    shutil.copytree(fixture / "v1", root / "v1")
    roles = ("Legacy Owner", "legacy_reader")
    try:
        _ok(run_dag("pgdr_verify_restore", run_conf={"database": "legacy3", "backup_id": backup_id}))
        record = json.loads((root / "v1/legacy3" / backup_id / "verification.json").read_text())
        assert record["status"] == "verified" and record["integrity"]["rows_checked"] == 290, record
        assert record["privileges"]["owners"] >= 2 and record["privileges"]["grants"] >= 2, record["privileges"]
        restore = {"database": "legacy3", "target_name": "legacy3_copy", "restore_roles": True}
        _ok(run_dag("pgdr_restore", run_conf=restore))
        with psycopg.connect(**pg_server.dsn("legacy3_copy")) as conn:
            table = '"Sales Dept"."Customer Accounts"'
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (40,)
            assert conn.execute(
                f"SELECT relowner::regrole::text FROM pg_class WHERE oid = '{table}'::regclass"
            ).fetchone() == ('"Legacy Owner"',)
            assert conn.execute(f"SELECT has_table_privilege('legacy_reader', '{table}', 'SELECT')").fetchone() == (
                True,
            )
            assert conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone() == (1,)
            assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
    finally:
        _drop(pg_server, "legacy3_copy")
        with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
            for role in roles:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
