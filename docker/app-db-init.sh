#!/bin/sh
# Roles of the application database, for docker-compose.yml. The postgres image runs
# this once, when it initialises an empty data directory, as POSTGRES_USER (the
# superuser, used for nothing else) in POSTGRES_DB, over its local socket.
#
#   tollgate_owner  owns the database and applies the migrations (the worker's
#                   DATABASE_OWNER_URL); no superuser, no CREATEROLE
#   tollgate_app    group role; schema/003_least_privilege.sql grants it row access
#   tollgate        the login role of DATABASE_URL (worker and CLI), in tollgate_app
#
# The passwords come from the container's environment, which docker-compose.yml fills
# from .env, the same variables the connection URLs use. They reach SQL only as psql
# variables written :'name', which psql quotes as a string literal: whatever a password
# contains, it stays a password. tests/test_compose.py runs this script against a real
# Postgres and logs in with the passwords.
#
# The image executes this file when it is executable and sources it otherwise; both
# work, so nothing here may change the calling shell's options for good (no set -u).

# An unset or empty password stops the initialisation instead of creating a role
# anyone can guess.
: "${TOLLGATE_OWNER_PASSWORD:?TOLLGATE_OWNER_PASSWORD is not set (see .env.example)}"
: "${TOLLGATE_PASSWORD:?TOLLGATE_PASSWORD is not set (see .env.example)}"

# The heredoc is quoted ('SQL'): the shell expands nothing in it, psql does the rest.
psql --no-psqlrc --no-password -v ON_ERROR_STOP=1 \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v database="$POSTGRES_DB" \
    -v owner_password="$TOLLGATE_OWNER_PASSWORD" \
    -v app_password="$TOLLGATE_PASSWORD" <<'SQL'
CREATE ROLE tollgate_owner LOGIN PASSWORD :'owner_password';
CREATE ROLE tollgate_app NOLOGIN;
CREATE ROLE tollgate LOGIN PASSWORD :'app_password' IN ROLE tollgate_app;
ALTER DATABASE :"database" OWNER TO tollgate_owner;
SQL
