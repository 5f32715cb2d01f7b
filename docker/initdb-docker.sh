#!/usr/bin/env bash
# Runs once, after 10-pyembed-roles.sql, when the container's cluster is created:
# the application and worker logins' passwords and the replication role from the environment (env_file),
# so that no password is written in compose.yaml.
set -euo pipefail
# Without them the logins would have no password (10-pyembed-roles.sql sets none) and could not
# log in over the published port: the first start stops here instead, naming the variable.
: "${PYEMBED_APP_PASSWORD:?set it in docker/pyembed.env (see docker/env.example)}"
: "${PYEMBED_WORKER_PASSWORD:?set it in docker/pyembed.env (see docker/env.example)}"
# Each password goes on standard input (printf is bash's own: no process's arguments hold it, as
# ps shows them) to pyembed.passwords, which sends the server its SCRAM verifier, never the
# password: no statement holding it is logged, whatever log_statement says.
export PGUSER="$POSTGRES_USER" PGDATABASE=postgres PGHOST="${PGHOST:-/var/run/postgresql}"
python=${PYEMBED_PYTHON:-/opt/pyembed/plpython/bin/python}
printf '%s\n' "$PYEMBED_APP_PASSWORD" | "$python" -m pyembed.passwords pyembed_user
printf '%s\n' "$PYEMBED_WORKER_PASSWORD" | "$python" -m pyembed.passwords pyembed_worker_user
if [ -n "${PYEMBED_REPLICATION_PASSWORD:-}" ]; then
  psql -v ON_ERROR_STOP=1 <<< "CREATE ROLE replicator WITH REPLICATION LOGIN;"
  printf '%s\n' "$PYEMBED_REPLICATION_PASSWORD" | "$python" -m pyembed.passwords replicator
  echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
fi
