"""A real distributed Airflow for the tests, without Docker: CeleryExecutor, Redis, PostgreSQL metadata.

Started as separate processes on 127.0.0.1, each with an Airflow home of its own (as each
container of ``docker-compose.yaml`` has its own filesystem):

* Redis from Debian's ``redis-server`` (the Celery broker);
* Airflow's metadata database: a database ``airflow`` on an embedded PostgreSQL 18 server;
* ``airflow api-server``, ``scheduler``, ``dag-processor``, ``triggerer`` and two
  ``airflow celery worker`` processes, each worker with its own ``PGDR_WORK_DIR`` and host name.

The Airflow settings are **read from docker-compose.yaml** (its ``x-airflow-common``
environment) and only the keys in :data:`LOCAL_ADDRESSES` are replaced, by the addresses of the
local processes; :data:`ADDED_HERE` lists what is added and why. ``tests/celery/test_agreement.py``
fails when the two drift apart. The plan is ``include/pgdr.compose.yaml`` adapted the same way
(:func:`compose_shaped_plan`). Pools come from ``python -m pgdr.airflow_glue.pools`` and
``airflow pools import``, as ``airflow-init`` does.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import yaml
from airflow_client import AirflowClient
from pgdr.local.runner import DAGS_FOLDER, PLUGINS_FOLDER
from pgdr.postgres.binaries import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
COMPOSE_PLAN = ROOT / "include" / "pgdr.compose.yaml"
TESTS = Path(__file__).resolve().parent
ADMIN = "admin"

# docker-compose.yaml's settings whose values name a place: the service names and container paths
# there become local ports and files here. Every other AIRFLOW__ setting is used as it is.
LOCAL_ADDRESSES = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
    "AIRFLOW__API__BASE_URL",
    "AIRFLOW__API_AUTH__JWT_SECRET",  # a ${VARIABLE} from .env there, a fresh secret here
    "AIRFLOW__API__SECRET_KEY",
}

# Settings added here that docker-compose.yaml does not need (a container has its own ports and
# paths) or that make a fault visible in seconds instead of minutes.
ADDED_HERE = {
    "AIRFLOW__CORE__DAGS_FOLDER": "the image mounts ./dags at $AIRFLOW_HOME/dags",
    "AIRFLOW__CORE__PLUGINS_FOLDER": "the image mounts ./plugins at $AIRFLOW_HOME/plugins",
    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "each container has its own host name; here each worker says its own",
    "AIRFLOW__API__PORT": "8080 in its own container; a free port here",
    "AIRFLOW__API__HOST": "0.0.0.0 in a container; only the loopback here",
    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "8793 in each worker container; one free port per worker here",
    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": "8794 in the triggerer container; a free port here",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": "8974 in the scheduler container; a free port here",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "a killed worker's task is failed after 20 s, not 5 min",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "looked for every 5 s",
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "a task whose broker message was lost is queued again after 60 s",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "the tests' plan is read at once",
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "the plan is written before the start and never changes: "
    "each file parsed once (a changed file still at once), not every 5 s (a quarter of a core on a 2-core machine)",
    "AIRFLOW__API__WORKERS": "one API process is enough for a 2-core test machine",
}

TEST_TIMINGS = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "60",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
    "AIRFLOW__API__WORKERS": "1",
}

# The component commands, as the compose services run them.
COMPONENTS = {
    "api-server": ["api-server"],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
}
WORKER_COMMAND = ["celery", "worker"]


def compose_environment() -> dict[str, str]:
    """Return docker-compose.yaml's Airflow environment (``x-airflow-common``), values as written."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    return {key: str(value) for key, value in compose["x-airflow-common"]["environment"].items()}


