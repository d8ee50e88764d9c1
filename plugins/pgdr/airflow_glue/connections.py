"""From Airflow connections to the things pgdr talks to: database endpoints and storage targets.

Credentials live only in Airflow connections (an ``AIRFLOW_CONN_<ID>`` variable, the metadata
database or a secrets backend). These functions are the single place that reads them, inside
tasks, never at parse time.
"""

from __future__ import annotations

import sys

from pgdr.errors import ConnectionNotDefined, PlanError
from pgdr.plan import DRPlan, ProtectedDatabase, ProtectedServer, StorageTarget
from pgdr.postgres.client import PgEndpoint
from pgdr.storage.backends import BackupStore, LocalFolderStore, S3Store
from pgdr.storage.layout import BackupLayout


def get_connection(conn_id: str, purpose: str, plan: DRPlan | None = None):
    """Return the Airflow connection ``conn_id``, or explain how to define it."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        where = f" named in the DR plan {plan.path}" if plan else ""
        raise ConnectionNotDefined(
            f"The Airflow connection {conn_id!r}{where} ({purpose}) is not defined. Create it in the Airflow UI "
            f"(Admin > Connections), or set AIRFLOW_CONN_{conn_id.upper()} on the workers, or fix the connection id "
            "in the plan."
        ) from None


def connection_exists(conn_id: str | None) -> bool:
    """Say whether the Airflow connection ``conn_id`` is defined (``None`` is not)."""
    if not conn_id:
        return False
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return False
    return True


def database_endpoint(db: ProtectedDatabase, plan: DRPlan | None = None, conn_id: str | None = None) -> PgEndpoint:
    """Return the endpoint of ``db`` from its Airflow connection (or ``conn_id`` on another server)."""
    conn_id = conn_id or db.conn_id
    conn = get_connection(conn_id, f"PostgreSQL server of database {db.name!r}", plan)
    extra = conn.extra_dejson or {}
    return PgEndpoint(
        host=conn.host or "localhost",
        port=int(conn.port or 5432),
        user=conn.login or "postgres",
        password=conn.password or None,
        dbname=db.dbname,
        sslmode=extra.get("sslmode"),
        conn_id=conn_id,
    )


def open_store(
    target: StorageTarget, plan: DRPlan | None = None, pruning: bool = False
) -> tuple[BackupStore, BackupLayout]:
    """Return the store and key layout of a storage target; ``pruning``: with the pruner's connection
    (``prune_conn_id``, when the target has one), for the retention tasks, the only ones that delete."""
    if target.kind == "local":
        return LocalFolderStore(target.path), BackupLayout()
    conn_id = target.prune_conn_id if pruning and target.prune_conn_id else target.aws_conn_id
    get_connection(conn_id, f"S3 storage target {target.name!r}" + (" (its pruner)" if pruning else ""), plan)
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from botocore.config import Config

    # Short connect timeouts and a bounded number of attempts: an unreachable endpoint should
    # fail the try within a minute and leave the waiting to Airflow's retries with backoff.
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=16,
    )
    client = s3_client(S3Hook(aws_conn_id=conn_id, config=config))
    store = S3Store(client, target.bucket, target.sse, target.kms_key_id, object_lock=target.object_lock)
    return store, BackupLayout(prefix=target.prefix)


def s3_client(hook):
    """Return the S3 client of ``hook`` (an ``S3Hook``): its session, endpoint, botocore config and TLS setting, as
    ``hook.get_conn()`` makes it, without two costs of that.

    ``get_conn()`` names the caller in the client's user agent by walking ``inspect.stack()``, which reads the source of
    every frame: measured in the Celery fleet, that walk was 39 % of each task process's CPU (about 0.3 s a task), and
    parsing botocore's endpoint and S3 model files again for every new session another 15 %. So the user agent says
    ``pgdr/<version>`` instead (the provider's own ``S3Hook.resource`` skips the walk too), and the sessions of one
    process share one botocore data loader, whose files a Celery worker has parsed before it forks
    (:mod:`pgdr.airflow_glue.preload`)."""
    from botocore.config import Config

    from pgdr import __version__

    session = hook.get_session(region_name=hook.region_name)
    _share_data_loader(session)
    config = hook.config
    agent = " ".join(part for part in (config.user_agent_extra, f"pgdr/{__version__}") if part)
    return session.client(
        "s3",
        endpoint_url=hook.conn_config.get_service_endpoint_url(service_name="s3"),
        config=config.merge(Config(user_agent_extra=agent)),
        verify=hook.verify,
    )


_DATA_LOADERS: dict = {}  # botocore data path -> the loader this process's sessions share


def _share_data_loader(session) -> None:
    """Give ``session`` (boto3) the botocore data loader that the process's earlier sessions used, or the one the
    Celery worker's preload filled; a session of another data path (``AWS_DATA_PATH``, a profile) keeps its own."""
    botocore_session = getattr(session, "_session", None)
    if botocore_session is None:  # not a boto3 session: nothing to share
        return
    data_path = botocore_session.get_config_variable("data_path")
    loader = _DATA_LOADERS.get(data_path)
    if loader is None:
        preload = sys.modules.get("pgdr.airflow_glue.preload")
        loader = getattr(preload, "BOTOCORE_LOADERS", {}).get(data_path)
    if loader is None:
        _DATA_LOADERS[data_path] = botocore_session.get_component("data_loader")
        return
    _DATA_LOADERS[data_path] = loader
    botocore_session.register_component("data_loader", loader)


def restore_endpoint(db: ProtectedDatabase, plan: DRPlan | None, server: PgEndpoint) -> PgEndpoint:
    """Return how pgdr restores into, and reads, restored copies on ``server``: as the restore role.

    A restored dump is code written by whoever owned a schema in the source: CHECK constraints,
    defaults and index expressions call its functions while the data loads and while checks read
    it. So ``pg_restore`` and every check of a restored copy log in as the role of the plan's
    ``restore_conn_id``, which has no superuser and owns the copy. Only server-level steps (create,
    drop or rename a database, end sessions) use the server's own connection: they run no restored
    code. The role must exist, with that login and password, on every server pgdr restores to.
    """
    if db.restore_as_superuser:
        return server
    if not db.restore_conn_id:
        where = f" {plan.path}" if plan else ""
        raise PlanError(
            f"Database {db.name!r} has no restore_conn_id in the DR plan{where}. pgdr restores only as a role "
            "without superuser, because a restored dump runs code written by whoever owned a schema. Create the "
            "role on every server pgdr restores to (CREATE ROLE pgdr_restore LOGIN CREATEDB PASSWORD '...'), an "
            "Airflow connection with its login and password, and set 'restore_conn_id: <that connection>' under "
            "defaults (README, Security model). 'restore_as_superuser: true' is the explicit, unsafe alternative."
        )
    conn = get_connection(db.restore_conn_id, f"restore role of database {db.name!r}", plan)
    if not conn.login:
        raise PlanError(
            f"The Airflow connection {db.restore_conn_id!r} (restore role) has no login: set the role's name."
        )
    return PgEndpoint(
        host=server.host,
        port=server.port,
        user=conn.login,
        password=conn.password or None,
        dbname=server.dbname,
        sslmode=server.sslmode,
        conn_id=db.restore_conn_id,
    )


def server_endpoint(server: ProtectedServer, plan: DRPlan | None = None, conn_id: str | None = None) -> PgEndpoint:
    """Return the endpoint of a PITR server's own connection (base backups, heartbeats, archiver state), or of
    ``conn_id`` (its standby)."""
    conn_id = conn_id or server.conn_id
    role = "point-in-time recovery" if conn_id == server.conn_id else "its standby, source_conn_id"
    conn = get_connection(conn_id, f"PostgreSQL server {server.name!r} ({role})", plan)
    extra = conn.extra_dejson or {}
    return PgEndpoint(
        host=conn.host or "localhost",
        port=int(conn.port or 5432),
        user=conn.login or "postgres",
        password=conn.password or None,
        dbname="postgres",
        sslmode=extra.get("sslmode"),
        conn_id=conn_id,
    )


def open_archive(
    server: ProtectedServer, plan: DRPlan | None = None, target: StorageTarget | None = None, pruning: bool = False
):
    """Return ``(store, layout, archive)`` of a PITR server: its S3 target (or ``target``, one of its copies) and WAL
    archive, with the endpoint and credentials of the target's AWS connection (for barman-cloud's environment);
    ``pruning``: the store with the pruner's connection (:func:`open_store`)."""
    from pgdr.physical.archive import ArchiveAccess, WalArchive
    from pgdr.storage.layout import PhysicalLayout

    target = target or server.pitr.storage
    store, _ = open_store(target, plan, pruning)
    conn = get_connection(target.aws_conn_id, f"S3 storage target {target.name!r}", plan)
    extra = conn.extra_dejson or {}
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    frozen = S3Hook(aws_conn_id=target.aws_conn_id).get_credentials()  # resolved: connection, role or environment
    access = ArchiveAccess(
        endpoint_url=extra.get("endpoint_url")
        or (extra.get("service_config", {}).get("s3", {}) or {}).get("endpoint_url"),
        region=extra.get("region_name") or store.client.meta.region_name,
        access_key=frozen.access_key if frozen else None,
        secret_key=frozen.secret_key if frozen else None,
        session_token=frozen.token if frozen else None,
    )
    layout = PhysicalLayout(prefix=target.prefix)
    return (
        store,
        layout,
        WalArchive(
            target.bucket, layout, server.name, access, target.sse, target.kms_key_id, server.pitr.wal_compression
        ),
    )


def master_keys(conn_id: str, purpose: str, plan: DRPlan | None = None):
    """Return the master keys (:class:`pgdr.storage.encryption.MasterKeys`) held by ``conn_id``.

    The connection's login is the current key id, its password the key (base64), and its extra
    ``{"previous_keys": {"<old id>": "<base64>"}}`` the keys older backups still need. Each key
    is registered with Airflow's secrets masker before anything else happens with it.
    """
    from airflow.sdk.log import mask_secret

    from pgdr.storage.encryption import master_keys_from

    conn = get_connection(conn_id, purpose, plan)
    extra = conn.extra_dejson or {}
    for value in [
        conn.password,
        *((extra.get("previous_keys") or {}).values() if isinstance(extra.get("previous_keys"), dict) else []),
    ]:
        if isinstance(value, str) and value:
            mask_secret(value)
    return master_keys_from(conn.login, conn.password, extra, f"Airflow connection {conn_id!r}")


def backup_data_key(db: ProtectedDatabase, manifest, plan: DRPlan | None = None, catalog=None) -> bytes | None:
    """Return the data key of an encrypted backup (its manifest's HMAC checked), or ``None`` for a
    backup stored unencrypted.

    The master keys come from the plan's ``encryption.key_conn_id`` of the database, or, when the
    plan no longer encrypts it, from the connection the manifest names. With ``catalog``, an
    unencrypted backup of a database the plan encrypts is refused when it is newer than the
    database's first encrypted backup: pgdr wrote none such, so someone without the key did.

    :raises KeyUnavailable: naming the key id the backup needs and where to put it.
    :raises TamperDetected: for such an unencrypted newcomer.
    """
    from pgdr.errors import ConnectionNotDefined
    from pgdr.storage.encryption import KeyUnavailable, TamperDetected, unlock_backup

    record = manifest.encryption
    if record is None:
        if db.encryption_key_conn_id and catalog is not None:
            encrypted = [e for e in catalog.backups() if e.manifest.encryption is not None]
            if encrypted and manifest.recovery_point > encrypted[0].recovery_point:
                raise TamperDetected(
                    f"Backup {manifest.backup_id} of database {db.name!r} is not encrypted, but the plan encrypts "
                    f"this database and its backups have been encrypted since {encrypted[0].backup_id}: pgdr did "
                    "not write this one. It was not used. Find out who wrote it to the storage; restore an "
                    "encrypted backup."
                )
        return None
    conn_id = db.encryption_key_conn_id or record.key_conn_id
    try:
        keys = master_keys(conn_id, f"master keys of database {db.name!r}", plan)
    except ConnectionNotDefined as err:
        raise KeyUnavailable(
            f"Backup {manifest.backup_id} of database {db.name!r} is encrypted with master key id "
            f"{record.key_id!r}, and the connection that should hold it is not defined: {err} Nothing was restored "
            "or created."
        ) from None
    return unlock_backup(manifest, keys)


def encryption_keys(db: ProtectedDatabase, plan: DRPlan | None = None):
    """Return the master keys new backups of ``db`` are encrypted under, or ``None`` when the plan
    does not encrypt them."""
    if not db.encryption_key_conn_id:
        return None
    return master_keys(db.encryption_key_conn_id, f"master keys encrypting the backups of database {db.name!r}", plan)


class AirflowResources:
    """:class:`pgdr.resources.Resources` from Airflow connections: what a task hands the domain."""

    def __init__(self, plan: DRPlan):
        self.plan = plan
        # Opening an S3 target asks Airflow for its connection and builds a boto3 client: tenths of a second, paid
        # once per task, not once per database (find_backups reads the catalog of every database of the plan).
        self._stores: dict[tuple[StorageTarget, bool], tuple[BackupStore, BackupLayout]] = {}

    def database(self, db: ProtectedDatabase, conn_id: str | None = None) -> PgEndpoint:
        return database_endpoint(db, self.plan, conn_id=conn_id)

    def restorer(self, db: ProtectedDatabase, server: PgEndpoint) -> PgEndpoint:
        return restore_endpoint(db, self.plan, server)

    def server(self, server: ProtectedServer, conn_id: str | None = None) -> PgEndpoint:
        return server_endpoint(server, self.plan, conn_id=conn_id)

    def store(self, target: StorageTarget, pruning: bool = False) -> tuple[BackupStore, BackupLayout]:
        if (target, pruning) not in self._stores:
            self._stores[target, pruning] = open_store(target, self.plan, pruning)
        return self._stores[target, pruning]

    def archive(self, server: ProtectedServer, target: StorageTarget | None = None, pruning: bool = False):
        return open_archive(server, self.plan, target, pruning)

    def data_key(self, db: ProtectedDatabase, manifest, catalog=None) -> bytes | None:
        return backup_data_key(db, manifest, self.plan, catalog)

    def encryption_keys(self, db: ProtectedDatabase):
        return encryption_keys(db, self.plan)


def resources(plan: DRPlan | None = None) -> AirflowResources:
    """Return the resources of ``plan`` (the deployment's plan by default) through Airflow connections."""
    from pgdr.plan import load_plan

    return AirflowResources(plan or load_plan())
