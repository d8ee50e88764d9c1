"""Logical backups: pg_dump into the store with checksums and the manifest last; download, verify
and pg_restore back. The physical side (base backups, WAL) will live beside this package."""
