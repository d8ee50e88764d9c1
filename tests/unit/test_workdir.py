"""The one leftover policy: what killed tries leave is removed once its process or its run is over."""

from __future__ import annotations

import json
import os
import socket

import pytest
from pgdr.workdir import (
    OWNER_FILE,
    claim,
    process_identity,
    remove_dead_workdirs,
    run_is_over,
    state_of_run,
    still_runs,
)


@pytest.mark.parametrize(
    ("state", "over"),
    [
        ("success", True),
        ("failed", True),
        ("DagRunState.FAILED", True),
        (None, True),
        ("running", False),
        ("queued", False),
    ],
)
def test_a_run_is_over_when_airflow_says_so_or_no_longer_knows_it(state, over):
    assert run_is_over(state) is over


def test_the_state_of_a_run_airflow_cannot_find_is_unknown():
    def ask(dag_id, run_id):
        raise KeyError(run_id)

    assert state_of_run(ask, "pgdr_verify_pitr", "gone") is None
    assert state_of_run(lambda *run: "running", "d", "r") == "running"
    assert state_of_run(None, "d", "r") is None


def test_only_dead_processes_work_directories_on_this_host_are_removed(tmp_path):
    mine = tmp_path / "pgdr-mine-0-x"
    mine.mkdir()
    claim(mine)
    dead = tmp_path / "pgdr-dead-0-x"
    dead.mkdir()
    (dead / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7, "started": "1"}))
    elsewhere = tmp_path / "pgdr-elsewhere-0-x"
    elsewhere.mkdir()
    (elsewhere / OWNER_FILE).write_text(json.dumps({"host": "another-worker", "pid": 1, "started": "1"}))
    assert remove_dead_workdirs(tmp_path) == [dead]
    assert mine.exists() and elsewhere.exists() and not dead.exists()
    assert json.loads((mine / OWNER_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("pid", ["not a number", None, [1], 2**22 + 7])
def test_a_marker_naming_no_running_process_is_a_leftover(tmp_path, pid):
    assert still_runs(process_identity(os.getpid())) is True
    assert still_runs({"host": socket.gethostname(), "pid": pid, "started": "1"}) is False
    assert still_runs(["a list"]) is False
    broken = tmp_path / "pgdr-broken-0-x"
    broken.mkdir()
    (broken / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "1"}))
    assert remove_dead_workdirs(tmp_path) == [broken]  # before: a pid that is not a number stopped the sweep
