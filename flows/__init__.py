"""Prefect flows of the Nexus pipeline, and their MLflow tracking (`flows.tracking`)."""
