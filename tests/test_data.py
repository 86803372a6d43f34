"""lossless_trainer.data: moving and sizing batches, and the kinds of data a run iterates."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch
from conftest import TinyClassifier, make_batches
from torch.utils.data import DataLoader

from lossless_trainer import Model, Trainer
from lossless_trainer.data import batch_size, move_to_device


class Pair(NamedTuple):
    x: torch.Tensor
    meta: str


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    boxes: list
    name: str = "s"


def test_move_to_device_recurses_and_keeps_types():
    meta = torch.device("meta")
    batch = {"a": [torch.ones(2), (torch.zeros(1), 3)], "p": Pair(torch.ones(3), "tag"),
             "s": Sample(torch.ones(1, 2, 2), [torch.ones(4)]), "n": None}
    moved = move_to_device(batch, meta)
    assert moved["a"][0].device == meta and moved["a"][1][0].device == meta
    assert isinstance(moved["a"][1], tuple) and moved["a"][1][1] == 3
    assert isinstance(moved["p"], Pair) and moved["p"].x.device == meta and moved["p"].meta == "tag"
    assert isinstance(moved["s"], Sample) and moved["s"].image.device == meta
    assert moved["s"].boxes[0].device == meta and moved["s"].name == "s"
    assert moved["n"] is None
    assert batch["a"][0].device.type == "cpu"  # the input is not modified
    same = torch.ones(2)
    assert move_to_device(same, torch.device("cpu")) is same  # no copy when already there
    assert batch_size(batch) == 2 and batch_size(Sample(torch.ones(5, 1), [])) == 5
    assert batch_size({"name": "x"}) is None


def test_the_batch_size_of_torchvision_detection_batches_is_their_number_of_images():
    images = [torch.ones(3, 8, 8), torch.ones(3, 5, 7)]  # CHW, of different sizes
    targets = [{"boxes": torch.zeros(1, 4), "labels": torch.ones(1)} for _ in images]
    assert batch_size((images, targets)) == 2  # not 3, the first image's channels
    assert batch_size([images, targets]) == 2
    # Two lists that are not (images, targets) keep the first tensor's leading dimension.
    assert batch_size(([torch.ones(4, 2), torch.ones(4, 3)], [torch.ones(4), torch.ones(4)])) == 4


def test_batches_already_on_the_device_are_passed_as_they_are():
    cpu = torch.device("cpu")
    pair, listed = (torch.ones(2), torch.zeros(2)), [torch.ones(3), torch.zeros(3)]
    named = Pair(torch.ones(2), "tag")
    for batch in (pair, listed, named):
        assert move_to_device(batch, cpu) is batch
    moved = move_to_device(named, torch.device("meta"))
    assert isinstance(moved, Pair) and moved.x.device.type == "meta" and moved.meta == "tag"
    assert batch_size(pair) == 2 and batch_size(listed) == 3
    assert batch_size((torch.tensor(1.0), torch.ones(4))) is None  # a 0-d first tensor
    assert batch_size([{"x": torch.ones(6, 1)}]) == 6 and batch_size(()) is None


def test_batch_reaches_the_model_whole(quiet):
    seen = []

    class DictModel(Model):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, batch):
            seen.append((type(batch), sorted(batch), batch["id"]))
            return {"mse": (self.lin(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()}

    data = [{"x": torch.randn(4, 3), "y": torch.randn(4), "id": f"b{i}"} for i in range(3)]
    Trainer(DictModel(), data, **quiet).fit()
    assert seen == [(dict, ["id", "x", "y"], f"b{i}") for i in range(3)]


# --------------------------------------------------------------------------- kinds of data


def test_generator_is_consumed_until_exhausted(fresh):
    def gen():
        yield from make_batches(7)

    state = Trainer(TinyClassifier(), gen(), **fresh()).fit()
    assert (state.step, state.stop_reason) == (7, "data_exhausted")

    with pytest.warns(UserWarning, match="exhausted after 7 steps, before max_steps=100"):
        state = Trainer(TinyClassifier(), gen(), max_steps=100, **fresh()).fit()
    assert state.step == 7

    state = Trainer(TinyClassifier(), gen(), max_steps=3, **fresh()).fit()
    assert (state.step, state.stop_reason) == (3, "max_steps")


def test_dataloader_over_an_iterable_dataset_without_length(quiet):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield from make_batches(5)

    state = Trainer(TinyClassifier(), DataLoader(Stream(), batch_size=None), max_steps=12,
                    **quiet).fit()
    assert (state.step, state.epoch) == (12, 2)


def test_empty_data_is_a_clear_error(quiet):
    with pytest.raises(ValueError, match="no batches in epoch 0"):
        Trainer(TinyClassifier(), [], **quiet).fit()
