"""Data validation of a restored database with Great Expectations (GX Core 1.x).

Two kinds of suites run against the scratch database:

* the **baseline**, generated for every restored table from the backup's manifest and the
  restored catalog: the row count equals the count taken in the backup's snapshot; primary-key
  columns are unique and not null; no foreign key points at a missing row
  (``UnexpectedRowsExpectation``);
* **user suites**, plain files under ``include/gx/<database>/`` that a DBA edits without writing
  Python: YAML or GX suite JSON naming a table and a list of expectations. A string value
  ``${recovery_point - 60d}`` is replaced by the backup's recovery point minus that duration,
  which makes freshness checks possible ("the newest order is at most 60 days older than the
  backup").

GX runs in an ephemeral context; the connection string reaches GX through an environment
variable it substitutes, so no password is stored in GX's configuration. Each table is one query
asset, named in ``U&""`` escapes so that any PostgreSQL name survives GX (see
:mod:`pgdr.identifiers`), with a data source of its own (GX matches column names across the
assets of one source without regard to case). Each table is validated as one batch, so GX bundles
the aggregate metrics of all of its expectations into few queries.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from pgdr.errors import PermanentFailure
from pgdr.identifiers import (
    InvalidIdentifier,
    QualifiedName,
    parse_qualified_name,
    printable,
    quote_ident,
    table_key,
    unicode_identifier,
)
from pgdr.logical.catalog import BackupManifest
from pgdr.plan import PROJECT_ROOT, parse_duration
from pgdr.postgres.client import PgEndpoint, connect

log = logging.getLogger(__name__)

SUITES_ROOT_ENV_VAR = "PGDR_GX_SUITES"
_GX_CONN_ENV_VAR = "PGDR_GX_CONNECTION_STRING"
_RECOVERY_POINT = re.compile(r"^\$\{\s*recovery_point\s*(?:-\s*([^}]+?))?\s*\}$")


class ValidationFailed(PermanentFailure):
    """Expectations failed on the restored data."""


class SuiteError(PermanentFailure):
    """A user suite file is invalid."""


@dataclass
class ExpectationSpec:
    """One expectation to run: on which table, of which type, with which arguments, from where."""

    table: str
    type: str
    kwargs: dict[str, Any]
    source: str  # "baseline" or the suite file
    description: str = ""


@dataclass
class ExpectationOutcome:
    """The result of one expectation, flattened for reports and messages."""

    table: str
    type: str
    column: str | None
    success: bool
    observed: Any
    source: str
    description: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        column = f", column {self.column}" if self.column else ""
        what = self.description or self.type
        return printable(
            f"{what} on table {self.table}{column} (observed: {_short(self.observed)}; from {self.source})"
        )


@dataclass
class ValidationReport:
    """All outcomes of a validation run."""

    outcomes: list[ExpectationOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> dict[str, Any]:
        return {
            "expectations": len(self.outcomes),
            "failed": len(self.failed),
            "tables": len({o.table for o in self.outcomes}),
            "user_suites": sorted({o.source for o in self.outcomes if o.source != "baseline"}),
            "seconds": round(self.seconds, 3),
            "failures": [o.line() for o in self.failed],
        }

    def to_json(self) -> bytes:
        data = {"summary": self.summary(), "outcomes": [asdict(o) for o in self.outcomes]}
        return json.dumps(data, indent=2, default=str).encode()


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


# -- the baseline suite ---------------------------------------------------------------------------

_KEYS_SQL = """
SELECT n.nspname, c.relname, con.contype, con.conname,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord) AS cols,
       fn.nspname, f.relname,
       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord) AS fcols
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_class f ON f.oid = con.confrelid
LEFT JOIN pg_namespace fn ON fn.oid = f.relnamespace
WHERE con.contype IN ('p', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND (con.contype = 'p' OR con.conparentid = 0)
ORDER BY 1, 2, 4
"""


def _not_null_spec(table: str, column: str) -> ExpectationSpec:
    """Return the expectation that a primary key column is not null: GX's own where GX can name the column, the
    same check in SQL where it cannot (GX builds a condition string col("name") and breaks on a double quote in it)."""
    description = f"primary key column {quote_ident(column)} is not null"
    if '"' not in column:
        return ExpectationSpec(
            table, "expect_column_values_to_not_be_null", {"column": column}, "baseline", description
        )
    query = f"SELECT * FROM {{batch}} WHERE {unicode_identifier(column)} IS NULL"
    return ExpectationSpec(
        table, "unexpected_rows_expectation", {"unexpected_rows_query": query}, "baseline", description
    )


def _unique_spec(table: str, constraint: str, cols: list[str]) -> ExpectationSpec:
    """Return the expectation that a primary key is unique, as one ``GROUP BY`` query.

    GX's own uniqueness expectations count every value with a window function (a sort of the whole table) and then
    run a second query for a sample even when nothing is duplicated: 6.8 s on the 13.5 million keys of a 2 GB
    pgbench table, where grouping (the planner may read the key's index alone) takes 3.6 s (GX runs the query twice:
    for the rows, then for their count).
    """
    columns = ", ".join(unicode_identifier(c) for c in cols)
    not_null = " AND ".join(f"{unicode_identifier(c)} IS NOT NULL" for c in cols)
    named = "" if len(cols) == 1 else f" ({', '.join(map(quote_ident, cols))})"
    query = f"SELECT {columns} FROM {{batch}} WHERE {not_null} GROUP BY {columns} HAVING count(*) > 1"
    return ExpectationSpec(
        table,
        "unexpected_rows_expectation",
        {"unexpected_rows_query": query},
        "baseline",
        f"primary key {quote_ident(constraint)}{named} is unique",
    )


def baseline_specs(conn, manifest: BackupManifest, tables: set[str] | None = None) -> list[ExpectationSpec]:
    """Generate the baseline expectations of every restored table of ``manifest`` (or of ``tables``)."""
    restored = {t for t in manifest.row_counts if tables is None or t in tables}
    specs = [
        ExpectationSpec(
            table,
            "expect_table_row_count_to_equal",
            {"value": manifest.row_counts[table]},
            "baseline",
            f"row count equals the backup's {manifest.row_counts[table]}",
        )
        for table in sorted(restored)
    ]
    for schema, table, kind, name, cols, fschema, ftable, fcols in conn.execute(_KEYS_SQL).fetchall():
        key = table_key(schema, table)
        if key not in restored or (kind == "f" and table_key(fschema, ftable) not in restored):
            continue
        if kind == "p":
            specs.extend(_not_null_spec(key, col) for col in cols)
            specs.append(_unique_spec(key, name, cols))
        else:
            # GX substitutes {batch} with "(SELECT ...) AS subselect", so the batch cannot be given an
            # alias: the parent's key columns get unique aliases instead, which keeps every
            # unqualified column name unambiguous (it can only be the batch's).
            refs = [f"pgdr_ref_{i}" for i in range(len(cols))]
            # Names in U&"" escapes: GX and SQLAlchemy read %, : and braces in this text as placeholders.
            parent = ", ".join(f"{unicode_identifier(fc)} AS {ref}" for fc, ref in zip(fcols, refs, strict=True))
            join = " AND ".join(f"parent.{ref} = {unicode_identifier(cc)}" for cc, ref in zip(cols, refs, strict=True))
            not_null = " AND ".join(f"{unicode_identifier(cc)} IS NOT NULL" for cc in cols)
            query = (
                f"SELECT * FROM {{batch}} LEFT JOIN (SELECT {parent} FROM "
                f"{QualifiedName(fschema, ftable).unicode_quoted()}) parent ON {join} WHERE parent.{refs[0]} IS "
                f"NULL AND {not_null}"
            )
            specs.append(
                ExpectationSpec(
                    key,
                    "unexpected_rows_expectation",
                    {"unexpected_rows_query": query},
                    "baseline",
                    f"no orphans: every {key}({', '.join(map(quote_ident, cols))}) exists in "
                    f"{table_key(fschema, ftable)} (foreign key {quote_ident(name)})",
                )
            )
    return specs


# -- user suites ------------------------------------------------------------------------------------


def suites_dir(database: str) -> Path:
    """Return the folder of user suites for ``database`` (``include/gx/<database>``)."""
    root = Path(os.environ.get(SUITES_ROOT_ENV_VAR) or PROJECT_ROOT / "include" / "gx")
    return root / database


def _substitute(value: Any, recovery_point: datetime, where: str) -> Any:
    if isinstance(value, str):
        match = _RECOVERY_POINT.match(value)
        if match:
            if not match.group(1):
                return recovery_point
            try:
                return recovery_point - parse_duration(match.group(1))
            except PermanentFailure:
                raise SuiteError(f"{where}: {value!r}: expected ${{recovery_point - <duration>}}, e.g. 60d") from None
        return value
    if isinstance(value, list):
        return [_substitute(v, recovery_point, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, recovery_point, where) for k, v in value.items()}
    return value


def load_user_suites(database: str, manifest: BackupManifest) -> list[ExpectationSpec]:
    """Read every suite file for ``database``; an invalid file raises :class:`SuiteError` naming it."""
    folder = suites_dir(database)
    if not folder.is_dir():
        return []
    specs: list[ExpectationSpec] = []
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".yaml", ".yml", ".json"):
            continue
        where = f"{path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path}"
        try:
            data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (ValueError, yaml.YAMLError) as err:
            raise SuiteError(f"GX suite {where} is not valid {path.suffix[1:].upper()}: {err}") from None
        if not isinstance(data, dict):
            raise SuiteError(f"GX suite {where}: expected a mapping with 'table' and 'expectations'")
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        named = data.get("table") or meta.get("table")
        try:
            table = str(parse_qualified_name(named, f"GX suite {where}: 'table'")) if named else None
        except InvalidIdentifier as err:
            raise SuiteError(str(err)) from None
        if not table or table not in manifest.row_counts:
            known = ", ".join(printable(k) for k in sorted(manifest.row_counts))
            raise SuiteError(
                f"GX suite {where}: 'table' (or meta.table) must name a table of the backup as schema.table, "
                f'written as SQL writes it ("Sales Dept"."Customer Accounts" for names with upper case or spaces); '
                f"got {printable(repr(named))}. Tables in the backup: {known}"
            )
        expectations = data.get("expectations")
        if not isinstance(expectations, list) or not expectations:
            raise SuiteError(f"GX suite {where}: 'expectations' must be a non-empty list")
        for index, item in enumerate(expectations):
            if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                raise SuiteError(
                    f"GX suite {where}: expectations[{index}] needs a 'type' (e.g. expect_column_values_to_be_in_set)"
                )
            if item.get("kwargs") is not None and not isinstance(item["kwargs"], dict):
                raise SuiteError(
                    f"GX suite {where}: expectations[{index}].kwargs must be a mapping of argument names to values"
                )
            kwargs = _substitute(item.get("kwargs") or {}, manifest.recovery_point, f"{where} expectations[{index}]")
            specs.append(
                ExpectationSpec(
                    table,
                    item["type"],
                    kwargs,
                    where,
                    item.get("description") or (item.get("meta") or {}).get("description", ""),
                )
            )
    return specs


# -- running GX ---------------------------------------------------------------------------------------


def _build_expectation(spec: ExpectationSpec, tag: int):
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    try:
        return ExpectationConfiguration(
            type=spec.type, kwargs=spec.kwargs, description=spec.description or None, meta={"pgdr_spec": tag}
        ).to_domain_obj()
    except Exception as err:  # noqa: BLE001 - GX raises many kinds; the user needs the file and type
        raise SuiteError(
            f"{spec.source}: expectation {printable(spec.type)!r} on {printable(spec.table)} is not valid: "
            f"{printable(str(err))}. See https://greatexpectations.io/expectations for the types and their "
            "arguments."
        ) from None


def _exception_message(info: Any) -> str | None:
    """Return the first exception message in a GX ``exception_info`` (flat or keyed by metric), its first line.

    A query's error from SQLAlchemy reads ``(psycopg2.errors.X) what failed``, then the SQL, then a line
    pointing at SQLAlchemy's documentation: the first line is the one that says what went wrong.
    """
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return _first_line(info.get("exception_message")) or "error"
    for value in info.values():
        if isinstance(value, dict) and value.get("exception_message"):
            return _first_line(value["exception_message"]) or "error"
    return None


def _first_line(message: Any) -> str:
    return next((line.strip() for line in str(message or "").splitlines() if line.strip()), "")


def _observed(result: dict[str, Any]) -> Any:
    if "error" in result:
        return f"error: {result['error']}"
    if "observed_value" in result:
        value = result["observed_value"]
        return (
            f"{value} unexpected rows"
            if isinstance(value, int) and result.get("details", {}).get("unexpected_rows") is not None
            else value
        )
    if "unexpected_count" in result:
        count = result["unexpected_count"]
        if not count:
            return "0 unexpected values"
        sample = ", ".join(json.dumps(v, default=str) for v in (result.get("partial_unexpected_list") or [])[:5])
        return f"{count} unexpected values ({result.get('unexpected_percent', 0):.2f}%), e.g. {sample}"
    return result


def run_validation(target: PgEndpoint, specs: list[ExpectationSpec]) -> ValidationReport:
    """Validate ``specs`` against the database ``target`` with GX; never raises on failed expectations."""
    started = time.monotonic()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    preloaded = "great_expectations" in sys.modules  # a Celery worker imports it once, before it forks
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    log.info(
        "Great Expectations %s.",
        "already in memory (imported by the worker before it forked this task)"
        if preloaded
        else f"imported in {time.monotonic() - started:.1f}s",
    )

    credentials = f"{quote(target.user, safe='')}:{quote(target.password or '', safe='')}"
    if target.host.startswith("/"):  # a Unix socket directory (a scratch cluster's private socket)
        location = f"@/{quote(target.dbname, safe='')}?host={quote(target.host, safe='')}&port={target.port}"
    else:
        location = f"@{target.host}:{target.port}/{quote(target.dbname, safe='')}"
    os.environ[_GX_CONN_ENV_VAR] = f"postgresql+psycopg2://{credentials}{location}"
    report = ValidationReport()
    try:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        by_table: dict[str, list[ExpectationSpec]] = {}
        for spec in specs:
            by_table.setdefault(spec.table, []).append(spec)
        for index, (table, table_specs) in enumerate(sorted(by_table.items())):
            # A query asset with the name quoted by pgdr: GX's table assets fold names to lower case,
            # and GX re-reads query text as a template, so the name is written in U&"" escapes.
            relation = parse_qualified_name(table).unicode_quoted()
            # A data source per table: GX matches column names without regard to case across the
            # assets of one source ("id" of one table resolved to "Id" of another).
            source = context.data_sources.add_postgres(
                name=f"restored_{index}", connection_string=f"${{{_GX_CONN_ENV_VAR}}}"
            )
            query = f"SELECT * FROM {relation}"
            asset = source.add_query_asset(name=f"t{index}", query=query)
            _columns_without_rows(source.get_execution_engine().engine, query)
            suite = gx.ExpectationSuite(name=f"pgdr_{index}")
            for tag, spec in enumerate(table_specs):
                suite.add_expectation(_build_expectation(spec, tag))
            try:
                result = asset.add_batch_definition_whole_table("all").get_batch().validate(suite)
            finally:  # release GX's pooled sessions: the restored database may be renamed next
                try:
                    source.get_execution_engine().engine.dispose()
                except Exception:  # noqa: BLE001 - best effort; the swap also ends stray sessions
                    log.debug("could not dispose of the GX engine", exc_info=True)
            # GX orders results its own way (table-level first): match them by the tag in meta.
            for outcome in result.results:
                config = outcome.expectation_config
                spec = table_specs[config.meta["pgdr_spec"]]
                error = _exception_message(outcome.exception_info)
                if error:
                    outcome.result = {"error": error}
                report.outcomes.append(
                    ExpectationOutcome(
                        table=table,
                        type=config.type,
                        column=config.kwargs.get("column"),
                        success=bool(outcome.success),
                        observed=_observed(outcome.result or {}),
                        source=spec.source,
                        description=spec.description,
                        kwargs=_jsonable(spec.kwargs),
                    )
                )
    finally:
        os.environ.pop(_GX_CONN_ENV_VAR, None)
    report.seconds = time.monotonic() - started
    return report


def _columns_without_rows(engine, query: str) -> None:
    """Have GX learn a query asset's columns without fetching its rows.

    GX reads the columns of a query asset by running the query as it is and keeping the whole result in memory
    (``column_reflection_fallback``): the whole table, 2.6 GB of worker memory and 3 s for a 2 GB pgbench table,
    enough to kill a worker on a real-sized one. Every metric wraps the query as a subquery, so the query text
    sent alone is that reflection, which needs the columns only: it gets ``LIMIT 0``.
    """
    from sqlalchemy import event

    def limit(conn, cursor, statement, parameters, context, executemany):  # noqa: PLR0913 - SQLAlchemy's hook
        if statement.strip() == query:
            statement = f"{query} LIMIT 0"
        return statement, parameters

    event.listen(engine, "before_cursor_execute", limit, retval=True)


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(kwargs, default=str))


def validate_restored(
    target: PgEndpoint, manifest: BackupManifest, tables: set[str] | None = None, baseline: bool = True
) -> ValidationReport:
    """Run the baseline and the user suites of ``manifest.database`` on the restored ``target``.

    :param tables: for a table-level restore, validate only these tables.
    :param baseline: with ``False``, the user suites alone (none: nothing is run, GX is not even imported).
    """
    specs = []
    if baseline:
        with connect(target, application_name="pgdr-validation") as conn:
            specs = baseline_specs(conn, manifest, tables)
    specs += [s for s in load_user_suites(manifest.database, manifest) if tables is None or s.table in tables]
    if not specs:
        log.info("Great Expectations: no suite for database %s, nothing to validate.", printable(manifest.database))
        return ValidationReport()
    report = run_validation(target, specs)
    log.info(
        "Great Expectations: %d expectations on %d tables, %d failed, in %.1fs.",
        len(report.outcomes),
        len({o.table for o in report.outcomes}),
        len(report.failed),
        report.seconds,
    )
    return report


def failure_error(report: ValidationReport, manifest: BackupManifest, report_location: str) -> ValidationFailed:
    """Build the error that lists every failed expectation with its table, column and observed value."""
    lines = [o.line() for o in report.failed]
    return ValidationFailed(
        f"{len(lines)} of {len(report.outcomes)} expectations failed on the restore of backup {manifest.backup_id} "
        f"of database {manifest.database!r}: "
        + "; ".join(lines[:10])
        + ("; ..." if len(lines) > 10 else "")
        + f". Full report: {report_location}"
    )


def render_html(report: ValidationReport, manifest: BackupManifest, extra: dict[str, Any] | None = None) -> bytes:
    """Render a self-contained HTML page of the validation results."""
    rows = []
    for o in sorted(report.outcomes, key=lambda o: (o.success, o.table, o.type)):
        status = "pass" if o.success else "FAIL"
        rows.append(
            f"<tr class='{status.lower()}'><td>{status}</td><td>{html.escape(o.table)}</td>"
            f"<td>{html.escape(o.description or o.type)}</td><td>{html.escape(o.column or '')}</td>"
            f"<td><code>{html.escape(_short(o.observed))}</code></td><td>{html.escape(o.source)}</td></tr>"
        )
    summary = report.summary()
    facts = {
        "Database": manifest.database,
        "Backup": manifest.backup_id,
        "Recovery point": manifest.recovery_point.isoformat(),
        "Expectations": f"{summary['expectations']} on {summary['tables']} tables, {summary['failed']} failed",
        **(extra or {}),
    }
    fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    verdict = "All expectations passed" if report.ok else f"{summary['failed']} expectations FAILED"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>pgdr validation: {html.escape(manifest.database)} {html.escape(manifest.backup_id)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1d2330; }}
h1 {{ font-size: 1.4rem; }}
.verdict {{ font-size: 1.2rem; padding: .6rem 1rem; border-radius: 6px; display: inline-block; }}
.ok {{ background: #e3f6e8; color: #13612e; }} .bad {{ background: #fde7e7; color: #8a1111; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ padding: .3rem .7rem; border-bottom: 1px solid #e3e6ec; text-align: left; vertical-align: top; }}
tr.fail td {{ background: #fff1f1; }} tr.fail td:first-child {{ color: #b00; font-weight: 600; }}
tr.pass td:first-child {{ color: #13612e; }}
code {{ font-size: .85rem; }}
</style></head><body>
<h1>Restore validation of <code>{html.escape(manifest.database)}</code></h1>
<p class="verdict {"ok" if report.ok else "bad"}">{verdict}</p>
<table>{fact_rows}</table>
<table><tr><th>Result</th><th>Table</th><th>Expectation</th><th>Column</th><th>Observed</th><th>Suite</th></tr>
{"".join(rows)}
</table>
<p>Generated by pgdr with Great Expectations.</p>
</body></html>
"""
    return page.encode()
