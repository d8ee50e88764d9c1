"""The package layout is a rule, not a habit: the domain is Airflow-free, and only DAG files use ``tasks/``.

``pgdr/tasks/`` (one module per DAG), ``pgdr/airflow_glue/`` (connections, callbacks, deadlines,
pools, assets, metrics, the alert journal) and ``pgdr/local/`` (the embedded server, the in-process
runner, the demo) may talk to Airflow. Everything else is the domain: it imports neither Airflow
nor ``pgdr.airflow_glue`` nor ``pgdr.local``, at any level (an import inside a function counts), so
it loads and tests without Airflow, and its rules take what they need (a
:class:`pgdr.resources.Resources`) instead of reaching up for it. Nothing outside ``pgdr/tasks/``
and ``dags/`` imports ``pgdr.tasks``: the tasks are the top of the stack.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "plugins" / "pgdr"
AIRFLOW_FACING = ("tasks", "airflow_glue", "local")
UPWARDS = ("airflow", "pgdr.airflow_glue", "pgdr.local")
# The domain modules that may import upwards, and why.
EXCEPTIONS = {
    "__main__.py": "python -m pgdr is the command line's entry point (pgdr.local.cli)",
    "notify.py": "deadline alerts stored with runs of pgdr 0.2 name pgdr.notify.*; it re-exports them from "
    "airflow_glue",
}


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


def _upwards(module: str) -> bool:
    return any(module == top or module.startswith(top + ".") for top in UPWARDS)


def test_the_domain_never_imports_airflow_glue_or_local_at_any_level():
    offending = [
        f"{_where(path)}:{line} imports {module}"
        for path in _modules()
        if path.relative_to(PACKAGE).parts[0] not in AIRFLOW_FACING and str(path.relative_to(PACKAGE)) not in EXCEPTIONS
        for line, module in _imports(path, module_level_only=False)
        if _upwards(module)
    ]
    assert not offending, (
        "domain modules take what they need as arguments (pgdr.resources.Resources) instead of importing Airflow, "
        "pgdr.airflow_glue or pgdr.local:\n" + "\n".join(offending)
    )


def test_every_exception_still_exists_and_still_needs_to_be_one():
    for name, why in EXCEPTIONS.items():
        path = PACKAGE / name
        assert path.exists(), f"{name} is gone: remove it from EXCEPTIONS ({why})"
        assert any(_upwards(m) for _, m in _imports(path, module_level_only=False)), (
            f"{name} no longer needs to be an exception"
        )


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
    tasks = {p.stem for p in (PACKAGE / "tasks").glob("*.py")} - {"__init__"}
    # pgdr_verify_restore's tasks are tasks/verify.py
    assert {d.replace("verify_restore", "verify") for d in dags} == tasks


def test_the_rules_catch_an_offence(tmp_path):
    """The checks above must be able to fail: a module-level airflow import is seen, a nested one is not."""
    sample = tmp_path / "sample.py"
    sample.write_text("import airflow.sdk\n\ndef f():\n    from pgdr.tasks.verify import run_drop_scratch\n")
    assert _imports(sample, module_level_only=True) == [(1, "airflow.sdk")]
    assert (4, "pgdr.tasks.verify") in _imports(sample, module_level_only=False)
