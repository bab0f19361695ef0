"""Prefect flows of the Nexus pipeline, and their MLflow tracking (`flows.tracking`)."""

import logging

# The library logs training progress on `nexus.*` at INFO; Prefect forwards it to the flow-run log
# (terminal, worker, UI) when `PREFECT_LOGGING_EXTRA_LOGGERS` names `nexus`, which the CLI and
# `nexus deploy` set.
logging.getLogger("nexus").setLevel(logging.INFO)
