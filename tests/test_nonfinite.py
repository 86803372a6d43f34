"""When the loss goes NaN (#27): the record a failing fit leaves, the replay of the
failing step from the checkpoint before it, and the report with the step's batches and
the operation that made the NaN."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lossless_trainer import Model, NonFiniteLossError, Trainer
from lossless_trainer.checkpoint import list_checkpoints
from lossless_trainer.nonfinite import REPLAY

HERE = Path(__file__).resolve()


class Regression(Model):
    """A linear regression (``mse``), with what `extra` adds; predictions in eval mode.
    A plain one: the test's schedule sends its weights to Inf, with finite losses and
    gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, batch):
        x, y = batch
        if not self.training:
            return self.lin(x)
        return {"mse": F.mse_loss(self.lin(x), y), **self.extra(x)}

    def extra(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


class LogOfFeature(Regression):
    """A second loss that takes the log of a shifted input feature: finite unless a
    batch holds a feature below -10, which makes that loss NaN in the forward (at
    `torch.log`, on the line marked below)."""

    def extra(self, x):
        shifted = (x[:, 0] + 10.0) * (self.lin.bias.abs() + 1.0)
        return {"log": torch.log(shifted).mean() * 1e-3}  # NaN HERE


class LengthOfRow(Regression):
    """Finite losses whose gradient goes NaN: the length of a weight row, scaled by zero
    when a batch holds a feature below -10. The forward is finite (sqrt(0) is 0), but
    sqrt's backward divides by it: an Inf, which the square's backward makes NaN."""

    def extra(self, x):
        row = self.lin.weight[0] * (1.0 - (x[:, 0] < -10).any().float())
        return {"length": 1e-3 * row.square().sum().sqrt()}  # GRAD HERE


def batches(n: int = 12, bad: int | None = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` batches of 8; the `bad`-th (1-based) holds a feature below -10."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(1, n + 1):
        x = torch.randn(8, 4, generator=g)
        if i == bad:
            x[3, 0] = -50.0
        out.append((x, x.sum(1, keepdim=True)))
    return out


def run(log_dir: Path, model_class=LogOfFeature, **options) -> Trainer:
    torch.manual_seed(0)
    options.setdefault("checkpoint_every", 3)
    options.setdefault("log_every", 5)
    return Trainer(model_class(), batches(), log_dir=str(log_dir), progress=False,
                   seed=1, **options)


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of the run outside ``nonfinite/``, by path, with its content's hash."""
    found = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and "nonfinite" not in path.relative_to(run_dir).parts \
                and path.name != ".lossless_trainer.lock":
            found[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_a_failing_fit_records_the_step_and_ends_with_the_replay_command(tmp_path):
    with pytest.raises(NonFiniteLossError) as caught:
        run(tmp_path).fit()
    message = str(caught.value)
    assert "'log' first at step 7" in message
    assert message.splitlines()[-1].endswith(  # the command as Python received it
        "and save its batch and the operation that failed: " + f"{REPLAY}=1 "
        + shlex.join(sys.orig_argv))
    assert f"from checkpoint {tmp_path / 'checkpoints' / 'step-000000006.pt'}" in message
    record = json.loads((tmp_path / "nonfinite" / "failure.json").read_text())
    assert record["step"] == 7 and record["losses"] == ["log"]
    assert record["checkpoint"].endswith("step-000000006.pt") and record["ranks"] == []


def test_the_replay_writes_the_batch_and_the_forward_operation_and_changes_nothing(
        tmp_path, monkeypatch, capsys):
    with pytest.raises(NonFiniteLossError):
        run(tmp_path).fit()
    before = snapshot(tmp_path)
    monkeypatch.setenv(REPLAY, "1")
    trainer = run(tmp_path)
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit()
    assert trainer.resumed_from.endswith("step-000000006.pt")
    report_path = tmp_path / "nonfinite" / "step-7" / "report.json"
    assert f"the report, with the step's batches and the operation that produced it, is " \
           f"{report_path}" in str(caught.value)
    assert caught.value.first_steps == {"log": 7}
    report = json.loads(report_path.read_text())
    assert report["step"] == 7 and report["rank"] == 0 and report["micro_batch"] == 0
    assert report["what"] == "loss" and report["nonfinite_losses"] == ["log"]
    assert report["losses"]["log"] == "nan" and isinstance(report["losses"]["mse"], float)
    operation = report["first_operation"]
    assert operation["phase"] == "forward" and operation["operation"] == "log"
    assert operation["where"][-1].startswith(f"{HERE}:")
    assert operation["where"][-1].endswith("# NaN HERE")
    saved = torch.load(report_path.parent / "batch-r0-m0.pt", weights_only=True)
    x, y = batches()[6]
    assert isinstance(saved, tuple) and torch.equal(saved[0], x) and torch.equal(saved[1], y)
    # The run itself: not a byte changed, no checkpoint written, pruned or set aside.
    printed = capsys.readouterr().out
    assert "[lossless_trainer] replay: step 7, rank 0, micro-batch 0: non-finite loss (log)" \
        in printed and "first operation: log in the forward, at " in printed
    assert snapshot(tmp_path) == before
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [3, 6, 9]
    assert (tmp_path / "nonfinite" / "replay-of-step-7" / "metrics.jsonl").exists()


def test_a_gradient_that_goes_nan_under_finite_losses_names_the_parameter_and_the_backward(
        tmp_path, monkeypatch):
    """The NaN gradient of step 7 makes the weights, then step 8's losses, NaN: the run
    fails at step 8, the replay stops at step 7 and names sqrt's backward and the
    forward line it came from."""
    with pytest.raises(NonFiniteLossError) as caught:
        run(tmp_path, LengthOfRow).fit()
    assert "first at step 8" in str(caught.value)
    monkeypatch.setenv(REPLAY, "1")
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at step 7"):
        run(tmp_path, LengthOfRow).fit()
    report = json.loads((tmp_path / "nonfinite" / "step-7" / "report.json").read_text())
    assert report["what"] == "gradient" and report["nonfinite_losses"] == []
    assert report["nonfinite_gradients"] == ["lin.weight"]
    operation = report["first_operation"]
    assert operation["phase"] == "backward"
    assert operation["operation"] == "SqrtBackward0" and operation["kernel"] == "div"
    assert operation["where"][-1].endswith("# GRAD HERE")


def test_finite_check_step_writes_the_report_at_once(tmp_path):
    with pytest.raises(NonFiniteLossError) as caught:
        run(tmp_path, finite_check="step").fit()
    report_path = tmp_path / "nonfinite" / "step-7" / "report.json"
    assert f"The report of step 7, with its batches, is in {report_path}" in str(caught.value)
    report = json.loads(report_path.read_text())
    assert report["nonfinite_losses"] == ["log"]
    assert report["first_operation"]["operation"] == "log"
    assert torch.equal(torch.load(report_path.parent / "batch-r0-m0.pt",
                                  weights_only=True)[0], batches()[6][0])


def test_a_failure_that_does_not_reproduce_says_so_and_why(tmp_path, monkeypatch):
    with pytest.raises(NonFiniteLossError):
        run(tmp_path).fit()
    monkeypatch.setenv(REPLAY, "1")
    torch.manual_seed(0)
    clean = Trainer(LogOfFeature(), batches(bad=None), log_dir=str(tmp_path), progress=False,
                    seed=1, checkpoint_every=3, log_every=5)  # the data changed since
    with pytest.raises(RuntimeError, match="the failure did not reproduce: the replay of .* "
                                           "reached step 7 .*data that changed since"):
        clean.fit()


def test_a_replay_without_a_recorded_failure_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(REPLAY, "1")
    with pytest.raises(ValueError, match="failure.json does not exist: only a run that "
                                         "failed on a non-finite value can be replayed"):
        run(tmp_path)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_with_accumulation_the_report_names_the_micro_batch(tmp_path, monkeypatch):
    """Steps of 3 micro-batches: the 7th batch is the first of step 3."""
    with pytest.raises(NonFiniteLossError, match="first at step 3"):
        run(tmp_path, grad_accum_steps=3, checkpoint_every=2, log_every=4).fit()
    monkeypatch.setenv(REPLAY, "1")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        run(tmp_path, grad_accum_steps=3, checkpoint_every=2, log_every=4).fit()
    where = tmp_path / "nonfinite" / "step-3"
    report = json.loads((where / "report.json").read_text())
    assert report["micro_batch"] == 0 and report["batches"] == [
        "batch-r0-m0.pt", "batch-r0-m1.pt", "batch-r0-m2.pt"]
    for i, batch in enumerate(batches()[6:9]):
        assert torch.equal(torch.load(where / f"batch-r0-m{i}.pt", weights_only=True)[0],
                           batch[0])
    assert report["first_operation"]["operation"] == "log"


def test_weights_that_become_non_finite_are_reported_naming_the_parameters(
        tmp_path, monkeypatch):
    def blowing(log_dir):
        torch.manual_seed(0)
        return Trainer(Regression(), batches(bad=None), log_dir=str(log_dir), progress=False,
                       seed=1, checkpoint_every=3, log_every=5,
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
                       lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
                           o, lambda s: 3e40 if s == 6 else 1.0))  # lr 3e38 at step 7

    with pytest.raises(NonFiniteLossError):
        blowing(tmp_path).fit()
    monkeypatch.setenv(REPLAY, "1")
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights at step 7 in the "
                                                 r"replay \(lin.weight"):
        blowing(tmp_path).fit()
    report = json.loads((tmp_path / "nonfinite" / "step-7" / "report.json").read_text())
    assert report["what"] == "weights" and "lin.weight" in report["nonfinite_weights"]
    assert report["nonfinite_losses"] == [] and "first_operation" not in report


class Custom(__import__("lossless_trainer").TrainerBase):
    """A custom step: one SGD over the model, fp32."""

    def __init__(self, model, data, **options):
        super().__init__(model, data, **options)
        self.sgd = torch.optim.SGD(self.model.parameters(), lr=0.01)

    def run_step(self, batches):
        for batch in self.accumulate(batches):
            losses = self.compute_losses(batch)
            sum(losses.values()).backward()
        self.after_backward()
        self.sgd.step()
        self.sgd.zero_grad()
        return losses

    def state_dict(self):
        return {**super().state_dict(), "sgd": self.sgd.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.sgd.load_state_dict(state["sgd"])


def test_a_custom_trainer_gets_the_record_and_the_replay(tmp_path, monkeypatch):
    def custom(log_dir):
        torch.manual_seed(0)
        return Custom(LogOfFeature(), batches(), log_dir=str(log_dir), progress=False,
                      seed=1, checkpoint_every=3, log_every=5)

    with pytest.raises(NonFiniteLossError, match=f"{REPLAY}=1 "):
        custom(tmp_path).fit()
    monkeypatch.setenv(REPLAY, "1")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 7"):
        custom(tmp_path).fit()
    report = json.loads((tmp_path / "nonfinite" / "step-7" / "report.json").read_text())
    assert report["first_operation"]["where"][-1].endswith("# NaN HERE")


def test_a_dataloader_with_workers_replays_the_same_batch(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.cat([b[0] for b in batches()])
    y = torch.cat([b[1] for b in batches()])

    def loaded(log_dir):
        torch.manual_seed(0)
        loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, num_workers=2,
                            generator=torch.Generator().manual_seed(5))
        return Trainer(LogOfFeature(), loader, log_dir=str(log_dir), progress=False, seed=1,
                       checkpoint_every=3, log_every=12, max_epochs=2)

    with pytest.raises(NonFiniteLossError) as caught:
        loaded(tmp_path).fit()
    step = min(caught.value.first_steps.values())
    monkeypatch.setenv(REPLAY, "1")
    with pytest.raises(NonFiniteLossError, match=f"non-finite loss at step {step} "):
        loaded(tmp_path).fit()
    saved = torch.load(tmp_path / "nonfinite" / f"step-{step}" / "batch-r0-m0.pt",
                       weights_only=True)
    assert (saved[0][:, 0] < -10).any()  # the batch that holds the bad feature


def test_compile_replays_with_the_eager_model(tmp_path, monkeypatch):
    with pytest.raises(NonFiniteLossError):
        run(tmp_path, compile=True).fit()
    monkeypatch.setenv(REPLAY, "1")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 7"):
        run(tmp_path, compile=True).fit()
    report = json.loads((tmp_path / "nonfinite" / "step-7" / "report.json").read_text())
    assert report["first_operation"]["operation"] == "log"
    assert report["first_operation"]["where"][-1].endswith("# NaN HERE")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_under_torchrun_each_rank_saves_its_batch_and_the_report_names_the_failing_rank(
        tmp_path, strategy):
    """Under FSDP every rank runs the micro-batch again at once, for the all-gathers."""
    import subprocess

    def torchrun(**env):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", str(HERE.parent / "nonfinite_script.py"),
             str(tmp_path / "run")], capture_output=True, text=True, timeout=240,
            check=False, env={**os.environ, "OMP_NUM_THREADS": "1", "STRATEGY": strategy,
                              **env})

    failed = torchrun()
    assert failed.returncode != 0
    error = (tmp_path / "error-r0.txt").read_text()
    assert "'log' first at step 5 on rank 1" in error
    assert "LOSSLESS_TRAINER_REPLAY=1 " in error and "--nproc_per_node=2" in error
    assert error.splitlines()[-1].endswith(f"nonfinite_script.py {tmp_path / 'run'}")
    record = json.loads((tmp_path / "run" / "nonfinite" / "failure.json").read_text())
    assert record["step"] == 5 and record["ranks"] == [1]
    assert record["checkpoint"].endswith(  # under FSDP a sharded checkpoint: a directory
        "step-000000004" + (".pt" if strategy == "ddp" else ""))
    replayed = torchrun(**{REPLAY: "1"})
    assert replayed.returncode != 0
    where = tmp_path / "run" / "nonfinite" / "step-5"
    report = json.loads((where / "report.json").read_text())
    assert report["rank"] == 1 and report["failed_ranks"] == [1]
    assert report["first_operation"]["operation"] == "log"
    assert sorted(p.name for p in where.glob("batch-*.pt")) == ["batch-r0-m0.pt",
                                                                "batch-r1-m0.pt"]
    assert (torch.load(where / "batch-r1-m0.pt", weights_only=True)[0][:, 0] < -10).any()
    assert "non-finite value at step 5 in the replay (on another rank)" in (
        tmp_path / "error-r0.txt").read_text()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_replays_and_fp16_skipped_steps_are_not_failures(
        tmp_path, monkeypatch, precision):
    """fp16's first steps overflow and are skipped by the GradScaler: the replay (from
    the start: no checkpoint was written) passes them and stops at step 7's NaN loss."""
    with pytest.raises(NonFiniteLossError, match="first at step 7"):
        run(tmp_path, precision=precision, checkpoint_every=None).fit()
    monkeypatch.setenv(REPLAY, "1")
    trainer = run(tmp_path, precision=precision, checkpoint_every=None)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 7"):
        trainer.fit()
    assert trainer.resumed_from is None
    if precision == "fp16":
        assert trainer.precision.skipped_steps.item() > 0


def test_a_run_whose_directory_was_chosen_for_it_is_replayed_by_its_path(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def unnamed():
        torch.manual_seed(0)
        return Trainer(LogOfFeature(), batches(), progress=False, seed=1, checkpoint_every=3,
                       log_every=5)

    first = unnamed()
    with pytest.raises(NonFiniteLossError) as caught:
        first.fit()
    assert f"{REPLAY}={first.log_dir} " in str(caught.value)
    monkeypatch.setenv(REPLAY, first.log_dir)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 7"):
        unnamed().fit()
    assert os.listdir(tmp_path / "runs") == [os.path.basename(first.log_dir)]


class RootOfFeature(Regression):
    """A loss that takes the square root of a shifted feature: NaN in the forward and in
    its gradient when a batch holds a feature below -10, so the weights go NaN too."""

    def extra(self, x):
        shifted = (x[:, 0] + 10.0) * (self.lin.bias.abs() + 1.0)
        return {"root": torch.sqrt(shifted).mean() * 1e-3}


def test_weights_refused_at_a_checkpoint_before_the_flush_record_the_losss_first_step(
        tmp_path):
    """Step 7's NaN makes the weights NaN; the checkpoint at step 9 refuses them before
    the flush of step 10 names the loss: the record is still step 7's, from step 6."""
    with pytest.raises(NonFiniteLossError) as caught:
        run(tmp_path, RootOfFeature, log_every=10).fit()
    assert "'root' first at step 7" in str(caught.value)
    assert "To replay step 7 from checkpoint" in str(caught.value)
    record = json.loads((tmp_path / "nonfinite" / "failure.json").read_text())
    assert record["step"] == 7 and record["losses"] == ["mse", "root"]  # mse from step 8
    assert record["checkpoint"].endswith("step-000000006.pt")


class Saver(__import__("lossless_trainer").Hook):
    def after_step(self, trainer):
        trainer.save_checkpoint(os.path.join(trainer.checkpoint_dir, "extra.pt"))


def test_a_replay_from_the_start_leaves_the_later_checkpoints_and_writes_none(
        tmp_path, monkeypatch):
    """The NaN of step 1 is found at the flush of step 5, after the checkpoint of step
    3: the replay starts fresh beside it, and a hook's save writes nothing."""
    def first_bad(**options):
        torch.manual_seed(0)
        return Trainer(LogOfFeature(), batches(bad=1), log_dir=str(tmp_path), progress=False,
                       seed=1, checkpoint_every=3, log_every=5, **options)

    with pytest.raises(NonFiniteLossError, match="To replay step 1 from the start"):
        first_bad().fit()
    before = snapshot(tmp_path)
    monkeypatch.setenv(REPLAY, "1")
    trainer = first_bad(callbacks=[Saver()])
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 1"):
        trainer.fit()
    assert trainer.resumed_from is None and snapshot(tmp_path) == before


def test_replaying_a_step_checked_run_writes_the_report_of_the_replay(tmp_path, monkeypatch):
    with pytest.raises(NonFiniteLossError):
        run(tmp_path, finite_check="step").fit()
    (tmp_path / "nonfinite" / "step-7" / "report.json").unlink()
    monkeypatch.setenv(REPLAY, "1")
    with pytest.raises(NonFiniteLossError, match="The report of the replay, with the step's "
                                                 "batches and the operation that produced "
                                                 "it, is .*step-7.report.json"):
        run(tmp_path, finite_check="step").fit()
    report = json.loads((tmp_path / "nonfinite" / "step-7" / "report.json").read_text())
    assert report["first_operation"]["operation"] == "log"


class MaskedLog(LogOfFeature):
    """`LogOfFeature` that also builds an attention-like mask of -inf, which is meant:
    the first operation named is still the log."""

    def extra(self, x):
        mask = torch.full((4,), float("-inf"))
        mask[0] = 0.0
        weights = torch.softmax(mask + self.lin.weight[0], dim=0)
        return {**super().extra(x), "mix": 1e-3 * weights.sum()}


def test_a_mask_of_minus_infinity_is_not_taken_for_the_failure(tmp_path, monkeypatch):
    with pytest.raises(NonFiniteLossError):
        run(tmp_path, MaskedLog).fit()
    monkeypatch.setenv(REPLAY, "1")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 7"):
        run(tmp_path, MaskedLog).fit()
    report = json.loads((tmp_path / "nonfinite" / "step-7" / "report.json").read_text())
    assert report["first_operation"]["operation"] == "log"


def test_the_poisoned_sample_example_fails_then_its_replay_finds_the_blank_image(tmp_path):
    """examples/nan_replay.py, as docs/nonfinite.md walks through it."""
    import subprocess

    script = HERE.parent.parent / "examples" / "nan_replay.py"

    def example(**env):
        return subprocess.run([sys.executable, str(script), "--log-dir", str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=240, check=False,
                              env={**os.environ, **env})

    failed = example()
    assert failed.returncode != 0
    assert "'ce' first at step 26 (detected at the flush of step 30)" in failed.stderr
    command = [sys.executable, str(script), "--log-dir", str(tmp_path / "run")]
    assert failed.stderr.rstrip().endswith(f"{REPLAY}=1 {shlex.join(command)}")
    replayed = example(**{REPLAY: "1"})
    assert replayed.returncode != 0
    assert "[lossless_trainer] replay: step 26, rank 0, micro-batch 0: non-finite loss (ce)" \
        in replayed.stdout
    where = tmp_path / "run" / "nonfinite" / "step-26"
    report = json.loads((where / "report.json").read_text())
    assert report["first_operation"]["operation"] == "div"
    assert report["first_operation"]["where"][-1].endswith("# here: 0 / 0 for a blank image")
    images, _ = torch.load(where / "batch-r0-m0.pt", weights_only=True)
    assert (images.abs().sum(1) == 0).nonzero().flatten().tolist() == [30]
