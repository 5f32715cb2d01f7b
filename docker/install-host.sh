#!/usr/bin/env bash
# Installs what pyembed needs on a Debian or Ubuntu host:
#   PostgreSQL (the distribution's major version, 15 or newer), plpython3u,
#   the server dev package, pgvector, and the Python packages that pyembed's
#   PL/Python functions import, for the server's own interpreter.
# Idempotent: a second run checks, finds everything in place and exits in seconds.
# Usage: docker/install-host.sh            (uses sudo when not root and something is missing)
set -euo pipefail

say() { printf 'pyembed install-host: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SUDO=""
# Root is needed only for what is missing: without sudo, a non-root run that finds everything
# in place goes on, and one that must install something names it and stops.
needs_root() { die "installing needs root ($*): run as root, or install sudo"; }
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="needs_root"; fi
fi

[ -r /etc/os-release ] || die "unsupported system: no /etc/os-release (Debian or Ubuntu required)"
. /etc/os-release
case " ${ID:-} ${ID_LIKE:-} " in
  *" debian "*|*" ubuntu "*) ;;
  *) die "unsupported system: ${PRETTY_NAME:-unknown} (Debian 12+ or Ubuntu 22.04+ required)";;
esac
command -v apt-get >/dev/null || die "unsupported system: apt-get not found"

# One run at a time on this machine: two checkouts set up at once (CI beside `make demo`) wrote
# the same PL/Python venv together, and pip failed on the other's files.
lock=${TMPDIR:-/tmp}/pyembed-install-host.lock
[ -e "$lock" ] || { : > "$lock" && chmod 666 "$lock"; } 2>/dev/null || true
exec 9<"$lock"
if command -v flock >/dev/null; then flock 9; fi

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update() { if [ "$apt_updated" = 0 ]; then $SUDO apt-get update -qq; apt_updated=1; fi; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
apt_install() {
  local missing=()
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  apt_update
  say "installing ${missing[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# 1. PostgreSQL: the distribution's own major version.
if ! installed postgresql-common || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  apt_install postgresql
fi
major=$(ls -1 /usr/lib/postgresql/ | sort -n | tail -1)
[ -n "$major" ] && [ "$major" -ge 15 ] 2>/dev/null || die "PostgreSQL ${major:-?} found; pyembed needs 15 or newer"
pg_config=/usr/lib/postgresql/$major/bin/pg_config
apt_install "postgresql-$major" "postgresql-plpython3-$major" "postgresql-server-dev-$major" \
  python3 python3-venv python3-dev build-essential ca-certificates

# 2. pgvector: the distribution's package, else built from a newer suite's Debian source.
sharedir=$($pg_config --sharedir)
if [ ! -f "$sharedir/extension/vector.control" ]; then
  apt_update
  if apt-cache show "postgresql-$major-pgvector" >/dev/null 2>&1; then
    apt_install "postgresql-$major-pgvector"
  else
    [ "${ID:-}" = debian ] || die "no postgresql-$major-pgvector package on ${PRETTY_NAME:-this system}"
    # Reuse the URI the machine already uses for Debian, for the next suite's sources.
    uri=$( { cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } \
          | grep -E '^(URIs:|deb )' | grep -v -E 'security|nodesource|google' \
          | grep -o -E 'https?://[^ ]+' | head -1 || true)
    [ -n "$uri" ] || die "cannot find a Debian mirror URI in the apt sources"
    case "${VERSION_CODENAME:-}" in
      bookworm) newer=trixie;; bullseye) newer=bookworm;; *) newer=sid;;
    esac
    say "building pgvector from the $newer source package"
    printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$uri" "$newer" | $SUDO tee /etc/apt/sources.list.d/pyembed-pgvector-src.sources >/dev/null
    apt_install dpkg-dev
    $SUDO apt-get update -qq
    build=$(mktemp -d)
    (cd "$build" && apt-get source -qq pgvector >/dev/null 2>&1) || die "apt-get source pgvector failed"
    src=$(find "$build" -maxdepth 1 -type d -name 'pgvector-*' | head -1)
    [ -n "$src" ] || die "pgvector source not found after apt-get source"
    make -s -C "$src" PG_CONFIG="$pg_config" >/dev/null
    $SUDO make -s -C "$src" PG_CONFIG="$pg_config" install >/dev/null
    rm -rf "$build"
  fi
fi
[ -f "$sharedir/extension/vector.control" ] || die "pgvector is not installed for PostgreSQL $major"

# 3. Python packages for the server's own interpreter (PL/Python runs /usr/bin/python3,
#    not a virtualenv): a venv made with that interpreter, made visible to it by a .pth file.
venv=/opt/pyembed/plpython
pybin=$(readlink -f /usr/bin/python3)
pyver=$("$pybin" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
stamp_src=$(cat "$repo/pyproject.toml" $(find "$repo/pyembed" -type f -name '*.py' | sort) | sha256sum | cut -c1-16)
if [ ! -f "$venv/.stamp" ] || [ "$(cat "$venv/.stamp")" != "$stamp_src" ]; then
  say "installing pyembed and its packages for $pybin (PL/Python)"
  $SUDO "$pybin" -m venv "$venv"
  $SUDO "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1
  $SUDO "$venv/bin/pip" install -q --disable-pip-version-check "$repo" 2>&1 | { grep -v "^WARNING: Location" || true; }
  echo "$stamp_src" | $SUDO tee "$venv/.stamp" >/dev/null
fi
sitedir=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pth=/usr/local/lib/python$pyver/dist-packages/pyembed-plpython.pth
if [ "$(cat "$pth" 2>/dev/null)" != "$sitedir" ]; then
  $SUDO mkdir -p "$(dirname "$pth")"
  echo "$sitedir" | $SUDO tee "$pth" >/dev/null
fi
say "ready: PostgreSQL $major with plpython3u and pgvector; PL/Python packages in $venv"
