#!/bin/sh
# Entrypoint wrapper: `with-secrets.sh COMMAND [ARG...]`.
# For every environment variable NAME_FILE whose value is a file in $SECRETS_DIR
# (default /run/secrets, where compose mounts its secrets), export NAME with that
# file's content (trailing newlines stripped), then exec COMMAND. The programs it
# starts (prefect, mlflow, mc) read plain variables only: PREFECT_API_AUTH_STRING,
# MLFLOW_TRACKING_PASSWORD, PGPASSWORD, ...
# Left alone: NAME_FILE values outside $SECRETS_DIR (SSL_CERT_FILE and the like
# name files, not secrets), and HF_TOKEN_FILE (quantmill reads that file itself,
# when it publishes, so the Hub token stays out of every process environment).
# A secret file that is missing or unreadable is reported and NAME is not set.
# POSIX sh only (no sed, no grep: the minio/mc image has neither).

names=$(env | while IFS= read -r line; do
    case $line in
        *_FILE=*) printf '%s\n' "${line%%_FILE=*}" ;;
    esac
done)

for name in $names; do
    case $name in
        HF_TOKEN) continue ;;
        '' | [!A-Za-z_]* | *[!A-Za-z0-9_]*) continue ;;  # a line of some value, not a name
    esac
    eval "path=\${${name}_FILE-}"
    case $path in
        "${SECRETS_DIR:-/run/secrets}"/*) ;;
        *) continue ;;
    esac
    if [ -f "$path" ] && [ -r "$path" ]; then
        value=$(cat "$path") || exit 1
        export "$name=$value"
    else
        echo "with-secrets: ${name}_FILE=$path is not a readable file; $name not set" >&2
    fi
done
unset names name path value

exec "$@"
