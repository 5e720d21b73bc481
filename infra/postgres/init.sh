#!/bin/sh
# PostgreSQL users per database. The postgres image runs this once, on an empty
# data volume (/docker-entrypoint-initdb.d), as the superuser:
#   role prefect  owns database prefect      (Prefect server)
#   role mlflow   owns databases mlflow      (MLflow runs and models)
#                          and mlflow_auth (MLflow's users and permissions)
# Each database is closed to every other role (REVOKE CONNECT FROM PUBLIC).
# The passwords are read from the files named by PG_PREFECT_PASSWORD_FILE and
# PG_MLFLOW_PASSWORD_FILE (compose secrets); none is written here.
# Idempotent: run again, e.g. on a volume made before this script existed,
#   docker compose exec postgres /docker-entrypoint-initdb.d/init.sh
# it creates what is missing and sets the passwords to the files' contents.
# DB_PREFIX (empty here) prefixes every name, for a test on a shared server.
set -e

sql() {
    psql -X -q -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" \
        --dbname "${POSTGRES_DB:-${POSTGRES_USER:-postgres}}" "$@"
}

role() {  # role NAME PASSWORD_FILE
    if [ ! -r "$2" ] || [ ! -s "$2" ]; then
        echo "init.sh: no password for role $1: $2 is missing, empty or unreadable" \
            "by user $(id -un) (see .env.example)" >&2
        exit 1
    fi
    DB_PASSWORD=$(cat "$2")
    export DB_PASSWORD  # to psql's \getenv: not in any command line
    sql -v name="${DB_PREFIX:-}$1" <<'SQL'
\getenv password DB_PASSWORD
SELECT format('CREATE ROLE %I', :'name')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'name') \gexec
ALTER ROLE :"name" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
SQL
    unset DB_PASSWORD
}

database() {  # database NAME OWNER
    sql -v name="${DB_PREFIX:-}$1" -v owner="${DB_PREFIX:-}$2" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'name', :'owner')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name') \gexec
ALTER DATABASE :"name" OWNER TO :"owner";
REVOKE CONNECT, TEMPORARY ON DATABASE :"name" FROM PUBLIC;
SQL
}

role prefect "${PG_PREFECT_PASSWORD_FILE:-/run/secrets/pg_prefect_password}"
database prefect prefect
role mlflow "${PG_MLFLOW_PASSWORD_FILE:-/run/secrets/pg_mlflow_password}"
database mlflow mlflow
database mlflow_auth mlflow
