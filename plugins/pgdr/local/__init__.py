"""Running pgdr on one machine: the embedded PostgreSQL server, the in-process DAG runner and the demo."""
