"""Reading owners, grants and settings out of pg_restore's scripts: the tokens, the roles, the database's name."""

from __future__ import annotations

import pytest
from pgdr.logical.privileges import (
    PrivilegesFailed,
    _create_options,
    _database_statement,
    create_options_sql,
    render,
    roles_in,
    statements,
)


def _roles(text: str) -> set[str]:
    (statement,) = statements(text)
    return roles_in(statement)


@pytest.mark.parametrize(
    ("text", "roles"),
    [
        ('GRANT SELECT,INSERT ON TABLE "App Data"."Customers" TO app_login;', {"app_login"}),
        (
            'GRANT SELECT(id) ON TABLE "App Data"."Customers" TO "Report ""Team""", other WITH GRANT OPTION;',
            {'Report "Team"', "other"},
        ),
        ("REVOKE ALL ON FUNCTION billing.total_for(bigint) FROM PUBLIC;", set()),
        ('GRANT USAGE ON SCHEMA s TO app GRANTED BY "Data Owner";', {"app", "Data Owner"}),
        (
            'ALTER DEFAULT PRIVILEGES FOR ROLE "Data Owner" IN SCHEMA "App Data" GRANT SELECT ON TABLES TO app_login;',
            {"Data Owner", "app_login"},
        ),
        ("ALTER DEFAULT PRIVILEGES FOR ROLE owner REVOKE ALL ON FUNCTIONS FROM PUBLIC;", {"owner"}),
        ('ALTER TABLE "a ""TO"" b".t OWNER TO "Ünï Owner";', {"Ünï Owner"}),
        ("ALTER ROLE app_login IN DATABASE \"Äpp DB\" SET work_mem TO '8MB';", {"app_login"}),
        (
            "CREATE POLICY p ON billing.invoices TO app_login, \"Other One\" USING ((tenant = 'TO mallory'::text));",
            {"app_login", "Other One"},
        ),
        ("CREATE POLICY p ON t USING ((x IN ( SELECT 1 TO_2)));", set()),
        ("COMMENT ON TABLE t IS 'GRANT x TO mallory';", set()),
    ],
)
def test_the_roles_a_statement_names(text, roles):
    assert _roles(text) == roles


def test_statements_split_on_top_level_semicolons_only():
    script = (
        "\\restrict abc\nSET search_path = '';\nCREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SELECT 1; "
        "SELECT 2 $body$;\n-- a comment; with a semicolon\n"
        'GRANT SELECT ON TABLE "semi;colon" TO "x;y";\n'
        "COMMENT ON TABLE t IS 'it''s; fine';\n\\unrestrict abc\n"
    )
    parsed = statements(script)
    assert [render(s)[:12] for s in parsed] == ["SET search_p", "CREATE FUNCT", "GRANT SELECT", "COMMENT ON T"]
    assert roles_in(parsed[2]) == {"x;y"}


def test_database_statements_are_pointed_at_the_restored_copy_only():
    (statement,) = statements('ALTER ROLE "DATABASE" IN DATABASE "Äpp DB" SET x TO \'Äpp DB\';')
    assert render(_database_statement(statement, "Äpp DB", 'Äpp DB_restoring_"1"')) == (
        'ALTER ROLE "DATABASE" IN DATABASE "Äpp DB_restoring_""1""" SET x TO \'Äpp DB\';'
    )
    (other,) = statements("ALTER DATABASE other SET x TO 1;")
    assert render(_database_statement(other, "Äpp DB", "copy")) == "ALTER DATABASE other SET x TO 1;"


def test_the_source_encoding_and_locale_are_read_and_written_back_as_literals():
    (statement,) = statements(
        "CREATE DATABASE \"Äpp DB\" WITH TEMPLATE = template0 ENCODING = 'UTF8' LOCALE_PROVIDER = icu LOCALE = "
        "'en_US.UTF-8' ICU_LOCALE = 'de-u-co-phonebk' ICU_RULES = '&a < ''b''';"
    )
    options = _create_options(statement)
    assert options == {
        "ENCODING": "UTF8",
        "LOCALE_PROVIDER": "icu",
        "LOCALE": "en_US.UTF-8",
        "ICU_LOCALE": "de-u-co-phonebk",
        "ICU_RULES": "&a < 'b'",
    }
    text = create_options_sql(options).as_string(None)
    assert "LOCALE_PROVIDER icu" in text and "ICU_RULES '&a < ''b'''" in text
    with pytest.raises(PrivilegesFailed, match="unknown locale provider"):
        create_options_sql({"LOCALE_PROVIDER": "libc; DROP DATABASE x"})


@pytest.mark.parametrize(
    ("text", "enables"),
    [
        ('ALTER TABLE ONLY "Sales Dept"."Ünvoices" ENABLE ROW LEVEL SECURITY;', True),
        ("ALTER TABLE billing.invoices ENABLE ROW LEVEL SECURITY;", True),
        ('ALTER TABLE "only" ENABLE ROW LEVEL SECURITY;', True),
        ("ALTER TABLE t OWNER TO mallory, ENABLE ROW LEVEL SECURITY;", False),
        ("ALTER TABLE t SET SCHEMA s ENABLE ROW LEVEL SECURITY;", False),
        ("ALTER TABLE t DISABLE ROW LEVEL SECURITY;", False),
        ("ALTER FUNCTION f ENABLE ROW LEVEL SECURITY;", False),
        ("ALTER TABLE a.b.c ENABLE ROW LEVEL SECURITY;", False),
    ],
)
def test_only_a_plain_enable_row_level_security_passes_for_a_row_security_entry(text, enables):
    from pgdr.logical.privileges import _enables_row_security

    (statement,) = statements(text)
    assert _enables_row_security(statement) is enables


