"""Shared test fixtures: the `tiny` model preset and deterministic, offline settings."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests name their stores; a developer's own server is not one
os.environ.pop("NEXUS_HOME", None)

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _restored_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# Each test, and each module's shared fixtures, get the environment back as they found it: the `nexus`
# CLI, called in process, sets defaults in `os.environ` (as it may in its own one-command process).
# The module-scoped one matters: a module fixture that runs the CLI would otherwise leak its defaults
# (e.g. Prefect's result path) into every later module, the servers' stack among them.
_environment = pytest.fixture(autouse=True)(_restored_environment)
_module_environment = pytest.fixture(autouse=True, scope="module")(_restored_environment)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Real Prefect against a temporary database, with results stored under a temporary PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-home")
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    settings = {PREFECT_HOME: str(home), PREFECT_LOCAL_STORAGE_PATH: str(home / "storage")}
    with temporary_settings(settings), prefect_test_harness(server_startup_timeout=120):
        yield home


@pytest.fixture
def one_thread():
    """One torch thread for the test: token-by-token decoding is many tiny matmuls, and on 2 shared
    cores a second thread only adds contention (25x slower under load, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
