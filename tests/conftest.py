import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test``: ``-n auto``) each worker gets its share of the cores for torch's
    intra-op threads, so N workers do not run N x cores threads on N cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from tipsdistill.cache.resources import available_cpus

        torch.set_num_threads(available_cpus(local_world=workers)[0])


# the variables a launcher sets; code under test may export them (distill.train.setup_env, srun's
# translation in cache.launch): a test that leaves them behind makes every later in-process stage believe
# it is one rank of several
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
)


@pytest.fixture(autouse=True)
def _launcher_variables_restored():
    saved = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
