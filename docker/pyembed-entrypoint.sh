#!/bin/sh
# The pyembed image's entrypoint: each PYEMBED_*_FILE names a file (a compose secret,
# /run/secrets/...) whose content becomes PYEMBED_* (PYEMBED_DSN_FILE -> PYEMBED_DSN), then
# the command runs in its place (exec: the worker gets SIGTERM itself and finishes its batch).
set -eu
for var in PYEMBED_DSN PYEMBED_OWNER_DSN PYEMBED_READ_DSN PYEMBED_WORKER_DSN; do
  eval "file=\${${var}_FILE:-}"
  if [ -n "$file" ]; then
    [ -r "$file" ] || { echo "pyembed-entrypoint: ${var}_FILE: cannot read $file" >&2; exit 1; }
    value=$(cat "$file")
    export "$var=$value"
    unset "${var}_FILE"
  fi
done
exec "$@"
