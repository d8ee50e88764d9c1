"""The DR drill: measured RTO and RPO against the plan, and a report people want to read.

**RTO achieved** is the wall time from the moment the drill starts fetching a backup to the
moment the restored database has passed its integrity checks and validation: the time an
incident restore would take.

**RPO achieved** is read from the catalog. Two numbers: the age of the newest *verified*
backup when the drill starts (the data an incident would lose right now, counting only
backups proven to restore), and the worst gap between consecutive successful backups over the
last 30 days (the data the worst moment of the month would have lost).

A **negative control** proves the checks can fail: the drill corrupts a private copy of one
backup file and verification must reject it. A drill whose negative control passes undetected
fails, because a check that cannot fail proves nothing.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pgdr.identifiers import printable
from pgdr.logical.catalog import BackupEntry
from pgdr.messages import duration_or_na, first_line, format_duration
from pgdr.records import achieved_rto, seconds_between

RPO_WINDOW = timedelta(days=30)
PHASE_ORDER = ("dump", "upload", "checksum", "download", "restore", "checks", "validation", "privileges")


def rpo_metrics(backups: list[BackupEntry], now: datetime, window: timedelta = RPO_WINDOW) -> dict[str, Any]:
    """Compute the achieved RPO numbers from the catalog at time ``now``.

    :param backups: complete backups of one database, any order. Failed verifications do not
        count as successful backups.
    """
    good = sorted((b for b in backups if b.status != "failed"), key=lambda b: b.recovery_point)
    verified = [b for b in good if b.status == "verified"]
    result: dict[str, Any] = {
        "newest_backup_age_s": (now - good[-1].recovery_point).total_seconds() if good else None,
        "newest_verified_age_s": (now - verified[-1].recovery_point).total_seconds() if verified else None,
        "newest_verified": verified[-1].backup_id if verified else None,
        "worst_gap_s": None,
        "worst_gap_between": None,
        "backups_in_window": 0,
    }
    in_window = [b for b in good if b.recovery_point >= now - window]
    result["backups_in_window"] = len(in_window)
    # The gap that crosses into the window counts too: it is data the month could have lost.
    earlier = [b for b in good if b.recovery_point < now - window]
    series = ([earlier[-1]] if earlier else []) + in_window
    for older, newer in zip(series, series[1:], strict=False):
        gap = (newer.recovery_point - older.recovery_point).total_seconds()
        if result["worst_gap_s"] is None or gap > result["worst_gap_s"]:
            result["worst_gap_s"] = gap
            result["worst_gap_between"] = [older.backup_id, newer.backup_id]
    return result


def control_file(files):
    """Return the file the negative control corrupts: the smallest that has a byte to flip.

    An empty table's file may be empty (``compression: none``): flipping a bit needs one.
    """
    candidates = [f for f in files if f.stored_size > 0]
    if not candidates:
        raise ValueError("the backup has no file with content to corrupt; the negative control cannot run")
    return min(candidates, key=lambda f: f.stored_size)


def phase(name: str, started_at: str, finished_at: str, **extra) -> dict[str, Any]:
    """Return one timed phase of a drill."""
    seconds = seconds_between(started_at, finished_at)
    return {"name": name, "started_at": started_at, "finished_at": finished_at, "seconds": round(seconds, 3), **extra}


def evaluate(
    database: str,
    rto_target_s: float,
    rpo_target_s: float,
    phases: list[dict],
    rpo: dict,
    negative_control: dict | None,
    failed_phase: str | None,
    validation: dict | None,
    backup_id: str | None,
    copies: dict[str, dict] | None = None,
    restored: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Return the per-database drill result with pass/fail against every target and action items.

    :param copies: per copy target, its last verification from the copy (:func:`copy_proofs`): checks
        ``copy_verified.<target>``.
    :param restored: what the scratch restore made or left out beside the dump's objects
        (:meth:`pgdr.logical.restore.ScratchRestore.objects`).
    """
    by_name = {p["name"]: p for p in phases}
    rto_s = None
    if failed_phase is None and "checksum" in by_name and "validation" in by_name:
        last = (
            by_name.get("privileges") or by_name["validation"]
        )  # drills before privileges were given back end at validation
        rto_s = achieved_rto([by_name["checksum"], last])
    checks = {
        "rto": {"target_s": rto_target_s, "achieved_s": rto_s, "met": rto_s is not None and rto_s <= rto_target_s},
        "rpo_newest_verified": {
            "target_s": rpo_target_s,
            "achieved_s": rpo["newest_verified_age_s"],
            "met": rpo["newest_verified_age_s"] is not None and rpo["newest_verified_age_s"] <= rpo_target_s,
        },
        "rpo_worst_gap": {
            "target_s": rpo_target_s,
            "achieved_s": rpo["worst_gap_s"],
            "met": rpo["worst_gap_s"] is None or rpo["worst_gap_s"] <= rpo_target_s,
        },
    }
    for target, proof in (copies or {}).items():
        checks[f"copy_verified.{target}"] = proof
    control_ok = bool(negative_control and negative_control.get("rejected"))
    actions = action_items(database, checks, rpo, negative_control, failed_phase, validation)
    return {
        "database": database,
        "backup_id": backup_id,
        "status": "pass" if failed_phase is None and control_ok and all(c["met"] for c in checks.values()) else "fail",
        "failed_phase": failed_phase,
        "phases": sorted(phases, key=lambda p: p["started_at"]),
        "checks": checks,
        "rpo": rpo,
        "negative_control": negative_control,
        "validation": validation,
        "restored": restored or {},
        "action_items": actions,
    }


_RESTORED = (
    ("roles_created", "Roles the server lacked, created for the scratch database without passwords, then dropped"),
    ("tablespaces_left_out", "Tablespaces the server lacks: their tables and indexes restored into the default one"),
    ("extensions_created", "Extensions the restore role may not create, created by the server's own connection"),
)


