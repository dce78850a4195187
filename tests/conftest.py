"""Shared fixtures: one private cache of embedded defaults and one local Ray cluster per session.

Ray starts once (about 10 s here) and every Ray test shares it. Tests build tiny models from
config; nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile

import pytest

# Before anything imports coati_ray.defaults or starts Ray, so that actors inherit it.
os.environ.setdefault("COATI_RAY_CACHE", tempfile.mkdtemp(prefix="coati_ray_test_cache_"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_dir():
    from coati_ray.defaults import demo_data_dir

    return demo_data_dir()


@pytest.fixture(scope="session")
def micro_model():
    """Path of the micro llama preset (HF directory with tokenizer)."""
    from coati_ray.defaults import default_model_dir

    return str(default_model_dir("llama", "micro"))


@pytest.fixture(scope="session")
def tokenizer(micro_model):
    from coati_ray.models.loading import load_tokenizer

    return load_tokenizer(micro_model)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # Logical CPUs: a PPO run starts up to 7 one-CPU actors; they share the real cores.
    ray.init(num_cpus=8, include_dashboard=False, namespace="coati_ray_tests", logging_level="ERROR",
             runtime_env={"env_vars": {"COATI_RAY_CACHE": os.environ["COATI_RAY_CACHE"],
                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
