"""The proof of a recovered server, at both depths, on a real database: what each runs, and a damaged page found."""

from __future__ import annotations

import os
import secrets
import uuid
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from psycopg import sql

TABLE = "Orders ü"


@pytest.fixture
def recovered(pg_server, tmp_path, monkeypatch):
    """A database standing for one of a recovered server's, a reader role as the proof's, and a suite of the plan."""
    from pgdr.postgres.client import PgEndpoint

    dbname, reader = f"proof_{uuid.uuid4().hex[:8]}", f"proof reader {uuid.uuid4().hex[:6]}"
    password = secrets.token_urlsafe(12)
    admin = psycopg.connect(**pg_server.dsn("postgres"), autocommit=True)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    admin.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE pg_read_all_data").format(
            sql.Identifier(reader), sql.Literal(password)
        )
    )
    with psycopg.connect(**pg_server.dsn(dbname), autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{TABLE}" (id int PRIMARY KEY, total numeric NOT NULL, note text)')
        conn.execute(f"""INSERT INTO "{TABLE}" SELECT g, g % 500, repeat('x', 60) FROM generate_series(1, 3000) g""")
        conn.execute("CHECKPOINT")
    suites = tmp_path / "gx"
    (suites / dbname).mkdir(parents=True)
    (suites / dbname / "orders.yaml").write_text(
        f'table: public."{TABLE}"\nexpectations:\n  - type: expect_column_values_to_be_between\n'
        "    kwargs: {column: total, min_value: 0, max_value: 1000}\n"
    )
    monkeypatch.setenv("PGDR_GX_SUITES", str(suites))

    def endpoint(name: str, user: str = "postgres", secret: str = pg_server.password) -> PgEndpoint:
        return PgEndpoint("127.0.0.1", pg_server.port, user, name, secret)

    @contextmanager
    def workdir(label: str):
        folder = tmp_path / label
        folder.mkdir(exist_ok=True)
        yield folder

    def prove(level: str) -> dict:
        from pgdr.physical.proof import check_recovered_databases

        database = SimpleNamespace(name=dbname, dbname=dbname, dump_jobs=2)
        cluster = SimpleNamespace(endpoint=endpoint, reader=lambda name: endpoint(name, reader, password))
        return check_recovered_databases(
            SimpleNamespace(database=lambda _name: database),
            SimpleNamespace(name="main", databases=(dbname,)),
            cluster,
            "20261207T000000Z-test",
            "2026-12-07T00:00:00+00:00",
            workdir,
            proof=level,
        )[dbname]

    yield SimpleNamespace(dbname=dbname, admin=admin, prove=prove, dsn=pg_server.dsn(dbname))
    admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(dbname)))
    admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(reader)))
    admin.close()


def test_each_depth_runs_its_checks_as_a_reader_and_a_damaged_page_fails_the_quick_one(recovered):
    from pgdr.errors import PermanentFailure

    quick = recovered.prove("quick")
    assert (quick["tables"], quick["rows"], quick["checked_as_superuser"]) == (1, 3000, False)
    assert quick["integrity"]["amcheck_ok"] is True
    # The plan's suite runs at both depths; pgdr's baseline (row count, key not null and unique) only when thorough.
    assert quick["validation"]["expectations"] == 1 and quick["validation"]["user_suites"][0].endswith("orders.yaml")
    thorough = recovered.prove("thorough")
    assert thorough["integrity"]["amcheck_ok"] is True and thorough["validation"]["failed"] == 0
    assert thorough["validation"]["expectations"] >= 4, thorough["validation"]

    # One page of the table damaged on disk (its buffers evicted, so the next read is the file's).
    with psycopg.connect(**recovered.dsn, autocommit=True) as conn:
        path = conn.execute(
            f"""SELECT current_setting('data_directory') || '/' || pg_relation_filepath('"{TABLE}"')"""
        ).fetchone()[0]
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_buffercache")
        conn.execute(
            f"""SELECT pg_buffercache_evict(bufferid) FROM pg_buffercache
                WHERE relfilenode = pg_relation_filenode('"{TABLE}"')"""
        )
    with open(path, "r+b") as table_file:
        table_file.seek(8192 + 4000)
        table_file.write(b"\xde\xad\xbe\xef" * 64)
    with pytest.raises(PermanentFailure, match="pg_amcheck found corruption") as failed:
        recovered.prove("quick")
    # Both say where: the count that stopped at the page, and pg_amcheck (the table by its name).
    assert "its rows could not be read: invalid page in block 1" in str(failed.value), failed.value
    assert 'pg_amcheck found corruption: heap table "' in str(failed.value) and "ERROR:" in str(failed.value)
    assert "not to good data" in str(failed.value)


def test_a_damaged_index_page_fails_the_thorough_proof_naming_the_index(recovered):
    from pgdr.errors import PermanentFailure

    index = f"{TABLE}_pkey"
    # A suite of the plan whose query reads the key's first leaf page (min(id) walks the index from its left).
    suites = Path(os.environ["PGDR_GX_SUITES"]) / recovered.dbname
    (suites / "first.yaml").write_text(
        f'table: public."{TABLE}"\nexpectations:\n  - type: expect_column_min_to_be_between\n'
        "    kwargs: {column: id, min_value: 1, max_value: 1}\n"
    )
    assert recovered.prove("thorough")["validation"]["failed"] == 0
    with psycopg.connect(**recovered.dsn, autocommit=True) as conn:
        path = conn.execute(
            "SELECT current_setting('data_directory') || '/' || pg_relation_filepath(%s::regclass)", (f'"{index}"',)
        ).fetchone()[0]
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_buffercache")
        conn.execute(
            """SELECT pg_buffercache_evict(bufferid) FROM pg_buffercache
               WHERE relfilenode = pg_relation_filenode(%s::regclass)""",
            (f'"{index}"',),
        )
    with open(path, "r+b") as index_file:  # block 1: a leaf page of the key (block 0 is the metapage)
        index_file.seek(8192 + 200)
        index_file.write(b"\xde\xad\xbe\xef" * 256)
    with pytest.raises(PermanentFailure) as failed:
        recovered.prove("thorough")
    message = str(failed.value)
    # pg_amcheck names the index; the suite's query that met the page says what it met (not SQLAlchemy's footer).
    assert f'pg_amcheck found corruption: btree index "{recovered.dbname}.public.{index}"' in message, message
    assert "invalid page in block 1 of relation" in message.split("failed expectation: expect_column_min_")[1]
    assert "sqlalche.me" not in message and "[SQL:" not in message
    assert "not to good data" in message