def restored_lines(result: dict[str, Any]) -> list[str]:
    """What a database's scratch restore made or left out (roles, tablespaces, extensions), one line each."""
    restored = result.get("restored") or {}  # drills before 2026-12 did not keep it
    return [
        f"{label}: {', '.join(printable(n) for n in names)}" for key, label in _RESTORED if (names := restored.get(key))
    ]


def action_items(database, checks, rpo, negative_control, failed_phase, validation) -> list[str]:
    """Turn every failure or breach into something a person can do."""
    items = []
    if failed_phase:
        items.append(
            f"{database}: the drill failed in phase {failed_phase}. Open its log, fix the cause, and run the drill "
            "again."
        )
    rto = checks["rto"]
    if rto["achieved_s"] is not None and not rto["met"]:
        items.append(
            f"{database}: restore took {format_duration(rto['achieved_s'])}, over the RTO of "
            f"{format_duration(rto['target_s'])}. Restore faster (more dump_jobs, a bigger restore server, fewer "
            "indexes to rebuild) or agree a realistic RTO."
        )
    newest = checks["rpo_newest_verified"]
    if newest["achieved_s"] is None:
        items.append(f"{database}: no verified backup exists. Make sure pgdr_verify_restore runs on every backup.")
    elif not newest["met"]:
        items.append(
            f"{database}: the newest verified backup was {format_duration(newest['achieved_s'])} old, over the RPO "
            f"of {format_duration(newest['target_s'])}. Check that backups and their verification run on schedule."
        )
    gap = checks["rpo_worst_gap"]
    if not gap["met"]:
        older, newer = rpo["worst_gap_between"]
        items.append(
            f"{database}: {format_duration(gap['achieved_s'])} passed between backups {older} and {newer}, over the "
            f"RPO of {format_duration(gap['target_s'])}. Find out why backups stopped then (failed runs, paused "
            "DAG, outage)."
        )
    if not (negative_control and negative_control.get("rejected")):
        items.append(
            f"{database}: the negative control was NOT rejected: a corrupted backup file passed verification. Treat "
            "every verification as unproven until this is fixed."
        )
    if validation and validation.get("failed"):
        items.append(
            f"{database}: {validation['failed']} expectations failed on the restored data; see the validation report."
        )
    for name, proof in checks.items():
        if name.startswith("copy_verified.") and not proof["met"]:
            items.append(f"{database}: {copy_proof_problem(name.partition('.')[2], proof)}")
    return items


# A copy's last verification may be a daily run late past verify_copies_every before the drill calls it unproven.
COPY_PROOF_GRACE = timedelta(days=1)


def copy_proofs(db, res, now: datetime) -> dict[str, dict[str, Any]]:
    """Return, per copy target of ``db``, its newest verification made by restoring from the copy: which backup,
    when, its outcome, and whether it is recent (``verify_copies_every`` and a day's grace) and passed."""
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.verification import last_copy_verification

    proofs = {}
    limit = (db.verify_copies_every + COPY_PROOF_GRACE).total_seconds()
    for copy in db.copies:
        proof: dict[str, Any] = {"target_s": limit, "achieved_s": None, "met": False}
        proofs[copy.name] = proof
        try:
            store, layout = res.store(copy)
            last = last_copy_verification(BackupCatalog(store, layout, db.name).backups(), copy.name)
        except Exception as err:  # noqa: BLE001 - an unreadable copy is unproven: the finding
            proof["error"] = first_line(err)
            continue
        if last is None:
            continue
        age = (now - datetime.fromisoformat(last.verified_at)).total_seconds() if last.verified_at else None
        proof.update(
            achieved_s=age,
            met=last.verified and age is not None and age <= limit,
            backup_id=last.backup_id,
            status=last.status,
            verified_at=last.verified_at,
            failed_phase=last.failed_phase,
            restore_seconds=last.restore_seconds,
        )
    return proofs


def copy_proof_problem(target: str, proof: dict[str, Any]) -> str:
    """Return what is wrong with a copy's proof, and what to do (for a check that is not met)."""
    if proof.get("error"):
        return f"copy {target!r} could not be read: {proof['error']}. Check its storage and credentials."
    if proof.get("status") is None:
        return (
            f"copy {target!r} has never been verified by a restore from it. Trigger pgdr_verify_restore with "
            f"verify_from {target!r}, or let its daily run do it (verify_copies_every)."
        )
    if proof["status"] != "verified":
        return (
            f"the last restore from copy {target!r} (backup {proof['backup_id']}, {proof['verified_at']}) failed in "
            f"phase {proof.get('failed_phase')}: the copy cannot be relied on. Open that verification's log."
        )
    return (
        f"copy {target!r} was last proven by a restore {duration_or_na(proof['achieved_s'])} ago (backup "
        f"{proof['backup_id']}), longer than verify_copies_every and a day: pgdr_verify_restore's daily run is not "
        "verifying it. Check that run."
    )


# -- the report -------------------------------------------------------------------------------------


def headline(report: dict[str, Any]) -> list[str]:
    """Return one line per database with the numbers that matter."""
    lines = []
    for r in report["databases"]:
        rto, rpo, gap, control = _measures(r)
        lines.append(
            f"{r['database']}: {r['status'].upper()} | RTO {rto} | RPO (newest verified) {rpo} | worst gap {gap} | "
            f"negative control {control}"
        )
    for database, target, check in _copy_rows(report):
        lines.append(
            f"{database}, copy {target}: {'PASS' if check['met'] else 'FAIL'} | last proven by a restore from the copy "
            f"{duration_or_na(check['achieved_s'])} ago / {duration_or_na(check['target_s'])}"
        )
    for p in report.get("pitr") or []:
        rpo = p["rpo"]
        if p.get("error"):
            lines.append(f"server {p['server']} (PITR): FAIL | the rehearsal did not finish: {p['error']}")
            continue
        lines.append(
            f"server {p['server']} (PITR): {'PASS' if rpo['met'] else 'FAIL'} | RPO achieved "
            f"{duration_or_na(rpo['achieved_s'])} / {duration_or_na(rpo['target_s'])} (drill start minus the newest "
            f"heartbeat recovered) | recovered in {duration_or_na(p['recovery_seconds'])}"
        )
    return lines


