"""What Great Expectations sends to a restored database: no table read into the worker's memory, duplicate keys found.

GX learns a query asset's columns by running its query and keeping the whole result (a 2 GB table became 2.6 GB
of worker memory); pgdr has that query sent with ``LIMIT 0``. Primary keys are checked unique with one
``GROUP BY`` query instead of GX's window count, single or compound, with any column name.
"""

from __future__ import annotations

import psycopg
import pytest

pytestmark = pytest.mark.integration

DB = "pgdr_gx_queries"


@pytest.fixture(scope="module")
def probe_db(pg_server):
    from pgdr.postgres.client import PgEndpoint

    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
    with psycopg.connect(**pg_server.dsn(DB), autocommit=True) as conn:
        # Each row of this view read (its column computed) advances a sequence, which no rollback undoes.
        conn.execute("CREATE SEQUENCE rows_read")
        conn.execute("CREATE VIEW every_row AS SELECT i, nextval('rows_read') AS n FROM generate_series(1, 1000) AS i")
        conn.execute('CREATE TABLE "Pairs" ("Left Id" int, "right" int, note text)')
        conn.execute("""INSERT INTO "Pairs" VALUES (1, 1, 'a'), (1, 2, 'b'), (1, 2, 'dup'), (2, 2, 'c'), (NULL, 2, 'x'),
                        (NULL, 2, 'y')""")
    yield PgEndpoint("127.0.0.1", pg_server.port, "postgres", DB, pg_server.password)
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


def test_the_columns_of_a_table_are_learnt_without_reading_its_rows(probe_db, pg_server):
    from pgdr.checks.validation import ExpectationSpec, run_validation

    report = run_validation(
        probe_db,
        [ExpectationSpec("public.every_row", "expect_column_to_exist", {"column": "n"}, "baseline", "has n")],
    )
    assert [o.success for o in report.outcomes] == [True], report.outcomes
    with psycopg.connect(**pg_server.dsn(DB)) as conn:
        read = conn.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM rows_read").fetchone()[0]
    assert read == 0, f"GX read {read} rows to learn the columns of a query asset"  # 1000 without LIMIT 0


def test_duplicate_keys_are_found_single_and_compound_with_quoted_names(probe_db):
    from pgdr.checks.validation import _unique_spec, run_validation

    specs = [
        _unique_spec('public."Pairs"', "pairs_pkey", ["Left Id", "right"]),
        _unique_spec('public."Pairs"', "left_key", ["Left Id"]),
        _unique_spec('public."Pairs"', "note_key", ["note"]),
    ]
    report = run_validation(probe_db, specs)
    found = {o.description: (o.success, o.observed) for o in report.outcomes}
    assert found == {
        'primary key pairs_pkey ("Left Id", "right") is unique': (False, 1),  # (1, 2) twice
        "primary key left_key is unique": (False, 1),  # 1 three times; NULLs are not duplicates
        "primary key note_key is unique": (True, 0),
    }, report.outcomes
