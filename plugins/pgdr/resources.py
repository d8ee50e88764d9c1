"""What the domain needs of a deployment, by the plan's names: servers, storage, the WAL archive, keys.

The rules of pgdr (which backup, what is healthy, how a restore is planned) take a
:class:`Resources` and never read credentials themselves. In a DAG it is
:class:`pgdr.airflow_glue.connections.AirflowResources` (Airflow connections, read inside tasks);
a unit test may give its own. This keeps the domain free of ``airflow_glue`` at every level.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pgdr.physical.archive import WalArchive
    from pgdr.plan import DRPlan, ProtectedDatabase, ProtectedServer, StorageTarget
    from pgdr.postgres.client import PgEndpoint
    from pgdr.storage.backends import BackupStore
    from pgdr.storage.encryption import MasterKeys
    from pgdr.storage.layout import BackupLayout, PhysicalLayout


class Resources(Protocol):
    """The deployment's side of a DR plan."""

    plan: DRPlan

    def database(self, db: ProtectedDatabase, conn_id: str | None = None) -> PgEndpoint:
        """The server of ``db`` (or the plan's server ``conn_id``), logged in as its connection says, on ``db``."""

    def restorer(self, db: ProtectedDatabase, server: PgEndpoint) -> PgEndpoint:
        """``server`` as the non-superuser role ``db`` is restored as."""

    def server(self, server: ProtectedServer, conn_id: str | None = None) -> PgEndpoint:
        """A PITR server of the plan, as its connection (or ``conn_id``, its standby's) says."""

    def store(self, target: StorageTarget, pruning: bool = False) -> tuple[BackupStore, BackupLayout]:
        """A storage target of the plan, opened (``pruning``: with its pruner's credentials, the only ones that
        delete)."""

    def archive(
        self, server: ProtectedServer, target: StorageTarget | None = None, pruning: bool = False
    ) -> tuple[BackupStore, PhysicalLayout, WalArchive]:
        """The storage, layout and WAL archive of a PITR server (in ``target``, one of its copies, when given;
        ``pruning``: with the pruner's credentials)."""

    def data_key(self, db: ProtectedDatabase, manifest: Any, catalog: Any = None) -> bytes | None:
        """The key that opens an encrypted backup of ``db`` (``None``: not encrypted)."""

    def encryption_keys(self, db: ProtectedDatabase) -> MasterKeys | None:
        """The master keys new backups of ``db`` are encrypted under (``None``: not encrypted)."""


class TaskRun(Protocol):
    """What the domain needs of the task try it runs in: a run id, private work directories, a scratch cluster.

    In a DAG it is :class:`pgdr.airflow_glue.task_run.AirflowTaskRun`.
    """

    run_id: str

    def workdir(self, label: str) -> AbstractContextManager[Path]:
        """A private work directory for this try, removed whatever happens."""

    def info(self) -> dict[str, Any]:
        """What a record keeps of the run (DAG, run, task, try, logical date)."""

    def recover(self, key: str, purpose: str, catalog, entry, store, archive, target, login: str):
        """Recover ``entry``'s chain in this run's scratch cluster for ``key``: ``(cluster, prepared, result)``."""
