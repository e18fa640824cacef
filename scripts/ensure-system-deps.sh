#!/usr/bin/env bash
# Makes sure PostgreSQL's server and pg_cron are installed; installs them with apt where it
# can (as root on Debian), else says exactly what to install. Safe to run again.
set -euo pipefail

newest_bindir() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n | tail -n 1
}

apt_install() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "pglive needs: $*. Install them (Debian: sudo apt-get install $*) and run make again." >&2
        exit 1
    fi
    echo "installing $* with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    fi
}

bindir=$(newest_bindir)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    apt_install postgresql postgresql-contrib
    bindir=$(newest_bindir)
fi

version=$(basename "$(dirname "$bindir")")
if [ ! -f "/usr/share/postgresql/$version/extension/pg_cron.control" ]; then
    apt_install "postgresql-$version-cron"
fi

if ! command -v psql >/dev/null; then
    apt_install postgresql-client
fi
