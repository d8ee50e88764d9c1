"""``make ui``: pgdr in the Airflow UI on one machine, without Docker.

Starts (or reuses) the embedded PostgreSQL 18 server with the sample database ``shop`` (as
``make demo`` does, with moto's S3 server for the WAL archive), imports the plan's pools and
starts ``airflow standalone`` (LocalExecutor, SQLite under ``.pgdr/ui``) on this checkout's DAGs
and the embedded plan. It prints the URL and the login, then waits: Ctrl-C stops Airflow, the
server and everything else it started.

Use it to try the trigger forms (``pgdr_restore`` for an incident, ``pgdr_verify_restore``) and
to watch the DAGs run with a real scheduler, deadline alerts included.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pgdr.airflow_glue.task_exit import write_local_settings
from pgdr.local.console import Console, default_log_path, detail, say
from pgdr.local.demo import STATE_DIR, prepare

UI_HOME = STATE_DIR / "ui"
ADMIN = "admin"


def _password(home: Path) -> str:
    """Return the UI's admin password, made once and kept in ``.pgdr/ui/passwords.json`` (mode 0600)."""
    path = home / "passwords.json"
    if path.exists():
        return json.loads(path.read_text())[ADMIN]
    password = secrets.token_urlsafe(12)
    path.write_text(json.dumps({ADMIN: password}))
    path.chmod(0o600)
    return password


def _port(wanted: int) -> int:
    import socket

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", wanted)) != 0:
            return wanted
    from pgdr.postgres.binaries import free_port

    port = free_port()
    detail(f"port {wanted} is taken; using {port}")
    return port


def airflow_environment(home: Path, port: int) -> dict[str, str]:
    """Return the environment of the UI's ``airflow standalone`` (the demo's connections included)."""
    from pgdr.local.runner import local_airflow_env
    from pgdr.postgres.binaries import free_port

    env = {**os.environ, **local_airflow_env(home)}
    env.update(
        {
            # standalone starts `airflow scheduler` & co. by name: the venv's bin must be on PATH
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "PGDR_DEADLINES": "on",  # a real scheduler runs them (dag.test() cannot)
            "PGDR_WORK_DIR": str(home / "work"),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        }
    )
    return env


def _import_pools(env: dict[str, str]) -> None:
    from pgdr.airflow_glue.pools import required_pools
    from pgdr.plan import load_plan

    pools = STATE_DIR / "ui" / "pools.json"
    pools.write_text(json.dumps(required_pools(load_plan()), indent=2))
    airflow = str(Path(sys.executable).with_name("airflow"))
    for command in (["db", "migrate"], ["pools", "import", str(pools)]):
        result = subprocess.run([airflow, *command], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"airflow {' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def _session_members(session: int) -> list[int]:
    """Return the live processes of ``session`` (standalone's components start process groups of their own)."""
    members = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] not in ("Z", "X") and int(fields[3]) == session:
                members.append(int(proc.name))
    return members


def _stop_session(session: int, grace: float = 60) -> None:
    """SIGTERM every process of ``session``, then SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        for pid in _session_members(session):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _session_members(session) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _session_members(session):
            return


def _wait_until_ready(base_url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                "airflow standalone stopped while starting; the end of "
                f"{log}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}/api/v2/monitor/health", timeout=5) as response:
                if json.loads(response.read())["scheduler"]["status"] == "healthy":
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError):
            pass
        time.sleep(2)
    raise SystemExit(f"Airflow was not ready after {timeout:.0f}s; see {log}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8080, help="the UI's port (default 8080, or a free one if taken)")
    parser.add_argument("--plan", type=Path, help="a DR plan other than include/pgdr.yaml")
    parser.add_argument("--verbose", action="store_true", help="stream this command's log records to the terminal too")
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)  # tests: written once the UI answers
    args = parser.parse_args(argv)
    log_path = default_log_path(STATE_DIR / "logs", "ui").resolve()
    with Console(log_path, verbose=args.verbose):
        say(f"pgdr ui: this command's log records go to {log_path}; Airflow's to {UI_HOME / 'standalone.log'}")
        serve(args)


def serve(args: argparse.Namespace) -> None:
    """Start the server and airflow standalone, say where the UI is, and wait for Ctrl-C."""
    server = prepare(args.plan)
    UI_HOME.mkdir(parents=True, exist_ok=True)
    write_local_settings(UI_HOME)  # each task's exit seen at once, not up to 5 s later
    password = _password(UI_HOME)
    port = _port(args.port)
    env = airflow_environment(UI_HOME, port)
    say("Preparing the UI's Airflow (SQLite, .pgdr/ui) and the plan's pools")
    _import_pools(env)
    log = UI_HOME / "standalone.log"
    base_url = env["AIRFLOW__API__BASE_URL"]
    say(f"Starting airflow standalone (its output goes to {log})")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("airflow")), "standalone"],
        env=env,
        cwd=UI_HOME,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (UI_HOME / "airflow.pid").write_text(f"{process.pid}\n")  # its session: every process it starts
    stopping = False

    def stop(*_):
        nonlocal stopping
        if stopping:
            return
        stopping = True
        say("Stopping Airflow and the embedded PostgreSQL server")
        _stop_session(process.pid)  # standalone and every component it started
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        server.stop()
        detail("stopped.")

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
    # Ctrl-C must stop everything even when this was started with SIGINT ignored (a background job of
    # a script inherits SIG_IGN, and Python then raises no KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _wait_until_ready(base_url, process, log)
        say(f"pgdr in the Airflow UI: {base_url}")
        detail(f"login: {ADMIN} / {password}")
        detail(f"Try the incident restore form: {base_url}/dags/pgdr_restore/trigger")
        detail("Ctrl-C stops Airflow and the database server.")
        if args.ready_file:
            args.ready_file.write_text(json.dumps({"url": base_url, "user": ADMIN, "password": password}))
        while process.poll() is None:
            time.sleep(1)
        say(f"airflow standalone stopped by itself; the end of {log}:")
        for line in log.read_text(errors="replace")[-2000:].splitlines():
            detail(f"  | {line}")
    except KeyboardInterrupt:
        pass
    finally:
        stop()


if __name__ == "__main__":
    main()
