"""Shared models, data, run helpers and fixtures for the test suite."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Mean, Model, Trainer, summary, write_summary

# --------------------------------------------------------------------------- models


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


class Returns(Model):
    """Returns `make(self, loss)` from step `from_step` on, a valid {'ce': loss} before.

    `calls` counts the forward calls, so `make` can choose by step.
    """

    def __init__(self, make, from_step: int = 1) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.make, self.from_step, self.calls = make, from_step, 0

    def forward(self, batch):
        x, y = batch
        self.calls += 1
        loss = F.cross_entropy(self.lin(x), y)
        return self.make(self, loss) if self.calls >= self.from_step else {"ce": loss}


class NaNFrom(Returns):
    """A valid {'ce': loss} until `step`; from there on also a loss `key` equal to `value`
    (NaN by default), with a path to the parameters so only its value is wrong."""

    def __init__(self, step: int, key: str = "aux", value: float = float("nan")) -> None:
        def make(model, loss):
            return {"ce": loss, key: model.lin.weight.sum() * 0 + value}

        super().__init__(make, from_step=step)


class ValLossClassifier(Model):
    """Eval mode: logits, and a validation loss through write_summary when labels exist."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(32, 4))
        self.inference_flags: list[bool] = []

    def forward(self, batch):
        x, y = batch
        logits = self.net(x)
        if self.training:
            return {"ce": F.cross_entropy(logits, y)}
        self.inference_flags.append(torch.is_inference_mode_enabled())
        write_summary("val_loss", F.cross_entropy(logits, y))
        return logits


class TinyLM(Model):
    """Next-token prediction on padded sequences (labels -100 at padding), with the loss
    ``Mean(nll summed over real tokens, their number)`` and `count_items` for it.

    Args:
        aux: Add a plain auxiliary loss (a per-sequence mean, so equal micro-batches
            average to the big batch's value).
        mean_of_means: Return the per-batch mean ``nll / n`` as a plain loss instead (and
            have no `count_items`): the bug the Mean exists to fix.
    """

    def __init__(self, vocab: int = 11, width: int = 8, *, aux: bool = False,
                 mean_of_means: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)
        self.aux = aux
        self.mean_of_means = mean_of_means
        if mean_of_means:
            self.count_items = None

    def forward(self, batch):
        logits = self.out(torch.tanh(self.mix(self.embed(batch["tokens"]))))
        if not self.training:
            return logits
        labels = batch["labels"]
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                              reduction="sum")
        n_tokens = (labels != -100).sum()
        losses = {"nll": nll / n_tokens if self.mean_of_means else Mean(nll, n_tokens)}
        if self.aux:
            losses["aux"] = 0.1 * logits[:, 0].pow(2).mean()
        return losses

    def count_items(self, batch):
        return {"nll": (batch["labels"] != -100).sum()}


class UncountedLM(TinyLM):
    """`TinyLM` without `count_items`."""

    count_items = None


def lm_sequences(n: int, vocab: int = 11, seed: int = 0, lengths: tuple[int, int] = (2, 14),
                 ) -> list[torch.Tensor]:
    """`n` random token sequences of random lengths."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (int(torch.randint(*lengths, (), generator=generator)),),
                          generator=generator) for _ in range(n)]


def pad_lm(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch for `TinyLM`: inputs and next-token labels, padded to the longest, -100
    where there is no next token."""
    width = max(len(s) for s in sequences) - 1
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, :len(s) - 1] = s[:-1]
        labels[i, :len(s) - 1] = s[1:]
    return {"tokens": tokens, "labels": labels}


def lm_batches(sequences: list[torch.Tensor], batch: int) -> list[dict[str, torch.Tensor]]:
    return [pad_lm(sequences[i:i + batch]) for i in range(0, len(sequences), batch)]


def cloned_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


# --------------------------------------------------------------------------- data


def make_batches(n: int, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 16, generator=g), torch.randint(0, 4, (batch,), generator=g))
            for _ in range(n)]


def shuffled_loader(num_workers: int = 0) -> DataLoader:
    """60 fixed samples in a shuffled DataLoader: 8 batches, the last one short."""
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(60, 16, generator=g), torch.randint(0, 4, (60,), generator=g))
    return DataLoader(data, batch_size=8, shuffle=True, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


# --------------------------------------------------------------------------- runs


def train(log_dir, max_steps: int | None = 24, num_workers: int = 0, *,
          model: Callable[[], nn.Module] | None = None, data: Any = None,
          **options) -> tuple[Trainer, nn.Module]:
    """Fit a Trainer that writes into `log_dir` and prints nothing; return it and its model.

    By default, the checkpointed run the resume tests compare with: TinyClassifier
    (dropout 0.3) built after ``torch.manual_seed(0)``, `shuffled_loader(num_workers)`,
    AdamW at lr 1e-2, seed=1, log_every=4, checkpoint_every=6. `model` (a factory, called
    after the same seeding) and `data` replace the model and the data; `options` are
    further Trainer options, and override those defaults.
    """
    torch.manual_seed(0)
    built = model() if model is not None else TinyClassifier(dropout=0.3)
    defaults = {"checkpoint_every": 6, "log_every": 4, "seed": 1, "progress": False,
                "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-2)}
    trainer = Trainer(built, shuffled_loader(num_workers) if data is None else data,
                      max_steps=max_steps, log_dir=str(log_dir), **{**defaults, **options})
    trainer.fit()
    return trainer, built


@contextmanager
def tmpfs(mount: Path, size: str = "1m") -> Iterator[Path]:
    """A small tmpfs mounted at `mount` for the block (a full disk, a read-only file
    system); skips the test where mounting is not allowed (not root, no capability)."""
    mount.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def read_metrics(log_dir: str | os.PathLike[str]) -> list[dict]:
    """The run's metrics.jsonl, one dict per flush."""
    with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def syncs(monkeypatch) -> dict[str, int]:
    """Counts of every way a tensor is read back to the host (`item`, `bool`, `float`,
    `tolist`), while the test runs. The summary sink keeps CPU tensors until the flush,
    as it does an accelerator's (it reads CPU tensors as they are written otherwise:
    that waits for nothing on the CPU, but would be a sync on a device)."""
    monkeypatch.setattr(summary, "READ_CPU_NOW", False)
    calls = {"item": 0, "bool": 0, "float": 0, "tolist": 0}
    for name, attr in [("item", "item"), ("bool", "__bool__"), ("float", "__float__"),
                       ("tolist", "tolist")]:
        original = getattr(torch.Tensor, attr)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, attr, counting)
    return calls


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


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """Uninterrupted runs of `train`, by number of DataLoader workers (which changes RNG
    use): the model and the metrics it logged."""
    cache: dict[int, tuple[nn.Module, list[dict]]] = {}

    def get(num_workers: int = 0):
        if num_workers not in cache:
            log_dir = tmp_path_factory.mktemp("ref") / "run"
            _, model = train(log_dir, num_workers=num_workers)
            cache[num_workers] = (model, read_metrics(str(log_dir)))
        return cache[num_workers]

    return get


@pytest.fixture
def uninterrupted(references):
    return references(0)


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
