"""lossless_trainer.options: option checks, the optimizer and scheduler, the default run dir."""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
from conftest import TinyClassifier, cloned_params, make_batches

from lossless_trainer import Trainer
from lossless_trainer.options import epoch_limit, planned_steps, step_limit


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_steps": 0}, ValueError, "max_steps must be a positive int, got 0"),
        ({"max_epochs": 1.5}, ValueError, "max_epochs must be a positive int, got 1.5"),
        ({"log_every": -1}, ValueError, "log_every must be a positive int"),
        ({"finite_check": "never"}, ValueError, "finite_check must be 'flush' or 'step'"),
        ({"batch_size": 64}, TypeError, "batch_size must be a function batch -> number of "
                                        "samples"),
    ],
)
def test_bad_options(quiet, kwargs, error, message):
    with pytest.raises(error, match=message):
        Trainer(TinyClassifier(), make_batches(1), **kwargs, **quiet)


def test_bad_model_and_data(quiet):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        Trainer(lambda batch: batch, make_batches(1), **quiet)
    with pytest.raises(TypeError, match="data must be an iterable of batches.*got int"):
        Trainer(TinyClassifier(), 5, **quiet)
    frozen = TinyClassifier().requires_grad_(False)
    with pytest.raises(ValueError, match="TinyClassifier has no trainable parameters"):
        Trainer(frozen, make_batches(1), **quiet)


def test_bad_feature_options():
    model, data = TinyClassifier(), make_batches(1)
    with pytest.raises(ValueError, match="precision must be one of 32, bf16, fp16, got 'fp8'"):
        Trainer(model, data, precision="fp8")
    with pytest.raises(ValueError, match="grad_accum_steps must be a positive int"):
        Trainer(model, data, grad_accum_steps=0)
    with pytest.raises(ValueError, match="clip_grad_norm must be a positive number"):
        Trainer(model, data, clip_grad_norm=-1)
    other = torch.optim.SGD(TinyClassifier().parameters(), lr=1)
    with pytest.raises(ValueError, match="schedules a different optimizer"):
        Trainer(model, data, lr_scheduler=torch.optim.lr_scheduler.StepLR(other, 1))


def test_generator_with_several_epochs_is_an_error_before_training(quiet):
    model = TinyClassifier()
    before = cloned_params(model)
    gen = iter(make_batches(4))
    with pytest.raises(ValueError, match="one-shot iterator.*max_epochs=2"):
        Trainer(model, gen, max_epochs=2, **quiet)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(list(gen)) == 4  # nothing was consumed
    assert not os.path.exists(quiet["log_dir"])


def test_optimizer_factory_and_validation(quiet, batches):
    trainer = Trainer(TinyClassifier(), batches,
                      optimizer=functools.partial(torch.optim.SGD, lr=0.1), **quiet)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.1

    other = TinyClassifier()
    with pytest.raises(ValueError, match="not parameters of TinyClassifier"):
        Trainer(TinyClassifier(), batches, optimizer=torch.optim.SGD(other.parameters(), lr=1),
                **quiet)
    with pytest.raises(TypeError, match="factory returned list"):
        Trainer(TinyClassifier(), batches, optimizer=lambda params: list(params), **quiet)
    with pytest.raises(TypeError, match="optimizer must be"):
        Trainer(TinyClassifier(), batches, optimizer="adam", **quiet)


def test_reduce_lr_on_plateau_is_refused_with_the_hook_to_use(batches, quiet):
    model = TinyClassifier()
    with pytest.raises(TypeError, match=r"ReduceLROnPlateau steps on a metric.*from a hook"):
        Trainer(model, batches, lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau,
                **quiet)


def test_defaults_adamw_cpu_and_fresh_run_dir(tmp_path, monkeypatch, batches):
    monkeypatch.chdir(tmp_path)
    first = Trainer(TinyClassifier(), batches, progress=False)
    second = Trainer(TinyClassifier(), batches, progress=False)
    assert isinstance(first.optimizer, torch.optim.AdamW)
    assert first.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    first.fit()
    second.fit()
    assert os.path.dirname(first.log_dir) == "runs" and first.log_dir != second.log_dir
    for trainer in (first, second):
        files = os.listdir(trainer.log_dir)
        assert "metrics.jsonl" in files
        assert any(f.startswith("events.out.tfevents") for f in files)


@pytest.mark.parametrize(("batches", "accum", "epochs", "steps", "planned"), [
    (10, 1, 2, None, 20),
    (10, 3, 2, None, 8),      # 3 + 3 + 3 + a shorter 4th step, per epoch
    (10, 1, 2, 5, 5),         # whichever comes first
    (10, 1, 1, 50, 10),
    (None, 1, 3, 7, 7),       # unknown length: max_steps alone
    (None, 1, 3, None, None),
    (0, 1, 1, None, None),    # empty, or a length that says nothing
])
def test_planned_steps(batches, accum, epochs, steps, planned):
    assert planned_steps(batches, accum, epochs, steps) == planned


def test_no_limit_means_one_epoch_except_for_a_one_shot_iterator():
    assert epoch_limit(None, None, [1, 2]) == 1
    assert epoch_limit(None, None, iter([1, 2])) is None  # until exhausted
    assert epoch_limit(None, 10, [1, 2]) is None  # max_steps alone: as many as it takes
    assert epoch_limit(4, None, [1, 2]) == 4
    assert step_limit(None) == sys.maxsize and step_limit(3) == 3
