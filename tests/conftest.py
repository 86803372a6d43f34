"""Shared tiny models and data for the test suite."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossless_trainer import Model


class TinyClassifier(Model):
    """16 -> 32 -> 4 MLP with dropout, so runs consume RNG like real models."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(32, 4)

    def forward(self, batch):
        x, y = batch
        logits = self.head(self.body(x))
        if not self.training:
            return logits.argmax(-1)
        return {"ce": F.cross_entropy(logits, y)}


def make_batches(n: int, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 16, generator=g), torch.randint(0, 4, (batch,), generator=g))
            for _ in range(n)]


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_batches(6)


@pytest.fixture
def quiet(tmp_path):
    """Keyword arguments for a Trainer that writes into tmp_path and prints nothing."""
    return {"log_dir": str(tmp_path / "run"), "progress": False}


@pytest.fixture
def fresh(tmp_path):
    """Like `quiet`, but a new run directory at every call, for several runs in one test."""
    counter = iter(range(1000))
    return lambda: {"log_dir": str(tmp_path / f"run{next(counter)}"), "progress": False}


def read_metrics(log_dir: str) -> list[dict]:
    """The run's metrics.jsonl, one dict per flush."""
    with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@contextmanager
def loaded_benchmark(filename: str) -> Iterator[ModuleType]:
    """A script of benchmarks/ imported as a module, for the duration of the block."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / filename
    name = f"benchmark_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]