def _measures(r: dict[str, Any]) -> tuple[str, str, str, str]:
    """Return one database's RTO and RPO as ``achieved / target``, its worst gap and its control verdict."""
    c = r["checks"]
    rto, rpo = (
        f"{duration_or_na(c[k]['achieved_s'])} / {duration_or_na(c[k]['target_s'])}"
        for k in ("rto", "rpo_newest_verified")
    )
    control = "rejected" if (r["negative_control"] or {}).get("rejected") else "NOT rejected"
    return rto, rpo, duration_or_na(c["rpo_worst_gap"]["achieved_s"]), control


def pitr_rehearsal_failed(server: str, rpo_target_s: float, error: str) -> dict[str, Any]:
    """Return the drill's record of a server whose point-in-time recovery rehearsal did not finish.

    It has the fields of a finished rehearsal (nothing achieved, the RPO not met) and the ``error``,
    so that the report fails and says why, instead of leaving the server out and passing.
    """
    return {
        "server": server,
        "base_backup": None,
        "newest_heartbeat": None,
        "rpo": {"target_s": rpo_target_s, "achieved_s": None, "met": False},
        "recovery_seconds": None,
        "timings": {},
        "recovery": None,
        "error": error,
    }


def report_action_items(report: dict[str, Any]) -> list[str]:
    """Return every action item of a drill: the databases' and the point-in-time recoveries'."""
    items = [i for r in report["databases"] for i in r["action_items"]]
    items += [
        f"server {p['server']}: the point-in-time recovery rehearsal did not finish: {p['error']}"
        if p.get("error")
        else f"server {p['server']}: the point-in-time recovery lost {duration_or_na(p['rpo']['achieved_s'])} of "
        f"data, over the RPO of {duration_or_na(p['rpo']['target_s'])}: check the archiver (pg_stat_archiver) and "
        "archive_timeout, and that pgdr_health runs (it writes the heartbeats)"
        for p in report.get("pitr") or []
        if not p["rpo"]["met"]
    ]
    return items


