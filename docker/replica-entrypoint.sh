#!/usr/bin/env bash
# The `replica` profile's entrypoint: on first start, a streaming standby of the `db` service
# made with pg_basebackup -R (standby.signal and primary_conninfo written for us); then the
# official entrypoint starts it (an existing PGDATA is never re-initialised).
set -euo pipefail
: "${PGDATA:=/var/lib/postgresql/data}"
: "${PYEMBED_PRIMARY_HOST:=db}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${PYEMBED_REPLICATION_PASSWORD:?set it in docker/pyembed.env (see docker/env.example)}"
  mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA" && chmod 700 "$PGDATA"
  until gosu postgres pg_isready -h "$PYEMBED_PRIMARY_HOST" -q; do sleep 1; done
  PGPASSWORD="$PYEMBED_REPLICATION_PASSWORD" gosu postgres pg_basebackup \
    -h "$PYEMBED_PRIMARY_HOST" -U replicator -D "$PGDATA" -R -X stream --checkpoint=fast
fi
exec docker-entrypoint.sh "$@"
