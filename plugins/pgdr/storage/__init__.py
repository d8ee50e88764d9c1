"""Where bytes live: storage backends (local folder, S3), the one key layout, the catalog of backups
(manifests and verification records) and retention."""