def test_a_row_security_entry_holding_another_statement_is_refused(tmp_path, monkeypatch):
    """Switched on after the checks as the server's connection: a forged entry never runs."""
    from pgdr.logical import privileges
    from pgdr.logical.privileges import DumpToc, apply_privileges
    from pgdr.postgres.client import PgEndpoint

    scripts = {"row-security": "ALTER TABLE ONLY t ENABLE ROW LEVEL SECURITY;\nALTER ROLE mallory SUPERUSER;\n"}
    monkeypatch.setattr(privileges, "owner_statements", lambda toc, workdir, env=None: [])
    monkeypatch.setattr(privileges, "_script", lambda toc, lines, workdir, name, *options, env=None: scripts[name])
    monkeypatch.setattr(privileges, "_execute_all", lambda admin, work: pytest.fail(f"ran {work}"))
    toc = DumpToc(tmp_path, ("7; 0 16384 ROW SECURITY public t postgres",), (), "app")
    with pytest.raises(PrivilegesFailed, match="row-security entry of the backup holds another statement"):
        apply_privileges(PgEndpoint("127.0.0.1", 1, "postgres", "app_restoring_1"), toc, tmp_path)
    assert privileges.data_restore_list(toc) == "\n"  # left out of the restore role's pg_restore


def test_a_database_statement_about_another_database_is_refused(tmp_path, monkeypatch):
    """However the backup was made, the privileges phase never changes a database but the restored copy."""
    from pgdr.logical import privileges
    from pgdr.logical.privileges import DumpToc, apply_privileges
    from pgdr.postgres.client import PgEndpoint

    scripts = {
        "database": "CREATE DATABASE \"Äpp DB\" WITH TEMPLATE = template0 ENCODING = 'UTF8';\n"
        "ALTER DATABASE \"Äpp DB\" SET work_mem TO '8MB';\nALTER DATABASE live_one OWNER TO mallory;\n",
    }
    monkeypatch.setattr(privileges, "owner_statements", lambda toc, workdir, env=None: [])
    monkeypatch.setattr(privileges, "_script", lambda toc, lines, workdir, name, *options, env=None: scripts[name])
    monkeypatch.setattr(privileges, "_execute_all", lambda admin, work: pytest.fail(f"ran {work}"))
    toc = DumpToc(tmp_path, (), ("1; 1262 1 DATABASE - x y",), "Äpp DB")
    with pytest.raises(PrivilegesFailed, match="about another database"):
        apply_privileges(PgEndpoint("127.0.0.1", 1, "postgres", "Äpp DB_restoring_1"), toc, tmp_path)


def test_roles_are_read_from_pg_dumpall_and_never_given_superuser_or_a_password_unasked():
    from pgdr.logical.privileges import _attribute_sql, role_definitions

    globals_sql = (
        "\\restrict x\nSET default_transaction_read_only = off;\n"
        'CREATE ROLE "App Login";\n'
        'ALTER ROLE "App Login" WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS '
        "CONNECTION LIMIT 5 PASSWORD 'SCRAM-SHA-256$4096:abc' VALID UNTIL '2030-01-01 00:00:00+00';\nALTER ROLE "
        "\"App Login\" SET search_path TO 'app', 'public';\n"
        'GRANT reporting TO "App Login" WITH INHERIT TRUE GRANTED BY postgres;\n'
        "GRANT USAGE ON SCHEMA x TO y;\n"
    )
    found = role_definitions(globals_sql)
    clause, withheld = _attribute_sql(found.attributes["App Login"], with_passwords=False)
    assert clause == "INHERIT CREATEDB LOGIN CONNECTION LIMIT 5 VALID UNTIL '2030-01-01 00:00:00+00'"
    assert withheld == ["SUPERUSER", "CREATEROLE", "REPLICATION", "BYPASSRLS"]
    assert "PASSWORD 'SCRAM-SHA-256$4096:abc'" in _attribute_sql(found.attributes["App Login"], with_passwords=True)[0]
    assert [(g, m, " ".join(t.text for t in o)) for g, m, o in found.memberships] == [
        ("reporting", "App Login", "WITH INHERIT TRUE")
    ]
    assert [(r, " ".join(t.text for t in st)) for r, st in found.settings] == [
        ("App Login", "SET search_path TO 'app' , 'public'")
    ]


def test_the_plan_and_the_restore_agree_on_what_can_be_skipped(tmp_path):
    from pgdr.errors import PlanError
    from pgdr.logical.privileges import SKIPPABLE
    from pgdr.plan import SKIPPABLE_OBJECTS, parse_plan

    assert set(SKIPPABLE) == set(SKIPPABLE_OBJECTS)
    text = (
        "storage: {l: {type: local, path: /tmp}}\ndatabases: [{name: a, conn_id: x, skip_objects: [%s], app_roles: "
        "[app]}]\n"
    )
    plan = parse_plan(text % "publications, event_triggers", tmp_path / "p.yaml")
    assert plan.databases[0].skip_objects == ("publications", "event_triggers") and plan.databases[0].app_roles == (
        "app",
    )
    with pytest.raises(PlanError, match="'tables' is not a kind pgdr can skip"):
        parse_plan(text % "tables", tmp_path / "p.yaml")
