"""lossless_trainer.loop and step: TrainerBase with a step of your own, the pieces a step
is built from, and the GAN example (examples/gan.py), resumed after a kill, alone and
under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, make_batches, read_metrics
from tensorboard.backend.event_processing import event_accumulator

from lossless_trainer import Hook, NonFiniteLossError, Trainer, TrainerBase, sharded
from lossless_trainer.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from lossless_trainer.precision import Precision

TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import gan  # noqa: E402


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class PlainStep(TrainerBase):
    """The standard step, written from the pieces a custom step reuses."""

    def __init__(self, model, data, precision: str = "32", **options) -> None:
        super().__init__(model, data, **options)
        self.precision = Precision(precision, self.device)
        self.optimizer = sgd(self.model.parameters())
        self.backward_calls = 0

    def run_step(self, batches):
        for batch in self.accumulate(batches):
            losses = self.compute_losses(batch)
            total = sum(losses.values())
            self.precision.backward(total / len(batches) if len(batches) > 1 else total)
        self.precision.unscale(self.optimizer)
        self.after_backward()
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return losses


def test_trainer_base_is_abstract_in_run_step_only(quiet):
    with pytest.raises(TypeError, match="run_step"):
        TrainerBase(TinyClassifier(), make_batches(2), **quiet)


@pytest.mark.parametrize(("precision", "accum"), [("32", 1), ("32", 3), ("bf16", 2),
                                                  ("fp16", 2)])
def test_a_step_built_from_the_pieces_equals_the_trainer(fresh, precision, accum):
    """accumulate, compute_losses, Precision and after_backward are the Trainer's own
    step: a custom step made of them trains bit for bit the same, in every precision and
    with accumulation."""
    def run(cls, **options):
        torch.manual_seed(0)
        trainer = cls(TinyClassifier(dropout=0.3), make_batches(12), precision=precision,
                      grad_accum_steps=accum, seed=1, max_epochs=2, keep_last=0,
                      **options, **fresh())
        trainer.fit()
        return trainer

    ours, theirs = run(PlainStep), run(Trainer, optimizer=sgd)
    assert ours.state.step == theirs.state.step == -(-12 // accum) * 2
    for a, b in zip(ours.model.parameters(), theirs.model.parameters()):
        assert torch.equal(a, b)
    ours_log, theirs_log = read_metrics(ours.log_dir), read_metrics(theirs.log_dir)
    assert [r["step"] for r in ours_log] == [r["step"] for r in theirs_log]
    assert all("loss/ce" in r and "lr" in r for r in ours_log)


def test_a_step_sees_the_loop_and_its_hooks(quiet):
    seen = []

    class Watch(Hook):
        def after_backward(self, trainer):
            seen.append(("after_backward", trainer.state.step))

        def after_step(self, trainer):
            seen.append(("after_step", trainer.state.step, trainer.micro_losses[-1] is
                         trainer.losses, sorted(trainer.losses)))

    PlainStep(TinyClassifier(), make_batches(2), callbacks=[Watch()], **quiet).fit()
    assert seen == [("after_backward", 0), ("after_step", 1, True, ["ce"]),
                    ("after_backward", 1), ("after_step", 2, True, ["ce"])]


def test_a_nan_a_custom_step_returns_fails_the_fit_naming_the_loss(quiet):
    class NaNStep(PlainStep):
        def run_step(self, batches):
            losses = super().run_step(batches)
            return {**losses, "penalty": torch.tensor(float("nan"))}

    with pytest.raises(NonFiniteLossError, match="'penalty' first at step 1"):
        NaNStep(TinyClassifier(), make_batches(4), log_every=2, **quiet).fit()


class Resumable(PlainStep):
    """PlainStep whose optimizer joins its checkpoints."""

    def state_dict(self):
        return {**super().state_dict(), "sgd": self.optimizer_state_dict(self.optimizer)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.load_optimizer_state_dict(self.optimizer, state["sgd"])


@pytest.mark.parametrize("cls", [Resumable, Trainer])
def test_an_fp16_step_resumes_its_scaler_exactly(tmp_path, cls):
    """The precision policy's state is the run's (TrainerBase.state_dict): an fp16 step,
    custom or standard, continued from a checkpoint ends where an uninterrupted one
    does."""
    def run(name, steps):
        torch.manual_seed(0)
        options = {"optimizer": sgd} if cls is Trainer else {}
        trainer = cls(TinyClassifier(dropout=0.3), make_batches(12), precision="fp16",
                      seed=1, max_steps=steps, log_dir=str(tmp_path / name), progress=False,
                      **options)
        trainer.fit()
        return trainer

    whole = run("whole", 10)
    run("resumed", 5)
    resumed = run("resumed", 10)
    assert resumed.resumed_from.endswith("step-000000005.pt")
    assert torch.equal(resumed.precision.scaler._scale, whole.precision.scaler._scale)
    assert torch.equal(resumed.precision.skipped_steps, whole.precision.skipped_steps)
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)


def test_a_sharded_optimizer_entry_loaded_on_its_own_is_refused(tmp_path):
    trainer = Resumable(TinyClassifier(), make_batches(4), max_steps=2, checkpoint_format="sharded",
                        log_dir=str(tmp_path / "run"), progress=False)
    trainer.fit()
    small = sharded.read_small(str(tmp_path / "run" / "checkpoints" / "step-000000002"))
    assert small["sgd"]["prefix"] == "optim:sgd/"
    with pytest.raises(CheckpointError, match="comes from a sharded checkpoint"):
        trainer.load_optimizer_state_dict(trainer.optimizer, small["sgd"])


class Shard:
    """Looks like an FSDP DTensor: a shard of a tensor."""

    placements = ()

    def to_local(self):
        return torch.zeros(1)


@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_a_shard_outside_the_model_and_optimizers_is_refused_at_save(quiet, checkpoint_format):
    class Leaky(PlainStep):
        def state_dict(self):
            return {**super().state_dict(), "extra": {"momentum": [Shard()]}}

    trainer = Leaky(TinyClassifier(), make_batches(2), checkpoint_format=checkpoint_format,
                    **quiet)
    with pytest.raises(ValueError, match="sharded tensor at /extra/momentum/0"):
        trainer.fit()
    assert list_checkpoints(trainer.checkpoint_dir) == []


def test_an_optimizer_state_below_the_top_level_is_refused_in_a_sharded_save(quiet):
    class Nested(PlainStep):
        def state_dict(self):
            return {**super().state_dict(),
                    "optimizers": {"sgd": self.optimizer_state_dict(self.optimizer)}}

    with pytest.raises(ValueError, match="not at the top level"):
        Nested(TinyClassifier(), make_batches(2), checkpoint_format="sharded", **quiet).fit()


@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_a_custom_trainers_own_state_resumes_bit_exactly(tmp_path, checkpoint_format):
    """The GAN's two optimizers join its checkpoints through `optimizer_state_dict` (in a
    sharded one, written by DCP under a prefix of their own), and a run continued from
    step 6 ends where an uninterrupted one does."""
    def run(name, **options):
        return gan.main(["--fast", "--log-dir", str(tmp_path / name)], progress=False,
                        checkpoint_format=checkpoint_format, k=2, **options)

    whole = run("whole")
    run("resumed", max_steps=6)
    resumed = run("resumed")
    assert resumed.resumed_from.endswith("step-000000006" + (".pt" * (checkpoint_format
                                                                      == "full")))
    assert resumed.state.step == whole.state.step == 12
    assert_same_gan(state_of(resumed), state_of(whole))
    newest = list_checkpoints(str(tmp_path / "whole" / "checkpoints"))[-1][1]
    if checkpoint_format == "full":
        saved = load_checkpoint(newest)
        assert {"opt_d", "opt_g", "model", "trainer"} <= set(saved)
        assert saved["opt_g"]["state"][0]["step"] == 6  # k=2: the generator every 2nd step
        assert saved["opt_d"]["state"][0]["step"] == 12
        return
    # Sharded: each optimizer's tensors in DCP's files under a prefix of its own, keyed
    # by parameter name; read back whole in one process, as export does.
    assert sharded.verify(newest) is None
    saved = sharded.read_full(newest)
    for part in ("d", "g"):  # the optimizer's parameter i is the part's i-th
        names = [f"{part}.{name}" for name, _ in getattr(whole.model, part).named_parameters()]
        entries, live = saved[f"opt_{part}"]["state"], whole.optimizers[part].state_dict()["state"]
        assert set(entries) == set(names)
        for index, name in enumerate(names):
            assert torch.equal(entries[name]["exp_avg"], live[index]["exp_avg"]), name


def state_of(trainer) -> dict:
    return {"model": trainer.model.state_dict(), "opt_d": trainer.optimizers["d"].state_dict(),
            "opt_g": trainer.optimizers["g"].state_dict()}


def assert_same_gan(ours: dict, theirs: dict) -> None:
    assert ours["model"].keys() == theirs["model"].keys()
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
    for name in ("opt_d", "opt_g"):
        assert ours[name]["state"].keys() == theirs[name]["state"].keys()
        for index, entries in theirs[name]["state"].items():
            for key, value in entries.items():
                assert torch.equal(torch.as_tensor(ours[name]["state"][index][key]),
                                   torch.as_tensor(value)), (name, index, key)


# -- the example, as a user runs it ----------------------------------------------------------


def test_the_gan_example_logs_both_losses_and_a_grid_of_samples(tmp_path):
    log_dir = tmp_path / "gan"
    result = subprocess.run([sys.executable, str(EXAMPLES / "gan.py"), "--fast",
                             "--log-dir", str(log_dir)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert f"tensorboard --logdir {log_dir}" in result.stdout
    rows = read_metrics(log_dir)
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert all({"loss/d", "loss/g", "lr/d", "lr/g"} <= set(r) for r in rows)
    guidance = {kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE}
    events = event_accumulator.EventAccumulator(os.fspath(log_dir), size_guidance=guidance)
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [4, 8, 12]
    assert {(e.width, e.height) for e in events.Images("samples")} == {(32, 32)}
    assert [int(os.path.basename(p)[5:14]) for _, p in
            list_checkpoints(str(log_dir / "checkpoints"))] == [4, 8, 12]


def gan_run(log_dir: Path, out: Path, nproc: int = 0, **env: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return subprocess.run([*launcher, str(TESTS / "gan_script.py"), str(log_dir), str(out)],
                          capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.parametrize("nproc", [0, 2], ids=["one-process", "torchrun"])
def test_the_gan_example_resumes_bit_identically_after_a_kill(tmp_path, nproc):
    """SIGKILLed in the middle of step 7 (under torchrun, rank 1), the same command
    resumes from step 4's checkpoint and ends with the uninterrupted run's weights and
    both optimizers' states."""
    reference = gan_run(tmp_path / "reference", tmp_path / "reference.pt", nproc)
    assert reference.returncode == 0, reference.stderr[-4000:]
    killed = gan_run(tmp_path / "run", tmp_path / "run.pt", nproc, KILL_AT="7")
    assert killed.returncode != 0 and not (tmp_path / "run.pt").exists()
    assert (tmp_path / "run.killed").exists()
    again = gan_run(tmp_path / "run", tmp_path / "run.pt", nproc, KILL_AT="7")
    assert again.returncode == 0, again.stderr[-4000:]
    ours = torch.load(tmp_path / "run.pt", weights_only=True)
    theirs = torch.load(tmp_path / "reference.pt", weights_only=True)
    assert ours["resumed_from"].endswith("step-000000004.pt") and ours["step"] == 12
    assert_same_gan(ours, theirs)
    ours_log = read_metrics(tmp_path / "run")
    assert [r["step"] for r in ours_log] == [4, 8, 12]  # no step written twice
    assert [r["loss/g"] for r in ours_log] == [r["loss/g"] for r in
                                               read_metrics(tmp_path / "reference")]
