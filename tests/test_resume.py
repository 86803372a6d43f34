"""lossless_trainer.resume: exact resume after a crash or a signal, data position, RNG, seeding."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, cloned_params, make_batches, read_metrics, same_params, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Hook, Trainer
from lossless_trainer.checkpoint import CheckpointError, checkpoint_path, list_checkpoints
from lossless_trainer.resume import DataCursor

# --------------------------------------------------------------------------- in real
# subprocesses: resume after SIGKILL, SIGTERM and a kill during a checkpoint write


SCRIPT = Path(__file__).with_name("resume_script.py")
FLUSH_STEPS = list(range(5, 61, 5))


def start(log_dir: Path, out: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(log_dir), str(out)],
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(log_dir: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    proc = start(log_dir, out, **env)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def checkpoint_steps(log_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (log_dir / "checkpoints").glob("step-*.pt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The same command, never interrupted."""
    root = tmp_path_factory.mktemp("reference")
    run(root / "run", root / "out.pt")
    return torch.load(root / "out.pt", weights_only=True)


def assert_identical(out: Path, reference: dict) -> None:
    final = torch.load(out, weights_only=True)
    assert final["step"] == 60 and final["stop_reason"] == "max_steps"
    assert final["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        assert torch.equal(final["model"][key], value), key
    mine, ref = final["optimizer"], reference["optimizer"]
    assert mine["param_groups"] == ref["param_groups"]
    for index, state in ref["state"].items():
        for key, value in state.items():
            assert torch.equal(mine["state"][index][key], value), (index, key)


def assert_clean_logs(log_dir: Path) -> None:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("loss/ce", "loss/total", "body/mean", "lr"):
        assert [e.step for e in events.Scalars(tag)] == FLUSH_STEPS, tag
    assert [m["step"] for m in read_metrics(log_dir)] == FLUSH_STEPS


def test_sigkill_mid_step_then_rerun_is_bit_identical(tmp_path, reference):
    log_dir, out = tmp_path / "run", tmp_path / "out.pt"
    proc = start(log_dir, out, PAUSE_AT="37")
    wait_for(log_dir / "paused", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    assert checkpoint_steps(log_dir) == [10, 20, 30]

    rerun = run(log_dir, out, PAUSE_AT="37")
    assert "resumed from" in rerun.stderr and "step-000000030.pt at step 30" in rerun.stderr
    assert_identical(out, reference)
    assert_clean_logs(log_dir)
    assert checkpoint_steps(log_dir) == [40, 50, 60]  # keep_last=3


@pytest.mark.parametrize("asynchronous", ["0", "1"])
def test_sigterm_saves_the_current_step_exits_0_and_resumes_exactly(tmp_path, reference,
                                                                    asynchronous):
    # With ASYNC=1 the last checkpoint is written in the background: fit waits for it.
    log_dir, out = tmp_path / "run", tmp_path / "out.pt"
    proc = start(log_dir, out, PAUSE_AT="23", ASYNC=asynchronous)
    wait_for(log_dir / "paused", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "SIGTERM received: stopping after the current step" in stderr
    stopped = torch.load(out, weights_only=True)
    assert (stopped["step"], stopped["stop_reason"]) == (23, "SIGTERM")
    assert checkpoint_steps(log_dir) == [10, 20, 23]

    rerun = run(log_dir, out, PAUSE_AT="23")
    assert "step-000000023.pt at step 23" in rerun.stderr
    assert_identical(out, reference)
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("loss/total")]
    assert steps == sorted(set(steps))  # no step twice (23 is the preemption's flush)
    assert set(FLUSH_STEPS) <= set(steps)


@pytest.mark.parametrize("asynchronous", ["0", "1"])
def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path, reference,
                                                                asynchronous):
    # With ASYNC=1 the write is on the background thread while training goes on.
    log_dir, out = tmp_path / "run", tmp_path / "out.pt"
    proc = start(log_dir, out, SLOW_SAVE_AT="20", ASYNC=asynchronous)
    wait_for(log_dir / "saving", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    files = sorted(p.name for p in (log_dir / "checkpoints").iterdir())
    assert files[-1] == "step-000000010.pt" and files[0].startswith(".tmp-")  # half-written

    rerun = run(log_dir, out)
    assert "step-000000010.pt at step 10" in rerun.stderr
    assert not any(p.name.startswith(".tmp-") for p in (log_dir / "checkpoints").iterdir())
    assert_identical(out, reference)
    assert_clean_logs(log_dir)


# --------------------------------------------------------------------------- in-process


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


def test_seed_makes_runs_repeatable(fresh):
    loader = DataLoader(TensorDataset(torch.randn(32, 16), torch.randint(0, 4, (32,))),
                        batch_size=8, shuffle=True)

    def run(seed):
        torch.manual_seed(0)
        model = TinyClassifier(dropout=0.5)
        Trainer(model, loader, seed=seed, max_epochs=2, **fresh()).fit()
        return cloned_params(model)

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# --------------------------------------------------------------------------- signals


def test_first_sigint_stops_cleanly_with_a_checkpoint(tmp_path):
    class Interrupt(Hook):
        def after_step(self, trainer):
            if trainer.state.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    trainer, _ = train(tmp_path, callbacks=[Interrupt()])
    assert (trainer.state.step, trainer.state.stop_reason) == (3, "SIGINT")
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [3]


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


def test_the_open_epoch_is_continued_until_it_ends():
    cursor = DataCursor([1, 2, 3])
    assert not cursor.open
    first = cursor.batches(epoch=0, consumed=0)
    assert cursor.open and next(first) == 1
    assert cursor.batches(epoch=0, consumed=1) is first  # the same iterator, continued
    assert list(first) == [2, 3]
    cursor.end_epoch()
    assert not cursor.open and list(cursor.batches(epoch=1, consumed=0)) == [1, 2, 3]


def test_a_loaded_position_skips_the_consumed_batches_with_the_epochs_rng():
    dataset = TensorDataset(torch.arange(12.0))
    loader = DataLoader(dataset, batch_size=2, shuffle=True,
                        generator=torch.Generator().manual_seed(5))
    cursor = DataCursor(loader)
    torch.manual_seed(1)
    epoch = cursor.batches(epoch=0, consumed=0)
    taken = [next(epoch)[0].tolist() for _ in range(2)]
    saved = cursor.state_dict()
    rest = [b[0].tolist() for b in epoch]
    after = torch.rand(1)

    again = DataCursor(DataLoader(dataset, batch_size=2, shuffle=True,
                                  generator=torch.Generator().manual_seed(99)))
    again.load_state_dict(saved)
    torch.manual_seed(1234)  # whatever happens between loading and the next epoch
    assert [b[0].tolist() for b in again.batches(epoch=0, consumed=2)] == rest
    assert torch.equal(torch.rand(1), after)  # and the RNG continues as it did
    assert len(taken) == 2 and saved["data"] is None


def test_rng_kept_undoes_every_draw_of_the_block():
    loader = DataLoader(TensorDataset(torch.arange(4.0)), shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    cursor = DataCursor(loader)
    before = (torch.get_rng_state(), random.getstate(), loader.generator.get_state())
    with cursor.rng_kept():
        torch.rand(3), random.random(), torch.rand(1, generator=loader.generator)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert torch.equal(loader.generator.get_state(), before[2])


def test_load_state_dict_between_fits_resumes_where_the_state_says(quiet):
    """A state loaded after a fit left its epoch open must not continue that epoch."""
    batches = make_batches(10)
    saved = {}
    seen: list[int] = []

    class Snapshot(Hook):
        def before_step(self, trainer):
            seen.append(next(i for i, b in enumerate(batches) if b is trainer.batch))

        def after_step(self, trainer):
            if trainer.state.step == 1:
                saved["state"] = trainer.state_dict()

    trainer = Trainer(TinyClassifier(), batches, max_steps=3, callbacks=[Snapshot()],
                      **quiet)
    trainer.fit()
    trainer.load_state_dict(saved["state"])
    trainer.max_steps = 5
    trainer.fit()
    assert seen == [0, 1, 2, 1, 2, 3, 4]
    assert trainer.state.step == 5
