#!/bin/sh
# One-shot schema job for docker-compose.yml, run in temporalio/admin-tools (same
# version as temporalio/server: the schema files in the image are the ones that server
# version expects). The server image does not touch its database schema, so it starts
# only after this job exited successfully.
#
# temporal-sql-tool takes its connection from SQL_PLUGIN, SQL_HOST, SQL_PORT, SQL_USER
# and SQL_PASSWORD in the environment, so the password never shows in a process list.
#
# Safe to run on every `docker compose up`, which is how a newer image gets its schema
# changes: `create` treats an existing database as success, `setup-schema -v 0.0` leaves
# a schema that is already versioned alone, and `update-schema` applies only the
# versions that are missing.
set -eu

: "${SQL_PASSWORD:?SQL_PASSWORD is not set}"

# Layout of the schema files in the admin-tools image (Postgres 12+ dialect).
schema_root=/etc/temporal/schema/postgresql/v12

migrate() {
    database=$1
    versioned_dir=$schema_root/$2/versioned
    echo "temporal-schema: ${database} from ${versioned_dir}"
    temporal-sql-tool --db "$database" create
    temporal-sql-tool --db "$database" setup-schema -v 0.0
    temporal-sql-tool --db "$database" update-schema -d "$versioned_dir"
}

# The server's defaults (DBNAME, VISIBILITY_DBNAME): history and state, then visibility.
migrate temporal temporal
migrate temporal_visibility visibility
