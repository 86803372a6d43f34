"""Checkpoint files and resume logic, in-process: fallbacks, safety, state round trips."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import TinyClassifier, make_batches, read_metrics
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Hook, NonFiniteLossError, Trainer
from lossless_trainer.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    save_atomic,
)
from lossless_trainer.writers import JSONLinesWriter


def loader(num_workers: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(60, 16, generator=g), torch.randint(0, 4, (60,), generator=g))
    # 8 batches, the last one short
    return DataLoader(data, batch_size=8, shuffle=True, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


def train(log_dir, max_steps=24, num_workers=0, **kwargs) -> tuple[Trainer, TinyClassifier]:
    torch.manual_seed(0)
    model = TinyClassifier(dropout=0.3)
    options = {"checkpoint_every": 6, "log_every": 4, "seed": 1, "progress": False,
               "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-2), **kwargs}
    trainer = Trainer(model, loader(num_workers), max_steps=max_steps, log_dir=str(log_dir),
                      **options)
    trainer.fit()
    return trainer, model


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs, by number of DataLoader workers (which changes RNG use)."""
    cache: dict[int, tuple[TinyClassifier, list[dict]]] = {}

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


@pytest.mark.parametrize("num_workers", [0, 2])
def test_crash_mid_window_resumes_with_identical_weights_and_logs(tmp_path, references,
                                                                  num_workers):
    """A crash in step 10: the checkpoint of step 6 sits inside the summary window 5..8."""

    class CrashOnce(Hook):
        crashed = False

        def before_step(self, trainer):
            if trainer.state.step == 9 and not CrashOnce.crashed:
                CrashOnce.crashed = True
                raise RuntimeError("node failure")

    with pytest.raises(RuntimeError, match="node failure"):
        train(tmp_path, callbacks=[CrashOnce()], num_workers=num_workers)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [6]
    # the partial window (step 9) was not lost, and is logged at the last completed step
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [4, 8, 9]

    trainer, model = train(tmp_path, callbacks=[CrashOnce()], num_workers=num_workers)
    assert trainer.resumed_from.endswith("step-000000006.pt")
    ref_model, ref_metrics = references(num_workers)
    assert same_params(model, ref_model)
    metrics = read_metrics(str(tmp_path))
    assert [m["step"] for m in metrics] == [m["step"] for m in ref_metrics] == [4, 8, 12, 16,
                                                                                20, 24]
    for mine, ref in zip(metrics, ref_metrics):
        assert mine["loss/ce"] == ref["loss/ce"] and mine["loss/total"] == ref["loss/total"]


def test_truncated_newest_checkpoint_warns_and_falls_back(tmp_path, uninterrupted):
    train(tmp_path, max_steps=18)
    newest = checkpoint_path(str(tmp_path / "checkpoints"), 18)
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.warns(UserWarning, match=r"step-000000018\.pt cannot be loaded.*falling back"):
        trainer, model = train(tmp_path)
    assert trainer.resumed_from.endswith("step-000000012.pt")
    assert same_params(model, uninterrupted[0])


class Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    train(tmp_path, max_steps=6)
    marker = tmp_path / "pwned"
    evil = checkpoint_path(str(tmp_path / "checkpoints"), 99)
    torch.save({"format": 1, "payload": Evil(str(marker))}, evil)
    with pytest.warns(UserWarning, match=r"step-000000099\.pt cannot be loaded"):
        trainer, _ = train(tmp_path, max_steps=12)
    assert trainer.resumed_from.endswith("step-000000006.pt")
    with pytest.raises(CheckpointError, match="step-000000099.pt cannot be loaded"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        Trainer(TinyClassifier(), make_batches(2), resume=evil, progress=False,
                log_dir=str(tmp_path / "other")).fit()
    assert not marker.exists()


def test_no_valid_checkpoint_at_all_is_a_clear_error(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "step-000000005.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError,
                                                  match="no valid checkpoint in .*move .* aside"):
        train(tmp_path)


def test_resume_options(tmp_path):
    train(tmp_path / "a", max_steps=6)
    with pytest.raises(ValueError, match="resume=False but .* already holds 1 checkpoint"):
        train(tmp_path / "a", resume=False)
    source = checkpoint_path(str(tmp_path / "a" / "checkpoints"), 6)
    trainer, _ = train(tmp_path / "b", max_steps=8, resume=source)
    assert trainer.resumed_from == source and trainer.state.step == 8
    with pytest.raises(ValueError, match="resume must be 'auto', False or a checkpoint path"):
        Trainer(TinyClassifier(), make_batches(1), resume=True)
    # a finished run resumed with the same limits has nothing left to do
    trainer, _ = train(tmp_path / "a", max_steps=6)
    assert trainer.state.step == 6 and trainer.state.stop_reason == "max_steps"


def test_checkpoint_of_another_model_names_the_file(tmp_path):
    train(tmp_path, max_steps=6)

    class Wider(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(32, 7)

    with pytest.raises(CheckpointError, match=r"step-000000006\.pt does not fit this run"):
        Trainer(Wider(), make_batches(2), log_dir=str(tmp_path), progress=False).fit()


class Counter(Hook):
    def __init__(self) -> None:
        self.count = 0

    def after_step(self, trainer):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_hook_state_round_trips_for_two_hooks_of_one_class(tmp_path):
    first, second = Counter(), Counter()
    first.count = 100
    train(tmp_path, max_steps=6, callbacks=[first, second])
    state = load_checkpoint(checkpoint_path(str(tmp_path / "checkpoints"), 6))
    assert state["hooks"]["Counter"] == {"count": 106}
    assert state["hooks"]["Counter#2"] == {"count": 6}
    again = [Counter(), Counter()]
    train(tmp_path, max_steps=8, callbacks=again)
    assert [h.count for h in again] == [108, 8]


def test_stateful_data_restores_its_own_position(tmp_path):
    class Stateful:
        def __init__(self):
            self.batches = make_batches(10)
            self.position = 0
            self.loaded = None

        def __iter__(self):
            while self.position < len(self.batches):
                self.position += 1
                yield self.batches[self.position - 1]
            self.position = 0

        def __len__(self):
            return len(self.batches)

        def state_dict(self):
            return {"position": self.position}

        def load_state_dict(self, state):
            self.loaded = state
            self.position = state["position"]

    data = Stateful()
    Trainer(TinyClassifier(), data, max_steps=4, log_dir=str(tmp_path), progress=False).fit()
    resumed = Stateful()
    trainer = Trainer(TinyClassifier(), resumed, max_steps=7, log_dir=str(tmp_path),
                      progress=False)
    trainer.fit()
    assert resumed.loaded == {"position": 4}
    assert trainer.state.step == 7 and trainer.state.batch_in_epoch == 7


def test_save_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "step-000000001.pt")
    save_atomic({"format": 1, "value": torch.ones(2)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"format": 1, "value": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["value"], torch.ones(2))
    assert os.listdir(tmp_path) == ["step-000000001.pt"]  # the temporary file is gone


def test_jsonl_is_truncated_to_the_resumed_step_and_torn_lines_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "a": 1}\n{"step": 10, "a": 2}\n{"step": 15, "a": 3}\n{"st')
    JSONLinesWriter(path, keep_until=10).close()
    assert path.read_text() == '{"step": 5, "a": 1}\n{"step": 10, "a": 2}\n'


def test_second_sigint_aborts_without_a_checkpoint(tmp_path):
    class Interrupt(Hook):
        def after_step(self, trainer):
            if trainer.state.step == 3:
                os.kill(os.getpid(), signal.SIGINT)
            if trainer.state.step == 3 and trainer.stop_requested:
                os.kill(os.getpid(), signal.SIGINT)

    # Whatever handled SIGINT before (Python's default; SIG_IGN in a background job).
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="second signal"):
        train(tmp_path, callbacks=[Interrupt()])
    assert list_checkpoints(str(tmp_path / "checkpoints")) == []
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_first_sigint_stops_cleanly_with_a_checkpoint(tmp_path):
    class Interrupt(Hook):
        def after_step(self, trainer):
            if trainer.state.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    trainer, _ = train(tmp_path, callbacks=[Interrupt()])
    assert (trainer.state.step, trainer.state.stop_reason) == (3, "SIGINT")
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [3]


def test_nan_weights_are_never_checkpointed(tmp_path):
    class Poison(Hook):
        def after_step(self, trainer):
            if trainer.state.step == 8:
                with torch.no_grad():
                    trainer.model.head.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"parameters became NaN or Inf by step 12 "
                                                 r"\(.*head.weight.*\); no checkpoint is saved"):
        train(tmp_path, callbacks=[Poison()], log_every=50)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [6]


