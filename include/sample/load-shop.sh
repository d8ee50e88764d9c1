#!/bin/sh
# Loads the demo database into the source PostgreSQL of docker-compose.yaml (first start only).
set -e
psql -v ON_ERROR_STOP=1 -U postgres -d postgres -c "CREATE DATABASE shop"
psql -v ON_ERROR_STOP=1 -v scale=1 -U postgres -d shop -f /pgdr/sample/shop.sql
