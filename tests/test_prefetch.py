"""Device prefetch (prefetch.py): the ordering logic, with the CUDA streams stood in for.

On CPU nothing is prefetched; here a stand-in `Streams` records every copy and wait, so
the tests can check what the fit loop does with them: when a batch's copy starts, that
the step waits for it before any hook or forward reads it, and that training and resume
are exactly what they are without prefetching.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier, make_batches
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Hook, Trainer
from lossless_trainer.prefetch import DevicePrefetch


class RecordingStreams:
    """Copies a batch by cloning it; logs ("copy", n) and ("wait", n) in `log`."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.waited: set[int] = set()  # ids of moved batches the step waits for
        self.count = 0

    def copy(self, batch):
        self.count += 1
        self.log.append(("copy", self.count))
        return pytree.tree_map_only(torch.Tensor, torch.clone, batch), self.count

    def wait(self, moved, token):
        self.log.append(("wait", token))
        self.waited.add(id(moved))


class Taken:
    """An iterable of batches that logs ("take", n) as each is taken."""

    def __init__(self, batches, log: list) -> None:
        self.batches, self.log = batches, log

    def __iter__(self):
        for i, batch in enumerate(self.batches, 1):
            self.log.append(("take", i))
            yield batch

    def __len__(self):
        return len(self.batches)


class Checks(TinyClassifier):
    """Fails a forward on a batch the step did not wait for."""

    streams: RecordingStreams

    def forward(self, batch):
        if self.training:
            assert id(batch) in self.streams.waited, "forward before the copy's wait"
        return super().forward(batch)


class StepLog(Hook):
    def __init__(self, log: list, streams: RecordingStreams) -> None:
        self.log, self.streams = log, streams

    def before_step(self, trainer):
        assert all(id(b) in self.streams.waited for b in trainer.micro_batches)
        self.log.append(("step", trainer.state.step + 1))

    def after_step(self, trainer):
        self.log.append(("end", trainer.state.step))


def prefetching(trainer: Trainer, log: list) -> RecordingStreams:
    streams = RecordingStreams(log)
    trainer._prefetch = DevicePrefetch(trainer.device, True, streams=streams)
    return streams


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


@pytest.mark.parametrize("accum", [1, 3])
def test_each_copy_starts_as_its_batch_is_taken_and_the_step_waits_first(quiet, accum):
    log: list = []
    model, steps = Checks(), StepLog(log, None)
    trainer = Trainer(model, Taken(make_batches(6), log), grad_accum_steps=accum,
                      optimizer=sgd, keep_last=0, callbacks=[steps], **quiet)
    model.streams = steps.streams = prefetching(trainer, log)
    trainer.fit()
    events = [e for e in log if e[0] in ("take", "copy", "wait", "step", "end")]
    expected = []
    for step in range(1, 6 // accum + 1):
        batches = range((step - 1) * accum + 1, step * accum + 1)
        for i in batches:  # taken when the loop needs them, no earlier: copied at once
            expected += [("take", i), ("copy", i)]
        expected += [("wait", i) for i in batches]  # before the hooks and forwards
        expected += [("step", step), ("end", step)]
    assert events == expected


def test_prefetched_training_and_resume_equal_plain_training(fresh):
    """Bit-identical weights with and without prefetch, also across a resume, with
    shuffled in-process loading and dropout drawing from the RNG."""
    data = TensorDataset(torch.randn(48, 16), torch.randint(0, 4, (48,)))

    def run(steps, prefetch, kwargs, model=None):
        torch.manual_seed(0)
        model = model or TinyClassifier(dropout=0.3)
        loader = DataLoader(data, batch_size=4, shuffle=True)
        trainer = Trainer(model, loader, max_steps=steps, seed=1, optimizer=sgd, **kwargs)
        if prefetch:
            prefetching(trainer, [])
        trainer.fit()
        return trainer

    plain = run(20, False, fresh())
    straight = run(20, True, fresh())
    run_dir = fresh()
    run(7, True, run_dir)  # stops mid-epoch, its checkpoint at step 7
    resumed = run(20, True, run_dir)
    assert resumed.resumed_from is not None and resumed.state.step == 20
    for other in (straight, resumed):
        for (name, p), q in zip(plain.model.named_parameters(), other.model.parameters()):
            assert torch.equal(p, q), name


def test_a_later_fit_continues_with_the_next_batch(quiet):
    log: list = []
    trainer = Trainer(TinyClassifier(), Taken(make_batches(8), log), max_steps=3,
                      optimizer=sgd, keep_last=0, **quiet)
    prefetching(trainer, log)
    trainer.fit()
    trainer.max_steps = 8
    trainer.fit()
    assert [e for e in log if e[0] == "take"] == [("take", i) for i in range(1, 9)]


def test_ready_drops_stale_copies_and_passes_other_batches():
    log: list = []
    streams = RecordingStreams(log)
    prefetch = DevicePrefetch(torch.device("cpu"), True, streams=streams)
    first, second, third = prefetch.batches(iter([torch.zeros(1), torch.ones(1),
                                                  torch.full((1,), 2.0)]))
    stranger = torch.zeros(1)
    prefetch.ready([stranger])  # not one of its copies: nothing waited, nothing dropped
    assert [e for e in log if e[0] == "wait"] == []
    prefetch.ready([third])  # the first two were never trained on (a failed step)
    assert [e for e in log if e[0] == "wait"] == [("wait", 3)]
    prefetch.ready([first, second])  # already dropped: nothing to wait for
    assert [e for e in log if e[0] == "wait"] == [("wait", 3)]


def test_prefetch_does_nothing_on_cpu_and_checks_its_option(quiet):
    for enabled in ("auto", True, False):
        prefetch = DevicePrefetch(torch.device("cpu"), enabled)
        assert not prefetch.active
        batches = iter(make_batches(2))
        assert prefetch.batches(batches) is batches
    assert not Trainer(TinyClassifier(), make_batches(2), **quiet)._prefetch.active
    with pytest.raises(ValueError, match="prefetch must be 'auto', True or False, got 'yes'"):
        Trainer(TinyClassifier(), make_batches(2), prefetch="yes", **quiet)
    with pytest.raises(ValueError, match="prefetch must be"):
        Trainer(TinyClassifier(), make_batches(2), prefetch=1, **quiet)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prefetch_trains_like_plain_copies(fresh):
    """On a real GPU: pinned side-stream copies give the same weights as plain ones."""
    def run(prefetch):
        torch.manual_seed(0)
        trainer = Trainer(TinyClassifier(), make_batches(12), optimizer=sgd, device="cuda",
                          prefetch=prefetch, keep_last=0, **fresh())
        assert trainer._prefetch.active == prefetch
        trainer.fit()
        return trainer.model

    plain, prefetched = run(False), run(True)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), prefetched.parameters()))