def compose_commands() -> dict[str, list[str]]:
    """Return the command of each Airflow service of docker-compose.yaml."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    return {
        name: str(service["command"]).split()
        for name, service in compose["services"].items()
        if name.startswith("airflow-") and isinstance(service.get("command"), str)
    }


def compose_shaped_plan(storage: dict, databases: list[dict], **overrides) -> dict:
    """Return ``include/pgdr.compose.yaml`` with this machine's storage and databases.

    Everything else (backup settings, defaults, notifications) is the compose plan's, but for
    ``overrides`` (section -> keys), which the tests use for timings only.
    """
    plan = copy.deepcopy(yaml.safe_load(COMPOSE_PLAN.read_text()))
    plan["storage"] = storage
    plan["defaults"]["storage"] = next(iter(storage))
    plan["databases"] = databases
    for section, values in overrides.items():
        plan[section] = {**plan.get(section, {}), **values}
    return plan


def start_metadata_server(path: Path):
    """Start Airflow's metadata database: an embedded PostgreSQL 18 server at ``path`` with a database
    ``airflow`` owned by a role ``airflow`` whose password (random) is the server's ``airflow_password``."""
    import psycopg
    from pgdr.local.embedded import EmbeddedServer
    from psycopg import sql

    server = EmbeddedServer(path).start()
    server.airflow_password = secrets.token_urlsafe(18)
    with psycopg.connect(**server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE airflow LOGIN PASSWORD {}").format(sql.Literal(server.airflow_password)))
        conn.execute("CREATE DATABASE airflow OWNER airflow")
    return server


def redis_server() -> str | None:
    return shutil.which("redis-server") or (os.path.exists("/usr/bin/redis-server") and "/usr/bin/redis-server") or None


class CeleryCluster(AirflowClient):
    """Every process of a CeleryExecutor deployment, started and stopped by the tests."""

    def __init__(self, root: Path, metadata_server, connections: dict[str, str], plan_path: Path, workers: int = 2):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.metadata_server = metadata_server
        self._taken: set[int] = set()
        self.port = self._port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.redis_port = self._port()
        self.workers = [f"pgdr-worker-{i}" for i in range(1, workers + 1)]
        self.processes: dict[str, subprocess.Popen] = {}
        self.redis: subprocess.Popen | None = None
        self.admin_password = secrets.token_urlsafe(12)
        self.passwords_file = root / "auth" / "passwords.json"
        self.plan_path = plan_path
        self.connections = connections
        self._worker_ports = {name: self._port() for name in self.workers}
        self.settings = self._settings()

    def _port(self) -> int:
        """A free port no other component of this deployment was given (the OS may hand one out twice)."""
        while (port := free_port()) in self._taken:
            pass
        self._taken.add(port)
        return port

    # -- configuration ----------------------------------------------------------------------------
    def _settings(self) -> dict[str, str]:
        meta = self.metadata_server
        db_password = meta.airflow_password
        local = {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://airflow:{db_password}@127.0.0.1:{meta.port}/airflow",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://airflow:{db_password}@127.0.0.1:{meta.port}/airflow",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://:@127.0.0.1:{self.redis_port}/0",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        }
        added = {
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "harness_hostname.hostname",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self._port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self._port()),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(self._port()),
            **TEST_TIMINGS,
        }
        settings = {k: v for k, v in compose_environment().items() if k.startswith("AIRFLOW__")}
        return {**settings, **local, **added}

    def environment(self, component: str) -> dict[str, str]:
        """Return the full environment of one component (its own Airflow home, work dir, host name)."""
        home = self.root / component
        home.mkdir(parents=True, exist_ok=True)
        venv_bin = str(Path(sys.executable).parent)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PGDR_"))},
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            **self.settings,
            "PYTHONPATH": f"{PLUGINS_FOLDER}{os.pathsep}{TESTS}",
            "XDG_RUNTIME_DIR": str(home),
            "PGDR_PLAN": str(self.plan_path),
            "PGDR_WORK_DIR": str(home / "pgdr-work"),
            "PGDR_TEST_HOSTNAME": component,
            **self.connections,
        }
        if component in self._worker_ports:
            env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(self._worker_ports[component])
        return env

    # -- processes ----------------------------------------------------------------------------------
    def _airflow(self, component: str, args: list[str], wait: bool = False) -> subprocess.Popen:
        log = open(self.root / f"{component}.log", "ab")
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), *args],
            env=self.environment(component),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root / component,
        )
        self._sessions = [*self._sessions, process.pid]
        if wait:
            if process.wait(timeout=600) != 0:
                raise RuntimeError(f"airflow {' '.join(args)} failed:\n{self.log_tail(component)}")
        else:
            self.processes[component] = process
        return process

    def start_redis(self) -> None:
        (self.root / "redis").mkdir(exist_ok=True)
        log = open(self.root / "redis.log", "ab")
        self.redis = subprocess.Popen(
            [
                redis_server(),
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.root / "redis"),
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait(lambda: b"Ready to accept connections" in (self.root / "redis.log").read_bytes(), 30, "redis")

    def stop_redis(self) -> None:
        """Stop Redis the way a service manager does (SIGTERM: it saves its data and exits)."""
        if self.redis and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(timeout=30)

    def start(self, timeout: float = 300) -> CeleryCluster:
        self.start_redis()
        self.passwords_file.parent.mkdir(parents=True, exist_ok=True)
        self.passwords_file.write_text(json.dumps({ADMIN: self.admin_password}))
        self._airflow("airflow-init", ["db", "migrate"], wait=True)
        pools = self.root / "pools.json"
        subprocess.run(
            [sys.executable, "-m", "pgdr.airflow_glue.pools", "--output", str(pools)],
            check=True,
            env=self.environment("airflow-init"),
        )
        self._airflow("airflow-init", ["pools", "import", str(pools)], wait=True)
        for component, args in COMPONENTS.items():
            self._airflow(component, args)
        for worker in self.workers:
            self.start_worker(worker, wait=False)
        try:
            self._wait(self._healthy, timeout, "the Airflow components")
            for worker in self.workers:
                self._wait(lambda w=worker: self.worker_ready(w), timeout, worker)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        self._check_alive()
        try:
            if not self.token:
                self.login(ADMIN, self.admin_password)
            health = self.api("GET", "/api/v2/monitor/health")
            dags = {d["dag_id"] for d in self.api("GET", "/api/v2/dags?limit=100")["dags"]}
        except (urllib.error.URLError, ConnectionError, KeyError, TimeoutError):
            return False
        parts = ("scheduler", "triggerer", "dag_processor")
        return (
            all(health.get(p, {}).get("status") == "healthy" for p in parts)
            and {"pgdr_backup", "pgdr_verify_restore"} <= dags
        )

    def _check_alive(self) -> None:
        for component, process in self.processes.items():
            if process.poll() is not None and component not in self._stopped:
                raise RuntimeError(f"{component} exited early:\n{self.log_tail(component)}")

    _stopped: set[str] = set()

    def worker_ready(self, worker: str) -> bool:
        log = (self.root / f"{worker}.log").read_bytes()
        return log.rfind(b" ready.") > self._worker_log_start.get(worker, 0)

    _worker_log_start: dict[str, int] = {}
    _queues: dict[str, str] = {}  # the queues of a worker that serves only those

    def start_worker(self, worker: str, wait: bool = True, queues: str | None = None) -> None:
        """Start ``worker`` (one of :attr:`workers`, or another: a worker on another host, serving only ``queues``,
        e.g. the new database host of a whole-server recovery); wait until it is ready unless told not to."""
        log = self.root / f"{worker}.log"
        self._worker_log_start = {**self._worker_log_start, worker: log.stat().st_size if log.exists() else 0}
        self._stopped = self._stopped - {worker}
        if worker not in self._worker_ports:
            self._worker_ports[worker] = self._port()
        self._queues = {**self._queues, **({worker: queues} if queues else {})}
        only = ["--queues", self._queues[worker]] if worker in self._queues else []
        self._airflow(worker, [*WORKER_COMMAND, "--celery-hostname", f"{worker}@%h", *only])
        if wait:
            self._wait(lambda: self.worker_ready(worker), 120, worker)

    def processes_of(self, component: str) -> dict[int, str]:
        """Return ``{pid: command name}`` of every process a component started.

        That is its session (each component starts in a session of its own) and every descendant
        of it. Not the environment: Celery and Airflow rename their processes (setproctitle), which
        overwrites it, and pgdr gives the client tools a minimal one.
        """
        return _session_and_descendants({self.processes[component].pid})

    def sessions(self) -> set[int]:
        """The session ids of every component ever started (each starts a session of its own)."""
        return set(self._sessions)

    _sessions: list[int] = []

    def kill_worker(self, worker: str) -> None:
        """SIGKILL a worker and everything it started (its task processes, pg_restore): a lost machine."""
        self._stopped = self._stopped | {worker}
        for pid in self.processes_of(worker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.processes[worker].wait(timeout=30)
        self._wait(lambda: not self.processes_of(worker), 30, f"the end of {worker}'s processes")

    def restart(self, component: str) -> None:
        """Stop a component with SIGTERM (as ``docker compose restart`` does) and start it again."""
        self._stopped = self._stopped | {component}
        self._terminate(self.processes[component])
        self._stopped = self._stopped - {component}
        self._airflow(component, COMPONENTS[component])

    @staticmethod
    def _terminate(process: subprocess.Popen) -> None:
        if process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            self._terminate(process)
        self.stop_redis()

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(1)
        raise TimeoutError(f"{what} not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, component: str | None = None, chars: int = 3000) -> str:
        names = [component] if component else [*COMPONENTS, *self.workers]
        parts = []
        for name in names:
            path = self.root / f"{name}.log"
            if path.exists():
                parts.append(f"--- {name} ---\n" + path.read_text(errors="replace")[-chars:])
        return "\n".join(parts)

    def task_log(self, worker: str) -> str:
        """Everything the tasks that ran on ``worker`` logged (its own Airflow home's log folder)."""
        logs = self.root / worker / "logs"
        return "\n".join(p.read_text(errors="replace") for p in sorted(logs.rglob("*.log"))) if logs.exists() else ""


def _process_table() -> dict[int, tuple[int, int, str]]:
    """Return ``{pid: (parent pid, session id, command name)}`` of every live process (zombies left out)."""
    table = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat.rsplit(")", 1)[1].split()
                if fields[0] in ("Z", "X"):  # dead, waiting to be reaped: nothing runs there any more
                    continue
                table[int(proc.name)] = (int(fields[1]), int(fields[3]), comm)
            except (OSError, ValueError, IndexError):
                continue
    return table


def _session_and_descendants(sessions: set[int]) -> dict[int, str]:
    table = _process_table()
    found = {pid for pid, (_, sid, _) in table.items() if sid in sessions} | (sessions & set(table))
    grown = True
    while grown:
        more = {pid for pid, (parent, _, _) in table.items() if parent in found} - found
        found |= more
        grown = bool(more)
    return {pid: table[pid][2] for pid in found}


def processes_left_after(root: Path, sessions: set[int], timeout: float = 60) -> list[str]:
    """Return the deployment's processes (:func:`component_processes_left`) still running ``timeout`` seconds after
    its components were stopped. A task's database server got the components' SIGTERM with them, and its shutdown
    (a checkpoint, its backends leaving) outlives the component's own exit by a few seconds: it is waited for, as a
    service manager waits; one still there after ``timeout`` is a leak."""
    deadline = time.monotonic() + timeout
    while (left := component_processes_left(root, sessions)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def component_processes_left(root: Path, sessions: set[int] = frozenset()) -> list[str]:
    """Return the processes still running that belong to a deployment under ``root``.

    Those of the given sessions (the components'), and any with ``root`` in its command line or
    environment (a database server started for it).
    """
    left = [f"{pid}: {name}" for pid, name in _session_and_descendants(set(sessions)).items()]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(root).encode() in environ or str(root) in cmdline:
            left.append(f"{proc.name}: {cmdline[:200]}")
    return left
