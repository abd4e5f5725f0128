# Sourced by the scripts in this folder: make sure PostgreSQL and RabbitMQ answer on 127.0.0.1,
# start them when installed but stopped, install them (apt-get, as root) when missing, create the
# database and apply the migrations.
# shellcheck shell=bash

: "${DATABASE_URL:=postgres://postgres@127.0.0.1:5432/oncely}"
: "${AMQP_URL:=amqp://guest:guest@127.0.0.1:5672/%2f}"
export DATABASE_URL AMQP_URL

say() { printf 'oncely: %s\n' "$*" >&2; }

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

wait_for() { # name, deadline seconds, command...
  local name=$1 deadline=$(( SECONDS + $2 )); shift 2
  until "$@"; do
    if (( SECONDS > deadline )); then say "$name did not come up in time"; return 1; fi
    sleep 0.5
  done
}

can_install() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

apt_install() {
  say "installing $* with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || port_open 5432; then return 0; fi
  if ! command -v pg_ctlcluster >/dev/null; then
    if can_install; then
      apt_install postgresql postgresql-client
      # Local development and tests connect as postgres over TCP without a password.
      local hba
      hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -n 1)
      sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    else
      say "PostgreSQL is not installed. Install it (Debian/Ubuntu: sudo apt-get install postgresql),"
      say "let user postgres connect from 127.0.0.1 without a password (pg_hba.conf: host all all 127.0.0.1/32 trust),"
      say "or point DATABASE_URL at a server you have."
      return 1
    fi
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  say "starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for PostgreSQL 60 pg_isready -q -h 127.0.0.1 -p 5432
}

ensure_rabbitmq() {
  if port_open 5672; then return 0; fi
  if ! command -v rabbitmq-server >/dev/null; then
    if can_install; then
      apt_install rabbitmq-server
    else
      say "RabbitMQ is not installed. Install it (Debian/Ubuntu: sudo apt-get install rabbitmq-server)"
      say "and start it (rabbitmq-server -detached), or point AMQP_URL at a broker you have."
      return 1
    fi
  fi
  say "starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for RabbitMQ 120 port_open 5672
  rabbitmqctl -q await_startup >/dev/null 2>&1 || true
}

ensure_database() {
  local db=${DATABASE_URL##*/}
  db=${db%%\?*}
  local admin=${DATABASE_URL%/*}/postgres
  if ! psql "$admin" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    say "creating database $db"
    psql "$admin" -qc "CREATE DATABASE \"$db\"" >/dev/null
  fi
}

ensure_services() {
  ensure_postgres
  ensure_rabbitmq
  ensure_database
}
