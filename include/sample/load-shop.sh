#!/bin/sh
# Loads the demo database into the source PostgreSQL of docker-compose.yaml (first start only).
set -e
psql -v ON_ERROR_STOP=1 -U postgres -d postgres -c "CREATE DATABASE shop"
psql -v ON_ERROR_STOP=1 -v scale=1 -U postgres -d shop -f /pgdr/sample/shop.sql
# The role pgdr restores as: it may log in and create databases, and is never a superuser (a
# restored dump runs code written by whoever owned a schema). Its password is RESTORE_DB_PASSWORD.
psql -v ON_ERROR_STOP=1 -v pw="$RESTORE_DB_PASSWORD" -U postgres -d postgres \
     -c "CREATE ROLE pgdr_restore LOGIN CREATEDB NOSUPERUSER PASSWORD :'pw'"
