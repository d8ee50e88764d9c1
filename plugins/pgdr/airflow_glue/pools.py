"""Airflow pools from the DR plan: one per source server, so a fleet never overloads a server.

Every database names the ``server`` it lives on (by default its connection id). ``back_up``
tasks of one server run in the pool ``pgdr_<server>`` whose size is the plan's
``backup.max_dumps_per_server``: fifty databases on one server never run more dumps at once than
that, while databases on other servers proceed in parallel on other workers.

Pools must exist before the scheduler can run tasks in them. ``python -m pgdr.airflow_glue.pools`` writes
them as JSON for ``airflow pools import`` (docker-compose's ``airflow-init`` does this); re-run
it after adding a server to the plan.
"""

from __future__ import annotations

import argparse
import json
import sys

from pgdr.plan import DRPlan, load_plan


def pool_name(server: str) -> str:
    """Return the Airflow pool of a source server."""
    return f"pgdr_{server}"


def databases_by_server(plan: DRPlan) -> dict[str, list[str]]:
    """Group the plan's databases by source server, in plan order."""
    groups: dict[str, list[str]] = {}
    for db in plan.databases:
        groups.setdefault(db.server, []).append(db.name)
    return groups


def required_pools(plan: DRPlan) -> dict[str, dict]:
    """Return the pools the plan needs, in ``airflow pools import`` format."""
    return {
        pool_name(server): {
            "slots": plan.max_dumps_per_server,
            "description": f"pgdr: at most {plan.max_dumps_per_server} dumps at once against server {server} "
            f"({', '.join(names)})",
            "include_deferred": False,
        }
        for server, names in databases_by_server(plan).items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", "-o", help="write the JSON here instead of standard output")
    args = parser.parse_args(argv)
    text = json.dumps(required_pools(load_plan()), indent=2)
    if args.output:
        with open(args.output, "w") as out:
            out.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
