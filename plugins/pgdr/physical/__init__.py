"""Point-in-time recovery: the WAL archive (shipped by the server's archive_command), base backups
taken with pg_basebackup (full and incremental), and scratch clusters recovered to a moment."""
