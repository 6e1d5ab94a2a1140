"""Fixtures shared by every test folder: the tiny random models and the default model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Every test process computes on one thread: two threads on two shared cores collapse.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama saved as a Hugging Face folder (no download)."""
    from swarm.model import hf

    return hf.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(model_type) -> folder of a tiny random model of that family."""
    from swarm.model import hf

    made: dict[str, Path] = {}

    def make(model_type: str = "llama") -> Path:
        if model_type not in made:
            made[model_type] = hf.save_tiny_llama(tmp_path_factory.mktemp(f"tiny-{model_type}"), 0, model_type)
        return made[model_type]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model, converted once into the user's cache and shared by every test."""
    from swarm.model.store import resolve_model

    return resolve_model(None)
