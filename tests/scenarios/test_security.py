"""Security: what a hostile schema, a bucket writer or a concurrent run can do to pgdr, and what they cannot."""

from __future__ import annotations

import json

import psycopg
import pytest
from pgdr.records import VerificationRecord
from psycopg import sql

pytestmark = pytest.mark.integration

ESCALATION = """
CREATE SCHEMA appschema AUTHORIZATION pgdr_app;
SET ROLE pgdr_app;
-- Runs as whoever evaluates the CHECK: during a restore, the role pg_restore logged in as.
CREATE FUNCTION appschema.chk(x int) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE 'ALTER ROLE pgdr_app SUPERUSER';
    END IF;
    RETURN true;
END $$;
CREATE TABLE appschema.t (x int CHECK (appschema.chk(x)));
INSERT INTO appschema.t SELECT generate_series(1, 10);
RESET ROLE;
"""


def _sql(server, statement, db="postgres"):
    with psycopg.connect(**server.dsn(db), autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else None


@pytest.fixture
def escalating_database(pg_server):
    """A database in which an application role owns a schema whose CHECK makes it superuser if it can."""
    _sql(pg_server, "DROP DATABASE IF EXISTS escalate WITH (FORCE)")
    _sql(
        pg_server,
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgdr_app') THEN CREATE ROLE pgdr_app "
        "NOSUPERUSER; END IF; END $$",
    )
    _sql(pg_server, "ALTER ROLE pgdr_app NOSUPERUSER")
    _sql(pg_server, "CREATE DATABASE escalate")
    with psycopg.connect(**pg_server.dsn("escalate"), autocommit=True) as conn:
        conn.execute(ESCALATION)
    yield "escalate"
    before = {r[0] for r in _sql(pg_server, "SELECT datname FROM pg_database WHERE datname LIKE 'escalate%'")}
    for name in before:
        _sql(pg_server, sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)).as_string())
    _sql(pg_server, "ALTER ROLE pgdr_app NOSUPERUSER")


def _superuser(server) -> bool:
    return _sql(server, "SELECT rolsuper FROM pg_roles WHERE rolname = 'pgdr_app'")[0][0]


def test_restores_never_run_restored_code_as_superuser(plan, run_dag, pg_server, escalating_database, monkeypatch):
    """The reproduction of the review: a CHECK that makes its role superuser when evaluated by one.
    Backup, verify-restore and an incident restore all load that table; the role stays as it was."""
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_ESCALATE", pg_server.connection_uri("escalate"))
    p = plan(databases=[{"name": "escalate", "conn_id": "pgdr_escalate"}])
    assert run_dag("pgdr_backup").states["protect_pgdr_escalate.back_up[0]"] == "success"
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    store, layout = open_store(p.databases[0].storage)
    backup_id = BackupCatalog(store, layout, "escalate").latest().backup_id

    verify = run_dag("pgdr_verify_restore", run_conf={"database": "escalate", "backup_id": backup_id})
    assert verify.states["verify.record_verification[0]"] == "success", verify.states
    assert not _superuser(pg_server)
    restore = run_dag("pgdr_restore", run_conf={"database": "escalate", "target_name": "escalate_copy"})
    assert restore.states["write_report"] == "success", restore.states
    assert not _superuser(pg_server)
    # The restore role (no superuser) loaded it; the owners came back afterwards, as the server's connection, with
    # statements that evaluate no CHECK: the copy is owned as the source is, and the application role is still no
    # superuser.
    owners = (
        "SELECT pg_get_userbyid(d.datdba), (SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = "
        "'appschema'), (SELECT relowner::regrole::text FROM pg_class WHERE oid = 'appschema.t'::regclass) FROM "
        "pg_database d WHERE datname = current_database()"
    )
    assert _sql(pg_server, owners, "escalate_copy") == _sql(pg_server, owners, "escalate")
    assert _sql(
        pg_server, "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'appschema.t'::regclass", "escalate_copy"
    ) == [("pgdr_app",)]
    assert not _superuser(pg_server)
    assert _sql(pg_server, "SELECT count(*) FROM appschema.t", "escalate_copy") == [(10,)]


