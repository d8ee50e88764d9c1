"""A restore gives the application back: owners, grants, default privileges, settings, encoding and roles.

``tests/sql/privileges.sql`` builds an application database as a DBA would: three owners (one
NOLOGIN), schema, table, column, sequence, function and large-object grants to an application
login, default privileges, a row-level security policy ``TO`` the login, database settings, a
per-role setting in the database, ``REVOKE CONNECT … FROM PUBLIC``, a database comment and
connection limit, a non-default locale provider and collation, an event trigger, publications and a
subscription. It goes through backup → verify on a server without its roles → new-database onto
that server → new-database and replace on its own server; after each restore, every owner, ACL
(``aclexplode`` of every object), default ACL, policy, database property and the set of roles are
compared with the source, and the application's login runs its queries.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

pytestmark = pytest.mark.integration

APP_DB = "Äpp DB"
ROLES = ("Data Owner", "billing_owner", "reporting", "app_login")
APP_PASSWORD = "app-secret"  # the test's own application login, on the test's own server
SQL_DIR = Path(__file__).parents[1] / "sql"


def _sql(server, query, db: str = "postgres", params=None):
    with psycopg.connect(**server.dsn(db), autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def _databases(server) -> set[str]:
    return {r[0] for r in _sql(server, "SELECT datname FROM pg_database WHERE NOT datistemplate")}


def _roles(server) -> set[str]:
    return {r[0] for r in _sql(server, "SELECT rolname FROM pg_roles WHERE rolname NOT LIKE 'pg\\_%'")}


def _drop_database(server, name: str) -> None:
    with psycopg.connect(**server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
    with psycopg.connect(**server.dsn(name), autocommit=True) as conn:  # a subscription blocks DROP DATABASE
        for (sub,) in conn.execute(
            "SELECT subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = "
            "current_database())"
        ).fetchall():
            conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(sub)))
    _sql(server, sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def snapshot(server, dbname: str) -> dict:
    """What the application can tell about ``dbname`` besides its rows (the test's own ground truth)."""
    objects = _sql(server, (SQL_DIR / "privileges_snapshot.sql").read_text(), dbname)
    database = _sql(server, (SQL_DIR / "database_snapshot.sql").read_text(), "postgres", {"name": dbname})
    return {"objects": objects, "database": database}


@pytest.fixture(scope="module")
def app_database(pg_server, pg_server_b):
    """The application database on the shared server (its roles there only); everything made from it
    is dropped after."""
    from pgdr.postgres.binaries import bundled_bin_dir

    before = (_databases(pg_server), _databases(pg_server_b))
    roles_b = _roles(pg_server_b)
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        for role in ROLES:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                login = (
                    sql.SQL("LOGIN PASSWORD {}").format(sql.Literal(APP_PASSWORD))
                    if role == "app_login"
                    else sql.SQL("NOLOGIN")
                )
                conn.execute(sql.SQL("CREATE ROLE {} {}").format(sql.Identifier(role), login))
        conn.execute("GRANT reporting TO app_login")
    if APP_DB in before[0]:
        _drop_database(pg_server, APP_DB)
    _sql(
        pg_server,
        sql.SQL(
            "CREATE DATABASE {} TEMPLATE template0 LOCALE_PROVIDER builtin BUILTIN_LOCALE 'C.UTF-8' LOCALE 'C'"
        ).format(sql.Identifier(APP_DB)),
    )
    from pgdr.identifiers import conninfo

    result = subprocess.run(
        [
            str(bundled_bin_dir() / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"db={APP_DB}",
            "-f",
            str(SQL_DIR / "privileges.sql"),
            "--dbname",
            conninfo("127.0.0.1", pg_server.port, pg_server.superuser, APP_DB),
        ],
        env={**os.environ, "PGPASSWORD": pg_server.password},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    yield snapshot(pg_server, APP_DB)
    for server, old in zip((pg_server, pg_server_b), before, strict=True):
        for name in _databases(server) - old:
            _drop_database(server, name)
    for role in _roles(pg_server_b) - roles_b:
        _sql(pg_server_b, sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def app_plan(plan, app_database, pg_server, pg_server_b, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_APP", pg_server.connection_uri("postgres"))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_OTHER", pg_server_b.connection_uri("postgres"))
    # Verification runs on the second server, which has none of the application's roles.
    return plan(databases=[{"name": "app", "conn_id": "pgdr_app", "dbname": APP_DB, "verify_conn_id": "pgdr_other"}])


def _ok(dag_run) -> None:
    bad = {task: state for task, state in dag_run.states.items() if state not in ("success", "skipped")}
    assert not bad, dag_run.states


def _same_as_source(server, dbname: str, source: dict) -> None:
    restored = snapshot(server, dbname)
    assert restored["objects"] == source["objects"]
    assert restored["database"] == source["database"]
    assert _sql(
        server,
        "SELECT count(*) FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid WHERE d.datname = %s",
        params=(dbname,),
    ) == [(0,)]  # never left replicating


def _application_works(server, dbname: str) -> None:
    """The application's own login runs its queries: settings, grants, sequence, policy, function, large object."""
    with psycopg.connect(
        host="127.0.0.1", port=server.port, user="app_login", password=APP_PASSWORD, dbname=dbname, autocommit=True
    ) as conn:
        assert conn.execute("SHOW search_path").fetchone()[0] == '"App Data", billing, public'
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "45s"
        assert conn.execute("SHOW work_mem").fetchone()[0] == "8MB"
        assert conn.execute('SELECT count(*) FROM "Customers"').fetchone()[0] >= 50
        new_id = conn.execute(
            "INSERT INTO \"Customers\" (name, email) VALUES ('after the restore', 'x@example.com') RETURNING id"
        ).fetchone()[0]
        assert new_id > 50
        assert conn.execute("SELECT count(*) FROM invoices").fetchone()[0] == 40  # the policy lets it see its own rows
        assert conn.execute("SELECT billing.total_for(2)").fetchone()[0] is not None
        assert conn.execute("SELECT lo_get(424242)").fetchone()[0] == b"a scanned contract"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM invoices")  # and no more than it had


def test_owners_grants_settings_and_roles_come_back_with_the_data(
    app_plan, app_database, run_dag, pg_server, pg_server_b, plan, slack
):
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    _ok(run_dag("pgdr_backup"))
    store, layout = open_store(app_plan.databases[0].storage)
    catalog = BackupCatalog(store, layout, "app")
    entry = catalog.latest()
    assert "globals.sql" in {f.name for f in entry.manifest.files}  # the source server's roles, kept with the backup

    # Verification on a server without the roles: created for it, and dropped again with the scratch database.
    roles_b = _roles(pg_server_b)
    _ok(run_dag("pgdr_verify_restore", run_conf={"database": "app", "backup_id": entry.backup_id}))
    record = catalog.get(entry.backup_id).verification
    assert record.status == "verified", record
    privileges = record.privileges
    assert privileges["owners"] == 11 and privileges["grants"] >= 12 and privileges["default_privileges"] == 2
    assert privileges["database_properties"] == 8  # the scratch database keeps pgdr's marker as its comment
    # billing.invoices forces row-level security on its owner too: switched on after the checks, which counted all 40
    assert privileges["row_security"] == 1 and record.integrity["rows_checked"] >= 90
    assert any("EVENT TRIGGER" in o for o in privileges["superuser_objects"])
    assert any("SUBSCRIPTION" in o for o in privileges["skipped_objects"])
    assert sorted(record.phases["restore_backup"]["roles_created"]) == sorted(ROLES)
    assert _roles(pg_server_b) == roles_b

    # Onto the server without the roles, restore_roles off: refused in plan_restore, naming them; nothing created.
    databases_b = _databases(pg_server_b)
    refused = run_dag(
        "pgdr_restore", run_conf={"database": "app", "target_conn_id": "pgdr_other", "target_name": "Äpp elsewhere"}
    )
    assert refused.states["plan_restore"] == "failed" and refused.states.get("restore_backup") != "success"
    assert _databases(pg_server_b) == databases_b and _roles(pg_server_b) == roles_b

    # With restore_roles and their passwords: the roles are created as on the source server (attributes, memberships,
    # password hashes from the backup's pg_dumpall --globals-only), then everything compares equal, and the
    # application's login works on the other server with its own password.
    _ok(
        run_dag(
            "pgdr_restore",
            run_conf={
                "database": "app",
                "target_conn_id": "pgdr_other",
                "target_name": "Äpp elsewhere",
                "restore_roles": True,
                "restore_role_passwords": True,
            },
        )
    )
    assert _roles(pg_server_b) == roles_b | set(ROLES)
    attributes = (
        "SELECT rolname, rolcanlogin, rolinherit, rolsuper, pg_has_role(rolname, 'reporting', 'MEMBER') FROM "
        "pg_roles WHERE rolname = ANY(%s) ORDER BY 1"
    )
    assert _sql(pg_server_b, attributes, params=(list(ROLES),)) == _sql(pg_server, attributes, params=(list(ROLES),))
    _same_as_source(pg_server_b, "Äpp elsewhere", app_database)
    _application_works(pg_server_b, "Äpp elsewhere")

    # From here the plan names the application's logins: each must see the restored copy as it sees the live database.
    plan(
        databases=[
            {
                "name": "app",
                "conn_id": "pgdr_app",
                "dbname": APP_DB,
                "verify_conn_id": "pgdr_other",
                "app_roles": ["app_login", "reporting"],
            }
        ]
    )
    slack.clear()
    # A grant changed on the live database since the backup: the restore stops before the swap and names it.
    _sql(pg_server, 'REVOKE INSERT ON "App Data"."Customers" FROM app_login', APP_DB)
    try:
        stopped = run_dag("pgdr_restore", run_conf={"database": "app", "target_name": "Äpp differs"})
    finally:
        _sql(pg_server, 'GRANT INSERT ON "App Data"."Customers" TO app_login', APP_DB)
    assert stopped.states["apply_privileges"] == "failed" and stopped.states["swap_into_place"] != "success"
    (differs,) = [
        r
        for r in (
            json.loads(store.get_bytes(o.key))
            for o in store.list(layout.backup_prefix("app", entry.backup_id))
            if "/restores/" in o.key and o.key.endswith(".json")
        )
        if r["plan"]["target"] == "Äpp differs"
    ]
    assert differs["status"] == "failed" and differs["failed_phase"] == "apply_privileges"
    alerts = json.dumps(slack.messages, ensure_ascii=False)
    assert 'app_login now can and could not: INSERT on table \\"App Data\\".\\"Customers\\"' in alerts, alerts
    _drop_database(pg_server, "Äpp differs")

    # new-database next to the live one, then replace: identical, and the application's login works.
    _ok(run_dag("pgdr_restore", run_conf={"database": "app", "target_name": "Äpp copy"}))
    _same_as_source(pg_server, "Äpp copy", app_database)
    _ok(run_dag("pgdr_restore", run_conf={"database": "app", "mode": "replace", "confirm": APP_DB}))
    _same_as_source(pg_server, APP_DB, app_database)
    _application_works(pg_server, APP_DB)

    reports = [
        json.loads(store.get_bytes(o.key))
        for o in store.list(layout.backup_prefix("app", entry.backup_id))
        if "/restores/" in o.key and o.key.endswith(".json")
    ]
    restored = [r for r in reports if r["status"] == "restored"]
    assert len(restored) == 3
    for report in restored:
        assert report["privileges"]["owners"] == 11 and report["privileges"]["database_properties"] == 9
        assert report["privileges"]["row_security"] == 1
        if report["plan"]["target_conn_id"] == "pgdr_app":
            assert {
                role: found["lost"] + found["gained"] for role, found in report["privileges"]["app_roles"].items()
            } == {"app_login": [], "reporting": []}
        assert any("SUBSCRIPTION" in o for o in report["privileges"]["skipped_objects"])
    md = [
        store.get_bytes(o.key).decode()
        for o in store.list(layout.backup_prefix("app", entry.backup_id))
        if "/restores/" in o.key and o.key.endswith(".md")
    ]
    assert any("**Not restored**" in text and "App Sub" in text for text in md)
    assert any("Row-level security switched on again after the checks, on 1 table (" in text for text in md)

    # skip_objects: a copy without the event trigger and the publications, and the report says so.
    plan(
        databases=[
            {"name": "app", "conn_id": "pgdr_app", "dbname": APP_DB, "skip_objects": ["event_triggers", "publications"]}
        ]
    )
    _ok(run_dag("pgdr_restore", run_conf={"database": "app", "target_name": "Äpp lean"}))
    assert _sql(
        pg_server, "SELECT (SELECT count(*) FROM pg_event_trigger) + (SELECT count(*) FROM pg_publication)", "Äpp lean"
    ) == [(0,)]
    (lean,) = [
        json.loads(store.get_bytes(o.key))
        for o in store.list(layout.backup_prefix("app", entry.backup_id))
        if "/restores/" in o.key and o.key.endswith(".json") and b"\u00c4pp lean" in store.get_bytes(o.key)
    ]
    skipped = " ".join(lean["privileges"]["skipped_objects"])
    assert "EVENT TRIGGER" in skipped and "PUBLICATION" in skipped and "SUBSCRIPTION" in skipped
    assert lean["privileges"]["superuser_objects"] == []


def test_text_inside_a_function_body_never_passes_for_an_owner_statement(pg_server, tmp_path):
    """A schema owner can write anything in a function body; only lines pg_restore itself adds are run as the server."""
    from pgdr.identifiers import conninfo
    from pgdr.logical.privileges import backup_needs, owner_statements, read_toc
    from pgdr.postgres.binaries import bundled_bin_dir

    name = "pgdr spoof test"
    if name in _databases(pg_server):
        _drop_database(pg_server, name)
    _sql(pg_server, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        _sql(
            pg_server,
            """
            CREATE SCHEMA victim;
            CREATE FUNCTION public.sneaky() RETURNS void LANGUAGE sql AS $$
            ALTER SCHEMA victim OWNER TO pg_write_server_files;
            $$;
            CREATE VIEW public."ALTER SCHEMA victim OWNER TO x;" AS
                SELECT 'GRANT pg_execute_server_program TO mallory;' AS c;
        """,
            name,
        )
        subprocess.run(
            [
                str(bundled_bin_dir() / "pg_dump"),
                "-Fd",
                "-f",
                str(tmp_path / "dump"),
                "--dbname",
                conninfo("127.0.0.1", pg_server.port, pg_server.superuser, name),
            ],
            env={**os.environ, "PGPASSWORD": pg_server.password},
            check=True,
            capture_output=True,
        )
    finally:
        _drop_database(pg_server, name)
    toc = read_toc(tmp_path / "dump")
    found = owner_statements(toc, tmp_path)
    assert sorted(found) == sorted(
        [
            "ALTER SCHEMA victim OWNER TO postgres;",
            "ALTER FUNCTION public.sneaky() OWNER TO postgres;",
            'ALTER VIEW public."ALTER SCHEMA victim OWNER TO x;" OWNER TO postgres;',
        ]
    )
    assert backup_needs(toc, tmp_path).roles == {"postgres"}


TABLESPACE = 'Fäst "ts"'


def test_tables_in_a_tablespace_are_verified_and_restored_into_it_where_the_target_allows_it(
    plan, run_dag, pg_server, pg_server_b, monkeypatch
):
    # A table and its indexes in a tablespace of their own. The verification server has no such tablespace, and the
    # restore role may not create in it on the source server: both restore into the default tablespace, and say so.
    # Once the role may create in it, the restore puts them back where they were. A function body with a line that
    # reads like pg_restore's SET default_tablespace is never taken for one.
    location = pg_server.root / "tablespace-test"
    location.mkdir()
    owner = pg_server.data_dir.stat()
    os.chown(location, owner.st_uid, owner.st_gid)
    space, db = sql.Identifier(TABLESPACE), "Spaced DB"
    _sql(pg_server, sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(space, sql.Literal(str(location))))
    before, before_b = _databases(pg_server), _databases(pg_server_b)
    try:
        _sql(pg_server, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        _sql(
            pg_server,
            sql.SQL(
                "CREATE TABLE orders (id int PRIMARY KEY USING INDEX TABLESPACE {0}, note text) TABLESPACE {0};"
                "CREATE INDEX orders_note ON orders (note) TABLESPACE {0};"
                "INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 100) g;"
                "CREATE TABLE plain (id int); INSERT INTO plain VALUES (1), (2);"
                "CREATE TABLE events (at int, what text) PARTITION BY RANGE (at) TABLESPACE {0};"
                "CREATE TABLE events_early PARTITION OF events FOR VALUES FROM (0) TO (50);"
                "INSERT INTO events SELECT g, 'e' FROM generate_series(1, 49) g;"
                "CREATE FUNCTION looks_like_one() RETURNS int LANGUAGE sql AS $$\nSET default_tablespace = nowhere;\n"
                "SELECT 1$$"
            ).format(space),
            db,
        )
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_APP", pg_server.connection_uri("postgres"))
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_OTHER", pg_server_b.connection_uri("postgres"))
        the_plan = plan(
            databases=[{"name": "spaced", "conn_id": "pgdr_app", "dbname": db, "verify_conn_id": "pgdr_other"}]
        )
        _ok(run_dag("pgdr_backup"))
        from pgdr.airflow_glue.connections import open_store
        from pgdr.logical.catalog import BackupCatalog

        store, layout = open_store(the_plan.databases[0].storage)
        catalog = BackupCatalog(store, layout, "spaced")
        entry = catalog.latest()
        _ok(run_dag("pgdr_verify_restore", run_conf={"database": "spaced", "backup_id": entry.backup_id}))
        verification = catalog.get(entry.backup_id).verification
        assert verification.status == "verified"
        assert verification.phases["restore_backup"]["tablespaces_left_out"] == [TABLESPACE]  # evidence of the choice

        def restored(target: str, **conf) -> dict:
            _ok(run_dag("pgdr_restore", run_conf={"database": "spaced", "target_name": target, **conf}))
            (report,) = [
                json.loads(store.get_bytes(o.key))
                for o in store.list(layout.backup_prefix("spaced", entry.backup_id))
                if o.key.endswith(".json") and "/restores/" in o.key and target.encode() in store.get_bytes(o.key)
            ]
            assert report["status"] == "restored" and report["plan"]["needs"]["tablespaces"] == [TABLESPACE]
            assert _sql(pg_server, "SELECT count(*), sum(id) FROM orders", target) == [(100, 5050)]
            assert _sql(pg_server, "SELECT count(*) FROM events", target) == [(0 if conf else 49,)]  # tables: orders
            return report

        where = (
            "SELECT c.relname, coalesce(t.spcname, '') FROM pg_class c LEFT JOIN pg_tablespace t ON t.oid = "
            "c.reltablespace WHERE c.relname IN ('events', 'events_early', 'orders', 'orders_pkey', 'orders_note', "
            "'plain') ORDER BY 1"
        )
        left_out = restored("Spaced default")
        assert left_out["tablespaces_left_out"] == [TABLESPACE]
        assert {spc for _, spc in _sql(pg_server, where, "Spaced default")} == {""}
        report_md = [
            store.get_bytes(o.key).decode()
            for o in store.list(layout.backup_prefix("spaced", entry.backup_id))
            if o.key.endswith(".md") and "/restores/" in o.key
        ]
        assert any("Tablespaces the target server lacks, or the restore role may not create in" in t for t in report_md)

        one_table = restored("Spaced orders", tables=["public.orders"])  # the table-level restore: the same rule
        assert one_table["tablespaces_left_out"] == [TABLESPACE]
        assert {spc for _, spc in _sql(pg_server, where, "Spaced orders")} == {""}

        _sql(
            pg_server,
            sql.SQL("GRANT CREATE ON TABLESPACE {} TO {}").format(space, sql.Identifier(pg_server.restore_user)),
        )
        kept = restored("Spaced kept")
        assert kept["tablespaces_left_out"] == []
        assert _sql(pg_server, where, "Spaced kept") == _sql(pg_server, where, db)
        assert _sql(pg_server, where, db)[1:3] == [("events_early", TABLESPACE), ("orders", TABLESPACE)]
    finally:
        for server, old in ((pg_server, before), (pg_server_b, before_b)):
            for name in _databases(server) - old:
                _drop_database(server, name)
        _sql(pg_server, sql.SQL("DROP TABLESPACE IF EXISTS {}").format(space))
