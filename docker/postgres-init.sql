-- One PostgreSQL instance, one database per service.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