def test_a_superuser_restore_role_is_refused_unless_the_plan_says_so(
    plan, run_dag, pg_server, escalating_database, monkeypatch, slack
):
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_ESCALATE", pg_server.connection_uri("escalate"))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_SUPER", pg_server.connection_uri("postgres"))
    plan(databases=[{"name": "escalate", "conn_id": "pgdr_escalate", "restore_conn_id": "pgdr_super"}])
    run_dag("pgdr_backup")
    slack.clear()
    dag_run = run_dag(
        "pgdr_restore", run_conf={"database": "escalate", "backup": "latest", "target_name": "escalate_copy"}
    )
    assert dag_run.states["plan_restore"] == "failed" and dag_run.tries["plan_restore"] == 1
    assert "is a superuser" in slack.texts()[0] and "Nothing was restored" in slack.texts()[0]
    slack.clear()
    verify = run_dag("pgdr_verify_restore", run_conf={"database": "escalate"})
    assert verify.states["verify.create_scratch[0]"] == "failed" and "is a superuser" in slack.texts()[0]
    assert not _superuser(pg_server)
    assert _sql(pg_server, "SELECT 1 FROM pg_database WHERE datname = 'escalate_copy'") == []


def test_a_plan_without_a_restore_role_says_how_to_add_one(plan, run_dag, pg_server, slack):
    p = plan(databases=[{"name": "shop", "conn_id": "pgdr_shop"}], defaults={"restore_conn_id": None})
    assert p.databases[0].restore_conn_id is None
    run_dag("pgdr_backup")
    slack.clear()
    dag_run = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": "latest"})
    assert dag_run.states["plan_restore"] == "failed"
    assert "has no restore_conn_id" in slack.texts()[0] and "CREATE ROLE pgdr_restore" in slack.texts()[0]


def test_one_damaged_record_does_not_block_an_incident_restore(plan, run_dag, pg_server, slack):
    """A damaged manifest of an old backup and a damaged verification record of another: every
    selector still works, the restore takes the newest verified backup, and health names both."""
    from conftest import backup_into_local_store
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    p = plan()
    root = p.databases[0].storage.path
    old, unreadable, newest = (backup_into_local_store(root, pg_server) for _ in range(3))
    store, layout = open_store(p.databases[0].storage)
    catalog = BackupCatalog(store, layout, "shop")
    for backup_id in (old, unreadable, newest):
        catalog.record_verification(VerificationRecord.from_dict({"backup_id": backup_id, "status": "verified"}))
    (root / "v1/shop" / old / "manifest.json").write_text("{not json")
    (root / "v1/shop" / unreadable / "verification.json").write_text('{"status": "verif')

    assert [e.backup_id for e in catalog.backups()] == [unreadable, newest]
    assert catalog.latest(verified_only=True).backup_id == newest
    assert {d.backup_id for d in catalog.damaged} == {old, unreadable}

    dag_run = run_dag("pgdr_restore", run_conf={"database": "shop", "target_name": "shop_after_damage"})
    try:
        assert dag_run.states["write_report"] == "success", dag_run.states
        (report,) = (root / "v1/shop" / newest / "restores").glob("*.json")
        assert json.loads(report.read_text())["plan"]["backup_id"] == newest
    finally:
        _sql(pg_server, "DROP DATABASE IF EXISTS shop_after_damage WITH (FORCE)")
    slack.clear()
    run_dag("pgdr_health")
    (alert,) = [t for t in slack.texts() if "catalog" in t]
    assert f"{old}: The manifest" in alert and f"{unreadable}: its verification record" in alert