def test_resuming_sets_newer_checkpoints_aside_and_never_prunes_the_new_one(tmp_path):
    train(tmp_path, max_steps=12, keep_last=5)
    older = checkpoint_path(str(tmp_path / "checkpoints"), 6)
    trainer, _ = train(tmp_path, max_steps=9, resume=older, keep_last=1)
    assert trainer.resumed_from == older
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [9]
    assert (tmp_path / "checkpoints" / "step-000000012.pt.superseded").exists()


def test_resume_at_an_epoch_boundary_restores_the_loaders_generator(tmp_path):
    """Stopped by a hook right after an epoch ends: the next epoch's order must match."""

    def seeded_loader():
        g = torch.Generator().manual_seed(3)
        data = TensorDataset(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,)))
        return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator())

    def run(log_dir, hooks=()):
        torch.manual_seed(0)
        model = TinyClassifier(dropout=0.3)
        Trainer(model, seeded_loader(), max_epochs=3, seed=1, log_dir=str(log_dir),
                progress=False, callbacks=list(hooks)).fit()
        return model

    class StopAfterFirstEpoch(Hook):
        def after_epoch(self, trainer):
            if trainer.state.epoch == 1:
                trainer.request_stop("pause")

    reference = run(tmp_path / "ref")
    run(tmp_path / "run", [StopAfterFirstEpoch()])
    resumed = run(tmp_path / "run")
    assert same_params(resumed, reference)


def test_before_epoch_is_not_repeated_when_resuming_mid_epoch(tmp_path):
    calls: list[tuple[int, int]] = []

    class Epochs(Hook):
        def before_epoch(self, trainer):
            calls.append((trainer.state.epoch, trainer.state.step))

    train(tmp_path, max_steps=10, callbacks=[Epochs()])  # epochs start at steps 0 and 8
    train(tmp_path, max_steps=20, callbacks=[Epochs()])  # resumes at step 10, mid-epoch 1
    assert calls == [(0, 0), (1, 8), (2, 16)]


def test_calling_fit_again_continues_the_open_epoch(tmp_path):
    torch.manual_seed(0)
    seen: list[int] = []

    class Remember(Hook):
        def before_step(self, trainer):
            seen.append(int(trainer.batch[0][0, 0] * 1e6))

    batches = make_batches(10)
    trainer = Trainer(TinyClassifier(), batches, max_steps=7, log_dir=str(tmp_path),
                      progress=False, callbacks=[Remember()])
    trainer.fit()
    trainer.max_steps = 14
    trainer.fit()
    expected = [int(b[0][0, 0] * 1e6) for b in batches]
    assert seen == expected + expected[:4]
    assert (trainer.state.epoch, trainer.state.batch_in_epoch) == (1, 4)


def test_a_failed_resume_is_retried_not_skipped(tmp_path):
    train(tmp_path, max_steps=6)

    class Other(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    trainer = Trainer(Other(), make_batches(4), log_dir=str(tmp_path), progress=False)
    for _ in range(2):
        with pytest.raises(CheckpointError, match="does not fit this run"):
            trainer.fit()
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [4, 6]  # log intact


def test_writers_are_closed_even_if_teardown_is_interrupted(tmp_path):
    class Abort(Hook):
        def after_train(self, trainer):
            raise KeyboardInterrupt

    trainer = Trainer(TinyClassifier(), make_batches(3), log_dir=str(tmp_path), progress=False,
                      callbacks=[Abort()])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.writers is None
    assert not any(t.name == "lossless_trainer-writer" and t.is_alive()
                   for t in __import__("threading").enumerate())
