"""The Assets through which pgdr's DAGs talk to each other.

``pgdr_backup`` emits one :data:`BACKUP_ASSET` event per completed backup; its ``extra`` carries
the database, backup id and location. ``pgdr_verify_restore`` is scheduled on this asset and
verifies exactly the backups named by the events that triggered it.
"""

from __future__ import annotations

from airflow.sdk import Asset

# A name-only asset: a URI with a scheme makes Airflow load every provider's URI handlers
# (boto3 among them) when the DAG file is parsed, which costs half a second per parse.
BACKUP_ASSET = Asset("pgdr_backups")

# One event per completed base backup; ``extra`` carries the server, backup id and kind.
# ``pgdr_verify_pitr`` is scheduled on it.
BASE_BACKUP_ASSET = Asset("pgdr_base_backups")
