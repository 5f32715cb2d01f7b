#!/usr/bin/env bash
# Runs once, after 10-pyembed-roles.sql, when the container's cluster is created:
# the application and worker logins' passwords and the replication role from the environment (env_file),
# so that no password is written in compose.yaml.
set -euo pipefail
# Without them the logins would keep 10-pyembed-roles.sql's placeholder password, which anyone
# reading this repository knows, on the published port: the first start stops here instead.
: "${PYEMBED_APP_PASSWORD:?set it in docker/pyembed.env (see docker/env.example)}"
: "${PYEMBED_WORKER_PASSWORD:?set it in docker/pyembed.env (see docker/env.example)}"
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres -v pw="$PYEMBED_APP_PASSWORD" \
  <<< "ALTER ROLE pyembed_user PASSWORD :'pw';"
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres -v pw="$PYEMBED_WORKER_PASSWORD" \
  <<< "ALTER ROLE pyembed_worker_user PASSWORD :'pw';"
if [ -n "${PYEMBED_REPLICATION_PASSWORD:-}" ]; then
  psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres -v pw="$PYEMBED_REPLICATION_PASSWORD" \
    <<< "CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'pw';"
  echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
fi
