#!/bin/sh
# One-off (compose service minio-init), as MinIO's root user: the bucket, a policy
# that allows s3:* on that bucket alone (bucket-policy.json, ${S3_BUCKET} filled
# in), and the user the worker and MLflow use (S3_ACCESS_KEY, its secret from
# S3_SECRET_KEY) with that policy attached. Idempotent: an existing bucket, policy
# or user is updated in place (a new secret key file takes effect on the next run).
# Expects MINIO_ROOT_USER, MINIO_ROOT_PASSWORD, S3_BUCKET, S3_ACCESS_KEY and
# S3_SECRET_KEY (the secrets via with-secrets.sh). POSIX sh: the mc image has no sed.
set -e
case $0 in */*) here=${0%/*} ;; *) here=. ;; esac  # this folder, without dirname
policy=quantmill-bucket

render() {  # the policy file with every ${S3_BUCKET} replaced by the bucket's name
    while IFS= read -r line || [ -n "$line" ]; do
        while :; do
            case $line in
                *'${S3_BUCKET}'*) line="${line%%'${S3_BUCKET}'*}$S3_BUCKET${line#*'${S3_BUCKET}'}" ;;
                *) break ;;
            esac
        done
        printf '%s\n' "$line"
    done < "$1"
}

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" > /dev/null
mc mb --ignore-existing "local/$S3_BUCKET"
render "$here/bucket-policy.json" | mc admin policy create local "$policy" /dev/stdin
mc admin user add local "$S3_ACCESS_KEY" "$S3_SECRET_KEY"
if ! out=$(mc admin policy attach local "$policy" --user "$S3_ACCESS_KEY" 2>&1); then
    case $out in
        *"already in effect"*) echo "policy $policy already attached to $S3_ACCESS_KEY" ;;
        *) echo "$out" >&2; exit 1 ;;
    esac
fi
