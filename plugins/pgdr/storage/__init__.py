"""Where bytes live: the storage backends (local folder, S3), the one key layout every record uses,
and the encryption primitives. What the bytes mean lives with their kind: the logical backups'
catalog, retention and key rotation in :mod:`pgdr.logical`, the base backups' in :mod:`pgdr.physical`."""
