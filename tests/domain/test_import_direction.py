"""The package layout is a rule, not a habit: the domain is Airflow-free, and only DAG files use ``tasks/``.

``pgdr/tasks/`` (one module per DAG), ``pgdr/airflow_glue/`` (connections, callbacks, deadlines,
pools, assets, the alert journal) and ``pgdr/local/`` (the embedded server, the in-process runner,
the demo) may talk to Airflow. Everything else is the domain: it never imports Airflow at module
level (an import inside a function, where a task needs it, is allowed), so it loads and tests
without Airflow's start-up cost. Nothing outside ``pgdr/tasks/`` and ``dags/`` imports
``pgdr.tasks``: the tasks are the top of the stack.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "plugins" / "pgdr"
AIRFLOW_FACING = ("tasks", "airflow_glue", "local")


def _imports(path: Path, module_level_only: bool) -> list[tuple[int, str]]:
    """Return ``(line, module)`` of every import in ``path`` (only the module-level ones if asked)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_domain_never_imports_airflow_at_module_level():
    offending = [
        f"{_where(path)}:{line} imports {module} at module level"
        for path in _modules()
        if path.relative_to(PACKAGE).parts[0] not in AIRFLOW_FACING
        for line, module in _imports(path, module_level_only=True)
        if module == "airflow" or module.startswith("airflow.")
    ]
    assert not offending, "domain modules must import Airflow inside the functions that need it:\n" + "\n".join(offending)


def test_only_dag_files_and_the_tasks_themselves_import_tasks():
    offending = [
        f"{_where(path)}:{line} imports {module}"
        for path in _modules()
        if path.relative_to(PACKAGE).parts[0] != "tasks"
        for line, module in _imports(path, module_level_only=False)
        if module == "pgdr.tasks" or module.startswith("pgdr.tasks.")
    ]
    assert not offending, "only dags/ and pgdr/tasks/ may import pgdr.tasks:\n" + "\n".join(offending)


def test_every_dag_file_has_its_tasks_module():
    dags = {p.stem.removeprefix("pgdr_") for p in (ROOT / "dags").glob("pgdr_*.py")}
    tasks = {p.stem for p in (PACKAGE / "tasks").glob("*.py")} - {"__init__", "common"}
    # pgdr_verify_restore's tasks are tasks/verify.py
    assert {d.replace("verify_restore", "verify") for d in dags} == tasks


def test_the_rules_catch_an_offence(tmp_path):
    """The checks above must be able to fail: a module-level airflow import is seen, a nested one is not."""
    sample = tmp_path / "sample.py"
    sample.write_text("import airflow.sdk\n\ndef f():\n    from pgdr.tasks.verify import run_drop_scratch\n")
    assert _imports(sample, module_level_only=True) == [(1, "airflow.sdk")]
    assert (4, "pgdr.tasks.verify") in _imports(sample, module_level_only=False)
