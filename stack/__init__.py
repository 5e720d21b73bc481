"""The service stack without Docker: a Prefect server, an MLflow server, an
S3-compatible server and a Prefect worker as local processes, started and
stopped by ``quantmill stack up`` / ``stack down`` and listed by ``stack status``.
The same services run in containers with ``docker-compose.yml``."""
