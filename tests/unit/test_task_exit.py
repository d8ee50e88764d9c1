"""Airflow's task supervisor, as pgdr's Celery workers run it: a task process that has closed its sockets and is
exiting is waited for, and its exit seen when it happens, not at the supervisor's next tick (5 s later)."""

from __future__ import annotations

import os
import time
import uuid

import pytest
from pydantic import TypeAdapter

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def supervised():
    """Start a real child process under Airflow's supervisor code (forked, its four sockets watched)."""
    from airflow.sdk.execution_time.supervisor import WatchedSubprocess
    from pgdr.airflow_glue import task_exit

    assert task_exit.install() and task_exit.install()  # installed, and a second call changes nothing

    class Child(WatchedSubprocess):
        decoder = TypeAdapter(dict)

        def _handle_request(self, msg, log, req_id):  # the children here send no request
            raise AssertionError(msg)

    def start(target):
        return Child.start(target=target, id=uuid.uuid4())

    return start


def _read_until_every_socket_closed(proc, bound_s=60):
    deadline = time.monotonic() + bound_s
    while proc._open_sockets and time.monotonic() < deadline:
        proc._service_subprocess(max_wait_time=1)
    assert not proc._open_sockets, f"the child's sockets still open after {bound_s}s"


def test_a_process_that_closed_its_sockets_is_waited_for_not_slept_past(supervised):
    """The race that cost 40 of 87 Celery tasks 5 s each, made wide: the child closes every socket, then takes
    seconds to exit. The supervisor's next call returns its exit status as soon as it exits, well before the wait it
    was given (unpatched, it slept on an empty select for all of it)."""
    exit_after_s, given_s = 3, 120

    def closes_its_sockets_then_exits_slowly():
        os.closerange(0, 4096)
        time.sleep(exit_after_s)

    proc = supervised(closes_its_sockets_then_exits_slowly)
    _read_until_every_socket_closed(proc)
    assert proc._exit_code is None, "the child exited before its sockets were read: this machine is too slow"
    started = time.monotonic()
    assert proc._service_subprocess(max_wait_time=given_s) == 0
    took = time.monotonic() - started
    assert took < given_s / 4, f"the exit was seen {took:.1f}s later, after the supervisor's own wait"


def test_many_task_processes_exit_and_each_exit_status_is_collected(supervised):
    """Forty children started at once, each exiting as soon as it starts with a status of its own: the corrected
    wait collects every one, each the status its own child exited with, none lost."""
    procs = {}
    for index in range(40):

        def exits(code=index % 7):
            os._exit(code)  # the way Airflow's child ends: no interpreter shutdown

        procs[index] = supervised(exits)
    for index, proc in procs.items():
        _read_until_every_socket_closed(proc)
        deadline = time.monotonic() + 60
        while proc._exit_code is None and time.monotonic() < deadline:  # as the supervisor's own loop
            proc._service_subprocess(max_wait_time=5)
        assert proc._exit_code == index % 7, (index, proc._exit_code)


def test_an_airflow_home_pgdr_owns_installs_it_in_every_airflow_process(tmp_path):
    """`make ui` and the end-to-end tests run `airflow standalone` (LocalExecutor): the module written into its
    home's config folder is imported by each Airflow process at start, and installs the correction there."""
    import subprocess
    import sys
    from pathlib import Path

    from pgdr.airflow_glue.task_exit import MARK, write_local_settings

    plugins = Path(__file__).resolve().parents[2] / "plugins"
    path = write_local_settings(tmp_path)
    assert path == tmp_path / "config" / "airflow_local_settings.py"
    code = (
        "import airflow.settings\n"
        "from airflow.sdk.execution_time.supervisor import WatchedSubprocess\n"
        f"print(getattr(WatchedSubprocess._service_subprocess, {MARK!r}, False))\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "True", out.stdout + out.stderr
