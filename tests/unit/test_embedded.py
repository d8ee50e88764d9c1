"""The embedded server's scratch defaults (no fsync, no full-page writes) give way to settings that name them."""

from __future__ import annotations

import psycopg

QUOTED = "/var/tmp/it's \\new\\n\\\\ dir ü/%f"


def _show(server, *names: str) -> dict[str, str]:
    with psycopg.connect(**server.dsn("postgres")) as conn:
        return {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in names}


def test_scratch_defaults_apply_unless_a_setting_names_them(pg_server, session_dir):
    from pgdr.local.embedded import EmbeddedServer

    names = ("fsync", "full_page_writes", "max_wal_size", "synchronous_commit")
    assert _show(pg_server, *names) == {
        "fsync": "off",
        "full_page_writes": "off",
        "max_wal_size": "4GB",
        "synchronous_commit": "off",
    }
    # A benchmark of the WAL a production server writes needs full-page writes: before, the command line's
    # "-c full_page_writes=off" silently beat the included pgdr.conf.
    server = EmbeddedServer(
        session_dir / "postgres-settings",
        settings={"full_page_writes": "on", "max_wal_size": "8GB", "pgdr.literal": QUOTED},
    ).start()
    try:
        assert _show(server, *names) == {
            "fsync": "off",
            "full_page_writes": "on",
            "max_wal_size": "8GB",
            "synchronous_commit": "off",
        }
        # written with conf_literal, read back by PostgreSQL's own parser exactly (its backslash escapes once turned
        # a path's "\n" into a newline in a restore_command)
        assert _show(server, "pgdr.literal") == {"pgdr.literal": QUOTED}
    finally:
        server.destroy()
