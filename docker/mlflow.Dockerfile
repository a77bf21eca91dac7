# MLflow tracking server with the PostgreSQL driver (the official image lacks psycopg2).
ARG MLFLOW_VERSION=v3.17.2
FROM ghcr.io/mlflow/mlflow:${MLFLOW_VERSION}
RUN pip install --no-cache-dir psycopg2-binary==2.9.10