def _copy_rows(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Return (database, copy target, check) for every second copy's proof in the report."""
    return [
        (r["database"], name.partition(".")[2], check)
        for r in report["databases"]
        for name, check in r["checks"].items()
        if name.startswith("copy_verified.")
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """Return the drill report as markdown."""
    lines = [
        f"# DR drill {report['drill_id']}: {report['status'].upper()}",
        "",
        f"Started {report['started_at']}, scenario `{report['scenario']}`, run `{report['run_id']}`.",
        "",
        "## Targets",
        "",
        "| database | result | RTO achieved / target | RPO newest verified / target | worst gap (30 days) | "
        "negative control |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["databases"]:
        lines.append("| " + " | ".join((r["database"], r["status"], *_measures(r))) + " |")
    if report.get("pitr"):
        lines += [
            "",
            "## Point-in-time recovery",
            "",
            "| server | RPO achieved / target | newest heartbeat recovered | recovery time | WAL replayed |",
            "| --- | --- | --- | --- | --- |",
        ]
        for p in report["pitr"]:
            if p.get("error"):
                lines.append(f"| {p['server']} | FAIL: the rehearsal did not finish: {p['error']} | none | n/a | n/a |")
                continue
            wal = (p.get("recovery") or {}).get("wal_bytes_replayed")
            lines.append(
                f"| {p['server']} | {duration_or_na(p['rpo']['achieved_s'])} / "
                f"{duration_or_na(p['rpo']['target_s'])} | {p['newest_heartbeat']} | "
                f"{duration_or_na(p['recovery_seconds'])} | {wal / 1e6:.1f} MB |"
                if wal is not None
                else f"| {p['server']} | {duration_or_na(p['rpo']['achieved_s'])} / "
                f"{duration_or_na(p['rpo']['target_s'])} | {p['newest_heartbeat']} | "
                f"{duration_or_na(p['recovery_seconds'])} | n/a |"
            )
    copy_rows = _copy_rows(report)
    if copy_rows:
        lines += [
            "",
            "## Second copies, proven by a restore from the copy",
            "",
            "| database | copy | result | last verified from the copy / limit | backup | restore time |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for database, target, check in copy_rows:
            lines.append(
                f"| {database} | {target} | {'pass' if check['met'] else 'fail'} | "
                f"{duration_or_na(check['achieved_s'])} ago / {duration_or_na(check['target_s'])} | "
                f"{check.get('backup_id') or 'none'} ({check.get('status') or 'never verified'}) | "
                f"{duration_or_na(check.get('restore_seconds'))} |"
            )
    lines += _mttr_lines(report)
    lines += ["", "## Timeline", ""]
    for r in report["databases"]:
        lines.append(f"### {r['database']} (backup `{r['backup_id']}`)")
        lines += [f"- {p['started_at']} {p['name']}: {p['seconds']:.1f}s" for p in r["phases"]]
        if r["validation"]:
            v = r["validation"]
            lines.append(f"- validation: {v['expectations'] - v['failed']} of {v['expectations']} expectations passed")
        lines += [f"- {line}" for line in restored_lines(r)]
        lines.append("")
    lines += ["## Action items", ""]
    items = report_action_items(report)
    lines += [f"- [ ] {i}" for i in items] or ["None: every target was met."]
    return "\n".join(lines) + "\n"


def trend_chart(history: list[dict[str, Any]], mttr_trend: list[dict[str, Any]] = ()) -> bytes:
    """Return a PNG of achieved RTO and RPO over past drills against their targets; when ``mttr_trend`` (the rows of
    :func:`mttr_rows`) has incidents, a panel of their MTTR beside the drills' RTO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pitr_points = [(datetime.fromisoformat(d["started_at"]), p) for d in history for p in d.get("pitr") or []]
    incidents = any(r["incident"] for r in mttr_trend)
    count = 2 + bool(pitr_points) + incidents
    fig, axes = plt.subplots(1, count, figsize=(5 * count, 3.4), dpi=100)
    databases = sorted({r["database"] for d in history for r in d["databases"]})
    panels = (("rto", "RTO achieved"), ("rpo_newest_verified", "RPO, newest verified"))
    if pitr_points:
        _pitr_panel(axes[2], pitr_points)
    if incidents:
        _mttr_panel(axes[-1], mttr_trend)
    for ax, (key, title) in zip(axes, panels, strict=False):
        series = []
        for db in databases:
            xs, ys, target = [], [], None
            for drill in history:
                for r in drill["databases"]:
                    if r["database"] == db and r["checks"][key]["achieved_s"] is not None:
                        xs.append(datetime.fromisoformat(drill["started_at"]))
                        ys.append(r["checks"][key]["achieved_s"])
                        target = r["checks"][key]["target_s"]
            if xs:
                series.append((db, xs, ys, target))
        duration_axis(ax, [v for _, _, ys, t in series for v in (*ys, t)])
        for db, xs, ys, target in series:
            line = ax.plot(xs, ys, marker="o", label=db)[0]
            ax.axhline(target, color=line.get_color(), linestyle="--", linewidth=1, label=f"{db} target")
        dates = [datetime.fromisoformat(d["started_at"]) for d in history]
        if dates:  # a sensible window even with a single drill
            ax.set_xlim(min(dates) - timedelta(days=20), max(dates) + timedelta(days=20))
        # e.g. no verified backup yet, so no RPO to plot: say so instead of an empty frame
        finish_panel(ax, title, "no measurement yet")
        fig.autofmt_xdate()
    return figure_png(fig)


def finish_panel(ax, title: str, empty: str) -> None:
    """Title a chart panel, add its legend, or say ``empty`` in it when nothing was plotted."""
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="grey")


def figure_png(fig) -> bytes:
    """The PNG of a finished figure (closed after)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def duration_axis(ax, seconds: list[float]) -> None:
    """Label a y axis of durations (in seconds) so that a 7-second value and a 30-minute target both read well.

    Values within a factor of 30 of each other share a linear axis; further apart, the axis is
    logarithmic. Either way the ticks read as durations (7s, 2m 30s, 1h 00m), never as bare numbers.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    values = [v for v in seconds if v is not None and v > 0]
    if values and max(values) / min(values) > 30:
        ax.set_yscale("log")
        low, high = min(values) / 2, max(values) * 2
        ax.set_ylim(low, high)
        marks = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400, 604800)
        ax.yaxis.set_major_locator(FixedLocator([m for m in marks if low <= m <= high]))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        top = max(values, default=60) * 1.15
        ax.set_ylim(0, top)
        steps = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400)
        step = next((st for st in steps if top / st <= 7), 86400 * 7)
        ax.yaxis.set_major_locator(FixedLocator([step * i for i in range(int(top // step) + 1)]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: duration_or_na(value) if value > 0 else "0"))


def mttr_rows(history: list[dict[str, Any]], incidents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the MTTR trend, oldest first: each incident's MTTR (declared to served) and each drill's rehearsed RTO
    per database (a drill's restore is an incident's restore without the time to act)."""
    rows = [
        {
            "when": i["declared_at"],
            "what": f"incident {printable(str(i['id'])[:120])}" if i.get("id") else "incident (no id)",
            "detail": printable(
                i["kind"] + (f" ({i['mode']})" if isinstance(i.get("mode"), str) else "") + f", {i['status']}"
            ),
            "subject": printable(i["subject"][:120]),
            "seconds": i.get("mttr_seconds"),
            "target_s": i.get("rto_target_seconds"),
            "data_loss_s": i.get("data_loss_window_seconds"),
            "incident": True,
        }
        for i in incidents
    ]
    rows += [
        {
            "when": d["started_at"],
            "what": f"drill {d['drill_id']}",
            "detail": f"rehearsal, {r['status']}",
            "subject": r["database"],
            "seconds": r["checks"]["rto"]["achieved_s"],
            "target_s": r["checks"]["rto"]["target_s"],
            "data_loss_s": None,
            "incident": False,
        }
        for d in history
        for r in d["databases"]
    ]
    return sorted(rows, key=lambda r: datetime.fromisoformat(r["when"]))


def mttr_summary(rows: list[dict[str, Any]]) -> str:
    """Return one sentence on the MTTR trend: incidents and drills, median and worst."""
    from pgdr.records import median

    def part(kind: str, mine: list[dict[str, Any]], measure: str) -> str:
        known = [r["seconds"] for r in mine if r["seconds"] is not None]
        if not mine:
            return f"no {kind}s"
        return (
            f"{len(mine)} {kind}{'s' if len(mine) != 1 else ''}, {measure} median {duration_or_na(median(known))}, "
            f"worst {duration_or_na(max(known, default=None))}"
        )

    incidents = [r for r in rows if r["incident"]]
    drills = [r for r in rows if not r["incident"]]
    return f"{part('incident', incidents, 'MTTR')}; {part('drill restore', drills, 'RTO')}."


def _mttr_panel(ax, rows: list[dict[str, Any]]) -> None:
    """Plot incidents' MTTR (crosses) and drills' rehearsed RTO (dots) per database or server, on a duration axis."""
    known = [r for r in rows if r["seconds"] is not None]
    duration_axis(ax, [r["seconds"] for r in known] + [r["target_s"] for r in known if r["target_s"]])
    for subject in sorted({r["subject"] for r in known}):
        drills = [r for r in known if r["subject"] == subject and not r["incident"]]
        incidents = [r for r in known if r["subject"] == subject and r["incident"]]
        color = None
        if drills:
            color = ax.plot(
                [datetime.fromisoformat(r["when"]) for r in drills],
                [r["seconds"] for r in drills],
                marker="o",
                label=f"{_no_mathtext(subject)} drills",
            )[0].get_color()
        if incidents:
            ax.plot(
                [datetime.fromisoformat(r["when"]) for r in incidents],
                [r["seconds"] for r in incidents],
                marker="x",
                markersize=9,
                linestyle="none",
                color=color,
                label=f"{_no_mathtext(subject)} incidents",
            )
    dates = [datetime.fromisoformat(r["when"]) for r in rows]
    ax.set_xlim(min(dates) - timedelta(days=20), max(dates) + timedelta(days=20))
    ax.set_title("MTTR: incidents (x) and drill restores (o)", fontsize=10)
    ax.tick_params(labelsize=8)
    if ax.lines:
        ax.legend(fontsize=7)


def _no_mathtext(text: str) -> str:
    """A name as matplotlib prints it literally (a ``$`` would start its math mode)."""
    return text.replace("$", r"\$")


def _mttr_lines(report: dict[str, Any]) -> list[str]:
    """The drill report's MTTR section in markdown: every incident and drill restore of the trend, oldest first."""
    rows = report.get("mttr_trend") or []
    lines = [
        "",
        "## MTTR: incidents and drills",
        "",
        mttr_summary(rows)
        + " An incident's MTTR runs from its declaration to the application served again (the restore report's "
        "Incident section); a drill's restore has no time to act.",
    ]
    if rows:
        lines += [
            "",
            "| when (UTC) | what | database or server | MTTR / rehearsed RTO | target | data-loss window |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['when'][:19].replace('T', ' ')} | {r['what']}: {r['detail']} | {r['subject']} | "
            f"{duration_or_na(r['seconds'])} | "
            f"{duration_or_na(r['target_s'])} | {duration_or_na(r['data_loss_s']) if r['incident'] else 'n/a'} |"
            for r in rows
        ]
    return lines


def _pitr_panel(ax, points) -> None:
    """Plot each server's achieved PITR RPO against its target, on a duration axis."""
    values = [p["rpo"]["achieved_s"] for _, p in points if p["rpo"]["achieved_s"] is not None] + [
        p["rpo"]["target_s"] for _, p in points
    ]
    duration_axis(ax, values)
    for server in sorted({p["server"] for _, p in points}):
        mine = [(when, p) for when, p in points if p["server"] == server and p["rpo"]["achieved_s"] is not None]
        if mine:
            line = ax.plot([w for w, _ in mine], [p["rpo"]["achieved_s"] for _, p in mine], marker="o", label=server)[0]
            ax.axhline(
                mine[-1][1]["rpo"]["target_s"],
                color=line.get_color(),
                linestyle="--",
                linewidth=1,
                label=f"{server} target",
            )
    dates = [w for w, _ in points]
    ax.set_xlim(min(dates) - timedelta(days=20), max(dates) + timedelta(days=20))
    ax.set_title("PITR RPO achieved", fontsize=10)
    ax.tick_params(labelsize=8)
    if ax.lines:
        ax.legend(fontsize=7)


def render_html(report: dict[str, Any], chart_png: bytes) -> str:
    """Return a self-contained HTML page of the drill report (the chart is embedded)."""
    e = html.escape
    ok = report["status"] == "pass"
    rows = []
    for r in report["databases"]:
        c = r["checks"]

        def cell(check):
            met = check["met"]
            return (
                f"<td class='{'ok' if met else 'bad'}'>{duration_or_na(check['achieved_s'])} <small>/ "
                f"{duration_or_na(check['target_s'])}</small></td>"
            )

        control = (r["negative_control"] or {}).get("rejected")
        rows.append(
            f"<tr><th>{e(r['database'])}</th><td "
            f"class='{'ok' if r['status'] == 'pass' else 'bad'}'>{r['status'].upper()}</td>"
            f"{cell(c['rto'])}{cell(c['rpo_newest_verified'])}{cell(c['rpo_worst_gap'])}"
            f"<td class='{'ok' if control else 'bad'}'>{'rejected' if control else 'NOT rejected'}</td></tr>"
        )
    timeline = []
    for r in report["databases"]:
        total = sum(p["seconds"] for p in r["phases"]) or 1
        bars = "".join(
            f"<div class='bar p-{e(p['name'])}' style='flex:{max(p['seconds'] / total, 0.02):.3f}' "
            f"title='{e(p['name'])} {p['seconds']:.1f}s from "
            f"{e(p['started_at'])}'>{e(p['name'])}<br>{p['seconds']:.1f}s</div>"
            for p in r["phases"]
        )
        steps = "".join(
            f"<li><code>{e(p['started_at'][11:19])}</code> {e(p['name'])}: {p['seconds']:.1f}s</li>"
            for p in r["phases"]
        )
        v = r["validation"] or {}
        validation = (
            f"<p>Validation: {v.get('expectations', 0) - v.get('failed', 0)} of {v.get('expectations', 0)} "
            "expectations passed.</p>"
            if v
            else ""
        )
        restored = "".join(f"<p>{e(line)}</p>" for line in restored_lines(r))
        timeline.append(
            f"<h3>{e(r['database'])} <small>backup {e(r['backup_id'] or 'none')}</small></h3><div "
            f"class='timeline'>{bars}</div><ul class='steps'>{steps}</ul>{validation}{restored}"
        )
    items = report_action_items(report)
    actions = "".join(f"<li>{e(i)}</li>" for i in items) or "<li>None: every target was met.</li>"
    pitr_rows = "".join(
        f"<tr><th>{e(p['server'])}</th><td "
        f"class='{'ok' if p['rpo']['met'] else 'bad'}'>{duration_or_na(p['rpo']['achieved_s'])} <small>/ "
        f"{duration_or_na(p['rpo']['target_s'])}</small></td>"
        f"<td>{e(p.get('error') or p['newest_heartbeat'] or 'none')}</td>"
        f"<td>{duration_or_na(p['recovery_seconds'])}</td></tr>"
        for p in report.get("pitr") or []
    )
    pitr_table = (
        (
            "<h2>Point-in-time recovery</h2><p>Each server recovered to the end of its WAL archive in a scratch "
            "cluster; the RPO achieved is the drill's start minus the newest heartbeat "
            "recovered.</p><table><thead><tr><th>Server</th><th>RPO achieved / target</th><th>Newest heartbeat "
            f"recovered</th><th>Recovery time</th></tr></thead><tbody>{pitr_rows}</tbody></table>"
        )
        if pitr_rows
        else ""
    )
    copy_rows = "".join(
        f"<tr><th>{e(database)}</th><td>{e(target)}</td><td class='{'ok' if check['met'] else 'bad'}'>"
        f"{duration_or_na(check['achieved_s'])} ago <small>/ {duration_or_na(check['target_s'])}</small></td>"
        f"<td>{e(check.get('backup_id') or 'none')} <small>{e(check.get('status') or 'never verified')}</small></td>"
        f"<td>{duration_or_na(check.get('restore_seconds'))}</td></tr>"
        for database, target, check in _copy_rows(report)
    )
    copy_table = (
        "<h2>Second copies, proven by a restore from the copy</h2><table><thead><tr><th>Database</th><th>Copy</th>"
        "<th>Last verified from the copy / limit</th><th>Backup</th><th>Restore time</th></tr></thead>"
        f"<tbody>{copy_rows}</tbody></table>"
        if copy_rows
        else ""
    )
    trend = report.get("mttr_trend") or []
    mttr_rows_html = "".join(
        f"<tr><td>{e(r['when'][:19].replace('T', ' '))}</td><th>{e(r['what'])} <small>{e(r['detail'])}</small></th>"
        f"<td>{e(r['subject'])}</td><td class='{_met_class(r)}'>{duration_or_na(r['seconds'])} <small>/ "
        f"{duration_or_na(r['target_s'])}</small></td>"
        f"<td>{duration_or_na(r['data_loss_s']) if r['incident'] else 'n/a'}</td></tr>"
        for r in trend
    )
    mttr_table = (
        f"<h2>MTTR: incidents and drills</h2><p>{e(mttr_summary(trend))}</p><table><thead><tr><th>When (UTC)</th>"
        "<th>What</th><th>Database or server</th><th>MTTR or rehearsed RTO / target</th><th>Data-loss window</th>"
        f"</tr></thead><tbody>{mttr_rows_html}</tbody></table>"
        if trend
        else ""
    )
    chart = base64.b64encode(chart_png).decode()
    verdict = "All targets met" if ok else "Targets missed or checks failed: see the action items"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pgdr DR drill {e(report["drill_id"])}</title>
<style>
{REPORT_CSS}
.timeline {{ display: flex; gap: 2px; margin: .5rem 0; font-size: .75rem; }}
.bar {{ background: #dbe6ff; padding: .3rem; border-radius: 3px; overflow: hidden; white-space: nowrap; }}
.p-restore {{ background: #c8dafc; }} .p-validation {{ background: #e6dcfb; }} .p-checks {{ background: #d7f0e0; }}
.steps {{ font-size: .85rem; color: #3a4356; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>DR drill {e(report["drill_id"])}</h1>
<p class="sub">Started {e(report["started_at"])} · scenario {e(report["scenario"])} · run {e(report["run_id"])}</p>
<p class="verdict {"ok" if ok else "bad"}">{verdict}</p>
<h2>Targets against achieved</h2>
<table><thead><tr><th>Database</th><th>Result</th><th>RTO achieved / target</th><th>RPO: newest verified / target</th>
<th>Worst gap, 30 days / RPO</th><th>Negative control</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
{pitr_table}
{copy_table}
{mttr_table}
<h2>Action items</h2><ul>{actions}</ul>
<h2>Trend</h2><img alt="RTO and RPO over past drills against their targets" src="data:image/png;base64,{chart}">
<h2>Timeline</h2>{"".join(timeline)}
<p><small>Generated by pgdr. The JSON document next to this page has every number.</small></p>
</body></html>
"""


# The look of pgdr's HTML reports (the drill's, the evidence pack's): one page, readable printed.
REPORT_CSS = """body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #1d2330; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } .sub { color: #5a6478; margin-top: 0; }
.verdict { display: inline-block; padding: .5rem 1rem; border-radius: 6px; font-weight: 600; }
.ok { background: #e3f6e8; color: #13612e; } .bad { background: #fde7e7; color: #8a1111; }
table { border-collapse: collapse; margin: 1rem 0; width: 100%; }
th, td { padding: .45rem .7rem; border-bottom: 1px solid #e3e6ec; text-align: left; }
thead th { font-size: .85rem; color: #5a6478; } small { color: #5a6478; }"""


def _met_class(row: dict[str, Any]) -> str:
    """``ok``, ``bad`` or nothing: an MTTR (or a rehearsed RTO) against its RTO target, when both are known."""
    if row["seconds"] is None or not row["target_s"]:
        return ""
    return "ok" if row["seconds"] <= row["target_s"] else "bad"


def report_json(report: dict[str, Any]) -> bytes:
    """Return the drill report as JSON (every number, for other tools)."""
    return json.dumps(report, indent=2, default=str).encode()


# -- the phases ---------------------------------------------------------------------------------------


def negative_control(manifest, store, data_key: bytes | None, workdir) -> dict[str, Any]:
    """Corrupt a private copy of one backup file; verification must reject it.

    For an encrypted backup a second control forges the checksum too (as someone who can write to
    the bucket, but holds no key, could): AES-GCM authentication alone must then reject the copy.
    """
    import hashlib
    import logging
    from dataclasses import replace

    from pgdr.errors import ChecksumMismatch
    from pgdr.logical.restore import verify_checksums
    from pgdr.storage.backends import LocalFolderStore

    log = logging.getLogger(__name__)
    victim = control_file(manifest.files)
    private = LocalFolderStore(workdir / "private-copy")
    data = bytearray(store.get_bytes(victim.key))
    data[len(data) // 2] ^= 0x01  # one flipped bit
    private.put_bytes(victim.key, bytes(data))
    controls = [("a flipped bit", victim)]
    if data_key is not None:
        controls.append(
            ("a flipped bit with its checksum forged", replace(victim, sha256=hashlib.sha256(data).hexdigest()))
        )
    messages = []
    for what, entry in controls:
        try:
            verify_checksums(replace(manifest, files=(entry,)), private, workers=1, data_key=data_key)
        except ChecksumMismatch as err:
            log.info(
                "Negative control (%s): the corrupted copy of %s was rejected, as it must be: %s",
                what,
                victim.name,
                err,
            )
            found = "; ".join(p.problem for p in getattr(err, "problems", [])) or str(err)
            messages.append(f"{what}: rejected, {found[:300]}")
            continue
        log.error("Negative control FAILED: a corrupted copy of %s (%s) passed verification.", victim.name, what)
        return {
            "rejected": False,
            "file": victim.name,
            "message": f"a corrupted copy ({what}) passed verification",
            "encrypted": data_key is not None,
        }
    return {"rejected": True, "file": victim.name, "message": " | ".join(messages), "encrypted": data_key is not None}


def pitr_rehearsal(
    server,
    base_backup: str,
    start: datetime,
    recovered: list[datetime],
    recovery_seconds: float,
    timings: dict[str, float],
    recovery: dict[str, Any],
) -> dict[str, Any]:
    """Return the drill's record of a point-in-time recovery rehearsal of ``server`` to the end of its archive.

    The RPO achieved is the drill's ``start`` minus the newest heartbeat the recovery brought back.
    """
    newest = max((at for at in recovered if at <= start), default=None)
    rpo_s = (start - newest).total_seconds() if newest else None
    target = server.pitr.rpo.total_seconds()
    return {
        "server": server.name,
        "base_backup": base_backup,
        "newest_heartbeat": newest.isoformat() if newest else None,
        "rpo": {"target_s": target, "achieved_s": rpo_s, "met": rpo_s is not None and rpo_s <= target},
        "recovery_seconds": round(recovery_seconds, 2),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "recovery": recovery,
    }


def unfinished_rehearsals(servers, pitr: list[dict[str, Any]], errors: dict[str, str]) -> list[dict[str, Any]]:
    """Return a failed record for each of ``servers`` whose rehearsal returned nothing, with its error.

    :param errors: the failed ``rehearse_pitr`` tasks' errors, by ``server <name>`` (or the name).
    """
    done = {p["server"] for p in pitr}
    return [
        pitr_rehearsal_failed(
            server.name,
            server.pitr.rpo.total_seconds(),
            errors.get(f"server {server.name}")
            or errors.get(server.name)
            or "the rehearse_pitr task failed; its alert and log say why",
        )
        for server in servers
        if server.name not in done
    ]


def drill_report(
    drill_id: str,
    run_id: str,
    scenario: str,
    started_at: datetime,
    finished_at: str,
    results: list[dict[str, Any]],
    pitr: list[dict[str, Any]],
    incidents: list[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Return the drill's report: it passes when every database and every PITR rehearsal met its targets.

    :param incidents: the records of the year's incident restores and server recoveries
        (:func:`pgdr.incident_review.incident_records`), for the MTTR trend.
    """
    passed = bool(results) and all(r["status"] == "pass" for r in results) and all(p["rpo"]["met"] for p in pitr)
    return {
        "drill_id": drill_id,
        "run_id": run_id,
        "scenario": scenario,
        "started_at": started_at.isoformat(),
        "finished_at": finished_at,
        "status": "pass" if passed else "fail",
        "databases": results,
        "pitr": pitr,
        "incidents": list(incidents),
    }


def drill_id_of(started_at: datetime, run_id: str) -> str:
    """Return a drill's id: its start, then the end of its run id (two drills of one second differ)."""
    import re

    return started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + re.sub(r"[^A-Za-z0-9]+", "", run_id)[-6:]


def store_report(report: dict[str, Any], store, layout) -> tuple[str, str]:
    """Store the report as JSON, markdown and HTML with the trend chart of every past drill; return (location, HTML)."""
    import logging

    history = []
    for obj in store.list(layout.report_key("drills") + "/"):
        if obj.key.endswith("/drill.json"):
            try:
                history.append(json.loads(store.get_bytes(obj.key)))
            except ValueError:
                logging.getLogger(__name__).warning("Skipping an unreadable past drill report %s", obj.key)
    history = sorted(
        [h for h in history if h.get("drill_id") != report["drill_id"]] + [report], key=lambda h: h["started_at"]
    )
    report["mttr_trend"] = mttr_rows(history, report.get("incidents") or [])
    chart = trend_chart(history, report["mttr_trend"])
    keys = {
        name: layout.report_key("drills", report["drill_id"], name)
        for name in ("drill.json", "drill.md", "drill.html", "trend.png")
    }
    page = render_html(report, chart)
    store.put_bytes(keys["drill.json"], report_json(report))
    store.put_bytes(keys["drill.md"], render_markdown(report).encode())
    store.put_bytes(keys["drill.html"], page.encode())
    store.put_bytes(keys["trend.png"], chart)
    return store.describe(keys["drill.html"]), page


def broken_parts(report: dict[str, Any]) -> list[str]:
    """Return what failed its drill outright (a phase, the negative control, a PITR rehearsal that did not finish)."""
    broken = [
        r["database"]
        for r in report["databases"]
        if r["failed_phase"] or not (r["negative_control"] or {}).get("rejected")
    ]
    return broken + [f"server {p['server']}" for p in report["pitr"] if p.get("error")]


class PhaseClock:
    """Times a drill's phases as they run (``with clock("restore"): ...``); ``phases`` lists those that finished."""

    def __init__(self):
        self.phases: list[dict[str, Any]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = datetime.now(UTC).isoformat()
        yield
        self.phases.append(phase(name, started, datetime.now(UTC).isoformat()))


def restore_timed(db, manifest, store, data_key: bytes | None, restore_into, workdir: Path) -> dict[str, Any]:
    """Check the stored files, download and restore them into the drill's scratch database, each phase timed.

    :param restore_into: restores a downloaded dump folder into the scratch database; returns its
        :class:`pgdr.logical.restore.ScratchRestore`.
    """
    from pgdr.logical.restore import download_backup, verify_checksums

    clock, workers = PhaseClock(), max(2, db.dump_jobs)
    with clock("checksum"):
        verify_checksums(manifest, store, workers, data_key=data_key)
    with clock("download"):
        download_backup(manifest, store, workdir / "dump", workers, data_key=data_key)
    with clock("restore"):
        outcome = restore_into(workdir / "dump", workdir)
    return {"phases": clock.phases, "restored": outcome.objects()}


def check_timed(db, manifest, store, data_key: bytes | None, scratch, workdir) -> dict[str, Any]:
    """Integrity checks, validation and owners and grants of the drill's scratch restore, each phase timed.

    :param workdir: makes a private work directory for a label.
    """
    from pgdr.checks.integrity import check_integrity
    from pgdr.checks.validation import failure_error, validate_restored
    from pgdr.logical.restore import give_back_privileges

    clock = PhaseClock()
    with clock("checks"), workdir(f"drill-checks-{db.name}") as folder:
        check_integrity(scratch.endpoint, manifest, folder, db.dump_jobs, admin=scratch.server)
    with clock("validation"):
        report = validate_restored(scratch.endpoint, manifest)
    if not report.ok:
        raise failure_error(report, manifest, "the drill report")
    with clock("privileges"), workdir(f"drill-privileges-{db.name}") as folder:
        admin = scratch.server.with_dbname(scratch.name)
        applied = give_back_privileges(manifest, store, admin, folder, data_key, scratch=True, skip=db.skip_objects)
    return {"phases": clock.phases, "validation": report.summary(), "privileges": applied.to_dict()}


def rehearse_pitr(server, endpoint, catalog, store, archive, run, start: datetime) -> dict[str, Any]:
    """Recover ``server``'s newest chain to the end of its archive ("latest") in a scratch cluster; return the RPO
    achieved (the drill's ``start`` minus the newest heartbeat recovered).

    :param endpoint: the live server (a heartbeat is written there first); :param run: the task try.
    """
    import logging
    import time

    from pgdr.errors import BackupNotFound
    from pgdr.physical.heartbeat import heartbeats, write_heartbeat

    began = time.monotonic()
    write_heartbeat(endpoint, f"pgdr_drill {run.run_id} (drill start)")
    entries = [e for e in catalog.backups() if e.status != "failed"]
    if not entries:
        raise BackupNotFound(
            f"Server {server.name!r} has no base backup to rehearse a point-in-time recovery from: trigger "
            "pgdr_basebackup."
        )
    purpose = f"drill: recovery of server {server.name} to the end of its archive"
    cluster, prepared, result = run.recover(
        server.name, purpose, catalog, entries[-1], store, archive, None, endpoint.user
    )
    try:
        recovered = heartbeats(cluster.endpoint())
    finally:
        cluster.destroy()
    rehearsal = pitr_rehearsal(
        server, entries[-1].backup_id, start, recovered, time.monotonic() - began, prepared.timings, result.to_dict()
    )
    logging.getLogger(__name__).info(
        "PITR rehearsal of %s: newest heartbeat recovered %s, achieved RPO %s s (target %s s).",
        server.name,
        rehearsal["newest_heartbeat"],
        rehearsal["rpo"]["achieved_s"],
        rehearsal["rpo"]["target_s"],
    )
    return rehearsal


def measure(
    db, res, backups: list[BackupEntry], values: dict[str, Any], order: tuple[str, ...], started_at: datetime
) -> dict[str, Any]:
    """Return one database's drill result from what its phase tasks returned (``None``: did not succeed).

    :param backups: the complete backups where the rehearsal read them (the RPO is measured from them).
    :param order: the phase tasks in order: the first without a result is the failed phase.
    """
    failed_phase = next((n for n in order if not values[n]), None)
    phases = [p for n in order if values[n] for p in values[n].get("phases", [])]
    rpo = rpo_metrics([b for b in backups if b.recovery_point <= started_at], started_at)
    copies = copy_proofs(db, res, started_at) if db.copies else None
    return evaluate(
        db.name,
        db.rto.total_seconds(),
        db.rpo.total_seconds(),
        phases,
        rpo,
        values["negative_control"],
        failed_phase,
        (values["check_timed"] or {}).get("validation"),
        (values["rehearse_backup"] or {}).get("backup_id"),
        copies,
        (values["restore_timed"] or {}).get("restored"),
    )