def test_leftovers_are_dropped_only_for_this_database_and_only_when_their_run_is_over(pg_server):
    """Two runs at once (backfills have no shared limit) and databases named shop and shop_eu:
    a run drops only exact-name leftovers of runs that no longer run."""
    from pgdr.postgres.client import PgEndpoint
    from pgdr.postgres.scratch import ScratchDatabase, drop_leftovers, scratch_comment, scratch_name

    server = PgEndpoint("127.0.0.1", pg_server.port, "postgres", "postgres", pg_server.password)
    made = {}
    for key, database, run_id in (
        ("running", "shop", "backfill__A"),
        ("finished", "shop", "backfill__B"),
        ("unknown", "shop", "scheduled__gone"),
        ("eu", "shop_eu", "backfill__C"),
    ):
        scratch = ScratchDatabase(server, scratch_name("verify", database, f"{run_id}/x"))
        scratch.create(scratch_comment(f"verify {database}", run_id))
        made[key] = scratch
    states = {"backfill__A": "running", "backfill__B": "failed"}

    def state(run_id):
        if run_id not in states:
            raise KeyError(run_id)  # Airflow no longer knows the run
        return states[run_id]

    try:
        dropped = drop_leftovers(server, "verify", "shop", "backfill__D", state)
        assert sorted(dropped) == sorted([made["finished"].name, made["unknown"].name])
        assert made["running"].exists() and made["eu"].exists()
    finally:
        for scratch in made.values():
            scratch.drop()


def test_a_finished_new_database_restore_is_never_taken_back_by_its_run(plan, run_dag, pg_server):
    """Clearing restore_backup of a finished new-database run must not drop the copy the
    application went back to: the run's marker is gone once the restore succeeded."""
    from conftest import backup_into_local_store
    from pgdr.incident import InvalidRestoreRequest, create_target, drop_own_target
    from pgdr.postgres.client import PgEndpoint

    p = plan()
    backup_into_local_store(p.databases[0].storage.path, pg_server)
    dag_run = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": "latest", "target_name": "shop_in_use"})
    try:
        assert dag_run.states["write_report"] == "success", dag_run.states
        assert _sql(
            pg_server, "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = 'shop_in_use'"
        ) == [(None,)]
        server = PgEndpoint("127.0.0.1", pg_server.port, "postgres", "postgres", pg_server.password)
        assert drop_own_target(server, "shop_in_use", dag_run.run_id) is False
        with pytest.raises(InvalidRestoreRequest, match="already exists .* and was not created by this run"):
            create_target(server, "shop_in_use", dag_run.run_id)
        assert _sql(pg_server, "SELECT count(*) FROM sales.orders", "shop_in_use") == [(30000,)]
    finally:
        _sql(pg_server, "DROP DATABASE IF EXISTS shop_in_use WITH (FORCE)")


def test_health_warns_while_restore_tests_share_the_production_cluster(plan, run_dag, pg_server_b, monkeypatch, slack):
    from pgdr.airflow_glue.alert_journal import AlertJournal

    plan()  # verify_conn_id defaults to the database's own connection: the production cluster
    run_dag("pgdr_health")
    state = AlertJournal.for_plan().get_state("health-verify_server-shop")
    assert state["ok"] is False and "restore on the production cluster" in state["detail"]
    assert any("shop: verify_server:" in t and "Set verify_conn_id" in t for t in slack.texts()), slack.texts()

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_OTHER", pg_server_b.connection_uri("postgres"))
    plan(databases=[{"name": "shop", "conn_id": "pgdr_shop", "verify_conn_id": "pgdr_other"}])
    slack.clear()
    run_dag("pgdr_health")
    state = AlertJournal.for_plan().get_state("health-verify_server-shop")
    assert state["ok"] is True and "apart from production" in state["detail"]


