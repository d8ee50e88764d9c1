"""Logical backups: pg_dump into the store with checksums and the manifest last (``backup``); their
catalog of manifests and verification records (``catalog``), retention and master-key rotation;
download, verify and pg_restore back (``restore``) with owners, grants and settings (``privileges``).
The physical side (base backups, WAL) lives in :mod:`pgdr.physical`."""
