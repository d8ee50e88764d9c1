"""The PostgreSQL client side: connecting, snapshots and exact counts, the client tools with
credentials from a passfile, and scratch databases."""