def test_untrusted_extensions_are_created_by_the_servers_connection_and_restore_as_superuser_is_warned_about(
    plan, run_dag, pg_server, monkeypatch, slack
):
    """A backup that needs extensions only a superuser may create (pg_stat_statements in a schema of the dump, with
    its own comment; amcheck; earthdistance, which requires the trusted cube) is verified and restored as the restore
    role: the server's own connection, a superuser, creates just those extensions first, in the dump's (still empty)
    schemas. Through a server connection that is not a superuser it fails saying so and what to do; with
    restore_as_superuser it verifies, and every report carries the warning."""
    from pgdr.incident import render_plan
    from support import xcom_of

    _sql(pg_server, "DROP DATABASE IF EXISTS needs_super WITH (FORCE)")
    _sql(pg_server, "DROP ROLE IF EXISTS needs_admin")
    _sql(pg_server, "CREATE DATABASE needs_super")
    _sql(
        pg_server,
        'CREATE SCHEMA "Ext Ö"; CREATE EXTENSION pg_stat_statements WITH SCHEMA "Ext Ö"; CREATE EXTENSION amcheck; '
        "CREATE EXTENSION cube; CREATE EXTENSION earthdistance; "
        "COMMENT ON EXTENSION pg_stat_statements IS 'kept: it''s ours ✓'; "
        'CREATE VIEW "Ext Ö"."Statement Count" AS SELECT count(*) AS n FROM "Ext Ö".pg_stat_statements; '
        "CREATE TABLE t AS SELECT generate_series(1, 5) AS x; "
        "CREATE TABLE places AS SELECT ll_to_earth(52.52, 13.40) AS berlin, ll_to_earth(48.86, 2.35) AS paris",
        "needs_super",
    )
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_NEEDS", pg_server.connection_uri("needs_super"))
    copies = ("needs_copy", "needs_tables")
    extensions = (
        "SELECT e.extname, n.nspname, obj_description(e.oid, 'pg_extension') FROM pg_extension e JOIN pg_namespace n "
        "ON n.oid = e.extnamespace WHERE e.extname <> 'plpgsql' ORDER BY 1"
    )
    try:
        p = plan(databases=[{"name": "needs", "conn_id": "pgdr_needs", "dbname": "needs_super"}])
        run_dag("pgdr_backup")
        verified = run_dag("pgdr_verify_restore", run_conf={"database": "needs"})
        assert verified.states["verify.record_verification[0]"] == "success", verified.states
        root = p.databases[0].storage.path
        (record,) = [json.loads(f.read_text()) for f in root.glob("v1/needs/*/verification.json")]
        assert record["status"] == "verified" and not record.get("restored_as_superuser")
        made = ["amcheck", "cube", "earthdistance", "pg_stat_statements"]  # cube: earthdistance requires it
        assert sorted(record["phases"]["restore_backup"]["extensions_created"]) == made, record["phases"]
        dry = run_dag("pgdr_restore", run_conf={"database": "needs", "dry_run": True})
        assert dry.get_state() == "success", dry.states
        (line,) = [x for x in render_plan(xcom_of(dry, "plan_restore")).splitlines() if "extensions " in x]
        assert "(those only a superuser may create are created first by the server's connection)" in line
        assert all(name in line for name in ("pg_stat_statements", "amcheck", "cube", "earthdistance")), line
        restore = run_dag("pgdr_restore", run_conf={"database": "needs", "target_name": "needs_copy"})
        assert restore.states["write_report"] == "success", restore.states
        reports = [f.read_text() for f in root.glob("v1/needs/*/restores/*.md")]
        said = [x for r in reports if "needs_copy" in r for x in r.splitlines() if "server's own connection" in x]
        assert said and all(name in said[0] for name in made), said
        tables = run_dag(
            "pgdr_restore", run_conf={"database": "needs", "target_name": "needs_tables", "tables": ["public.t"]}
        )
        assert tables.states["write_report"] == "success", tables.states
        for copy in copies:
            assert _sql(pg_server, extensions, copy) == _sql(pg_server, extensions, "needs_super"), copy
            assert _sql(pg_server, "SELECT count(*) FROM t", copy) == [(5,)]
            assert _sql(pg_server, """SELECT to_regclass('"Ext Ö"."Statement Count"') IS NOT NULL""", copy) == [(True,)]
        distance = "SELECT round(earth_distance(berlin, paris) / 1000) FROM places"
        assert _sql(pg_server, distance, "needs_copy") == _sql(pg_server, distance, "needs_super") == [(878,)]
        assert _sql(pg_server, "SELECT count(*) FROM places", "needs_tables") == [(0,)]  # only t was asked for
        assert not any("only a superuser may create" in t for t in slack.texts())

        # Through a server connection that is not a superuser (it may create databases for the restore role):
        # the restore role cannot create them, and the failure says what to do.
        _sql(
            pg_server,
            "CREATE ROLE needs_admin LOGIN CREATEDB PASSWORD 'needs-admin-secret'; GRANT pgdr_restore TO needs_admin",
        )
        monkeypatch.setenv(
            "AIRFLOW_CONN_PGDR_NEEDS_ADMIN",
            json.dumps(
                {
                    **json.loads(pg_server.connection_uri("postgres")),
                    "login": "needs_admin",
                    "password": "needs-admin-secret",
                }
            ),
        )
        plan(
            databases=[
                {
                    "name": "needs",
                    "conn_id": "pgdr_needs",
                    "dbname": "needs_super",
                    "verify_conn_id": "pgdr_needs_admin",
                }
            ]
        )
        slack.clear()
        first = run_dag("pgdr_verify_restore", run_conf={"database": "needs"})
        assert first.states["verify.restore_and_check[0]"] == "failed" and first.tries["verify.restore_and_check"] == 1
        alert = next(t for t in slack.texts() if "restore_and_check" in t)
        assert "needs the extension 'amcheck', which only a superuser may create" in alert
        assert "Point that connection at a superuser" in alert and "restore_as_superuser: true" in alert
        assert "needs-admin-secret" not in alert

        p = plan(
            databases=[
                {"name": "needs", "conn_id": "pgdr_needs", "dbname": "needs_super", "restore_as_superuser": True}
            ]
        )
        second = run_dag("pgdr_verify_restore", run_conf={"database": "needs"})
        assert second.states["verify.record_verification[0]"] == "success", second.states
        records = [json.loads(f.read_text()) for f in root.glob("v1/needs/*/verification.json")]
        (as_superuser,) = [r for r in records if r.get("restored_as_superuser")]
        assert as_superuser["status"] == "verified", as_superuser
        assert as_superuser["phases"]["restore_backup"]["extensions_created"] == []  # the restore role made them
        assert any("ran as a superuser" in (r.get("warning") or "") for r in records)
        assert any(
            "restore_as_superuser is set" in f.read_text() for f in root.glob("v1/needs/*/validation/report.html")
        )
        restore = run_dag("pgdr_restore", run_conf={"database": "needs", "target_name": "needs_super_copy"})
        assert restore.states["write_report"] == "success", restore.states
        assert any(
            "**WARNING: restore_as_superuser is set" in f.read_text() for f in root.glob("v1/needs/*/restores/*.md")
        )
    finally:
        for name in ("needs_super", *copies, "needs_super_copy"):
            _sql(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        _sql(pg_server, "DROP ROLE IF EXISTS needs_admin")


def test_an_extension_is_never_created_as_a_superuser_beside_objects_the_restore_role_made(pg_server, tmp_path):
    """The server's connection creates an untrusted extension only in a database holding nothing but the dump's
    schemas: had a CREATE SCHEMA entry of a tampered table of contents also made a function the install script
    could call (here made by hand, as the restore role), it refuses, and creates nothing."""
    import os
    import subprocess

    from pgdr.identifiers import conninfo
    from pgdr.logical.privileges import dump_extensions, read_toc
    from pgdr.logical.restore import RestoreFailed, create_untrusted_extensions
    from pgdr.postgres.binaries import bundled_bin_dir
    from pgdr.postgres.client import PgEndpoint

    for name in ("ext_source", "ext_target"):
        _sql(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    _sql(pg_server, "CREATE DATABASE ext_source")
    _sql(pg_server, "CREATE DATABASE ext_target OWNER pgdr_restore TEMPLATE template0")
    try:
        _sql(pg_server, 'CREATE SCHEMA "Ext Ö"; CREATE EXTENSION pg_stat_statements SCHEMA "Ext Ö"', "ext_source")
        subprocess.run(
            [str(bundled_bin_dir() / "pg_dump"), "-Fd", "-f", str(tmp_path / "dump"), "--dbname"]
            + [conninfo("127.0.0.1", pg_server.port, pg_server.superuser, "ext_source")],
            env={**os.environ, "PGPASSWORD": pg_server.password},
            check=True,
            capture_output=True,
        )
        restorer = PgEndpoint("127.0.0.1", pg_server.port, "pgdr_restore", "ext_target", pg_server.restore_password)
        with psycopg.connect(
            **{**pg_server.dsn("ext_target"), "user": "pgdr_restore", "password": restorer.password}, autocommit=True
        ) as conn:
            conn.execute("CREATE FUNCTION public.pg_stat_statements_reset() RETURNS void LANGUAGE sql AS 'SELECT'")
        admin = PgEndpoint("127.0.0.1", pg_server.port, pg_server.superuser, "postgres", pg_server.password)
        toc = read_toc(tmp_path / "dump")
        with pytest.raises(RestoreFailed, match=r"created more than schemas .*objects in pg_proc.*tampered with"):
            create_untrusted_extensions(admin, restorer, toc, tmp_path, dump_extensions(toc, tmp_path))
        assert _sql(
            pg_server, "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'", "ext_target"
        ) == [(0,)]

        _sql(pg_server, "DROP FUNCTION public.pg_stat_statements_reset()", "ext_target")
        _sql(pg_server, 'DROP SCHEMA "Ext Ö"', "ext_target")
        made = create_untrusted_extensions(admin, restorer, toc, tmp_path, dump_extensions(toc, tmp_path))
        assert made.names == ("pg_stat_statements",)
        assert len(made.entries) == 3  # the schema, the extension, its comment
        assert _sql(
            pg_server,
            "SELECT n.nspname, pg_get_userbyid(n.nspowner) FROM pg_extension e JOIN pg_namespace n ON n.oid = "
            "e.extnamespace WHERE extname = 'pg_stat_statements'",
            "ext_target",
        ) == [("Ext Ö", "pgdr_restore")]
    finally:
        for name in ("ext_source", "ext_target"):
            _sql(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_backup_whose_extension_the_target_server_lacks_is_refused_before_anything_is_downloaded(pg_server):
    """The restore plan reads the extensions from the table of contents alone; one the target server has not
    installed (no control file) stops the restore there, naming it and what to install, instead of after the
    download."""
    from pgdr.incident import InvalidRestoreRequest, check_extensions
    from pgdr.logical.privileges import BackupNeeds, DumpExtension, missing_extensions
    from pgdr.postgres.client import PgEndpoint

    def needing(*names: str) -> BackupNeeds:
        return BackupNeeds(extensions_in_dump=[DumpExtension(name, "public", None, ()) for name in names])

    server = PgEndpoint("127.0.0.1", pg_server.port, pg_server.superuser, "postgres", pg_server.password)
    needs = needing("citext", "Ünknown ext", "pg_stat_statements")
    assert missing_extensions(needs, server) == ["Ünknown ext"]
    with pytest.raises(InvalidRestoreRequest, match=r"does not have installed: Ünknown ext .*Install their packages"):
        check_extensions(needs, server, "20261207T000000Z-abcdef")
    check_extensions(needing("citext"), server, "20261207T000000Z-abcdef")  # all there: no error
