"""Several optimizers (#26): a list that steps together, a dict keyed by loss name whose
optimizers step only at their losses' steps, `current_step`, per-optimizer schedulers,
clipping and logs, one GradScaler, checkpoints by name, torchrun."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import read_metrics
from optim_script import Pair, dist_optimizers, pair_data, pair_optimizers
from torch import nn

from lossless_trainer import Hook, ModelOutputError, Trainer, TrainerBase, current_step
from lossless_trainer.checkpoint import CheckpointError, list_checkpoints
from lossless_trainer.export import export_model

TESTS = Path(__file__).resolve().parent


def pair_batches(n: int = 12, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = pair_data(n * batch)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n * batch, batch)]


class Both(nn.Module):
    """Two parts, both trained at every step: ``a`` and ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 1)
        self.b = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))

    def forward(self, batch):
        x, y = batch
        return {"a": F.mse_loss(self.a(x), y), "b": F.mse_loss(self.b(x), y)}


def hand_loop(model, batches, optimizers: dict, schedulers=None, *, keyed=True, accum=1,
              clip=None, scaler=None):
    """The loop a user would write for several optimizers: one backward of the summed
    losses; an optimizer steps when its losses are there (`keyed`) or always; every
    gradient dropped after the step."""
    schedulers = schedulers or {}
    groups = [batches[i:i + accum] for i in range(0, len(batches), accum)]
    for step, group in enumerate(groups, 1):
        model.step = step
        names = set()
        for batch in group:
            with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
                losses = model(batch)
            names |= {key.split("/")[0] for key in losses}
            total = sum(losses.values())
            total = total / len(group) if len(group) > 1 else total
            (scaler.scale(total) if scaler else total).backward()
        stepping = [n for n in optimizers if n in names or not keyed]
        for name in stepping:
            if scaler:
                scaler.unscale_(optimizers[name])
            if clip:
                params = [p for g in optimizers[name].param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, clip)
        for name in stepping:
            (scaler.step if scaler else lambda o: o.step())(optimizers[name])
        if scaler:
            scaler.update()
        for name in stepping:
            if schedulers.get(name) is not None:
                schedulers[name].step()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)


def assert_same(model_a, model_b, optimizers_a: dict, optimizers_b: dict) -> None:
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(x, y), name
    for name, opt in optimizers_a.items():
        mine, theirs = opt.state_dict()["state"], optimizers_b[name].state_dict()["state"]
        assert mine.keys() == theirs.keys(), name
        for index, entries in mine.items():
            for entry, value in entries.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs[index][entry])), \
                    (name, index, entry)


def step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)


# -- the step ------------------------------------------------------------------------------


def test_a_list_steps_every_optimizer_and_equals_a_hand_written_loop(quiet):
    torch.manual_seed(0)
    model = Both()
    reference = Both()
    reference.load_state_dict(model.state_dict())
    data = pair_batches(6)
    trainer = Trainer(
        model, data, optimizer=[lambda m: torch.optim.SGD(m.a.parameters(), lr=0.05, momentum=0.9),
                                lambda m: torch.optim.Adam(m.b.parameters(), lr=0.01)],
        lr_scheduler=[step_lr, None], log_every=2, **quiet)
    trainer.fit()
    theirs = {"0": torch.optim.SGD(reference.a.parameters(), lr=0.05, momentum=0.9),
              "1": torch.optim.Adam(reference.b.parameters(), lr=0.01)}
    hand_loop(reference, data, theirs, {"0": step_lr(theirs["0"])}, keyed=False)
    assert isinstance(trainer.optimizer, list) and len(trainer.optimizer) == 2
    assert list(trainer.optimizers) == ["0", "1"]
    assert trainer.lr_scheduler[1] is None
    assert_same(model, reference, trainer.optimizers, theirs)
    last = read_metrics(quiet["log_dir"])[-1]
    assert last["lr/0"] == 0.05 * 0.5 ** 3 and last["lr/1"] == 0.01
    assert "lr" not in last


@pytest.mark.parametrize("accum", [1, 2])
def test_a_dict_steps_an_optimizer_only_at_the_steps_of_its_losses(quiet, accum):
    """'a' steps at steps 1, 2, 4, 5...; 'b' at 3, 6...: equal to the hand-written loop
    bit for bit, each scheduler stepping with its optimizer; between its steps an
    optimizer's state is untouched and its parameters hold no gradient."""
    torch.manual_seed(0)
    model, reference = Pair(), Pair()
    reference.load_state_dict(model.state_dict())
    data = pair_batches(12)
    seen = []

    class Watch(Hook):
        def after_step(self, trainer):
            b = trainer.optimizers["b"]
            seen.append((trainer.state.step, sorted(trainer.losses),
                         b.state[model.b.weight]["momentum_buffer"].clone()
                         if b.state else None, model.b.weight.grad))

    trainer = Trainer(model, data, optimizer=pair_optimizers(), grad_accum_steps=accum,
                      lr_scheduler=step_lr, log_every=3, callbacks=[Watch()], **quiet)
    trainer.fit()
    theirs = {"a": torch.optim.Adam(reference.a.parameters(), lr=0.05),
              "b": torch.optim.SGD(reference.b.parameters(), lr=0.05, momentum=0.9)}
    hand_loop(reference, data, theirs, {n: step_lr(o) for n, o in theirs.items()}, accum=accum)
    assert_same(model, reference, trainer.optimizers, theirs)
    steps = 12 // accum
    assert trainer.optimizers["a"].state[model.a.weight]["step"] == steps - steps // 3
    assert [s for s, keys, _, _ in seen if keys == ["b"]] == [3, 6, 9, 12][:steps // 3]
    for (step, keys, momentum, grad), (_, _, before, _) in zip(seen[1:], seen):
        assert grad is None  # every gradient dropped after the step
        if keys != ["b"] and before is not None:  # b did not step: its state is as it was
            assert torch.equal(momentum, before), step
    last = read_metrics(quiet["log_dir"])[-1]
    assert last["lr/a"] == 0.05 * 0.5 ** ((steps - steps // 3) // 2)
    assert last["lr/b"] == 0.05 * 0.5 ** ((steps // 3) // 2)


def test_clipping_applies_to_each_optimizers_parameters_and_logs_each_norm(quiet):
    torch.manual_seed(0)
    model, reference = Pair(), Pair()
    reference.load_state_dict(model.state_dict())
    data = pair_batches(6)
    trainer = Trainer(model, data, optimizer=pair_optimizers(), clip_grad_norm=0.5,
                      log_every=1, **quiet)
    trainer.fit()
    theirs = {"a": torch.optim.Adam(reference.a.parameters(), lr=0.05),
              "b": torch.optim.SGD(reference.b.parameters(), lr=0.05, momentum=0.9)}
    hand_loop(reference, data, theirs, clip=0.5)
    assert_same(model, reference, trainer.optimizers, theirs)
    log = read_metrics(quiet["log_dir"])
    assert [sorted(k for k in r if k.startswith("grad_norm")) for r in log] == \
        [["grad_norm/a"], ["grad_norm/a"], ["grad_norm/b"]] * 2
    assert all(r["grad_norm/b"] > 0.5 for r in log if "grad_norm/b" in r)  # it did clip


def test_fp16_one_grad_scaler_unscales_and_steps_each_optimizer_that_steps(quiet):
    torch.manual_seed(0)
    model, reference = Pair(), Pair()
    reference.load_state_dict(model.state_dict())
    data = pair_batches(6)
    trainer = Trainer(model, data, optimizer=pair_optimizers(), precision="fp16",
                      clip_grad_norm=1.0, **quiet)
    trainer.fit()
    theirs = {"a": torch.optim.Adam(reference.a.parameters(), lr=0.05),
              "b": torch.optim.SGD(reference.b.parameters(), lr=0.05, momentum=0.9)}
    scaler = torch.amp.GradScaler("cpu")
    hand_loop(reference, data, theirs, clip=1.0, scaler=scaler)
    assert_same(model, reference, trainer.optimizers, theirs)
    # Both skipped the same steps whose gradients overflowed, and counted them.
    assert trainer.precision.scaler.get_scale() == scaler.get_scale() < 65536.0
    assert trainer.precision.skipped_steps.item() == 3


def test_current_step_is_the_step_being_computed_and_none_outside_training(quiet):
    seen = []

    class Records(Pair):
        def forward(self, batch):
            seen.append((self.training, current_step()))
            return super().forward(batch)

    data = pair_batches(4)
    trainer = Trainer(Records(), data, optimizer=pair_optimizers(), eval_data=data[:1],
                      eval_every=2, **quiet)
    assert current_step() is None
    trainer.fit()
    assert current_step() is None
    assert seen == [(True, 1), (True, 2), (False, None), (True, 3), (True, 4), (False, None)]


# -- wrong options and wrong losses -----------------------------------------------------------


def test_every_trainable_parameter_must_have_exactly_one_optimizer(quiet):
    model = Pair()
    overlap = {"a": lambda m: torch.optim.Adam(m.parameters()),
               "b": lambda m: torch.optim.SGD(m.b.parameters(), lr=0.1)}
    trainer = Trainer(model, pair_batches(2), optimizer=overlap, **quiet)
    with pytest.raises(ValueError, match=r"in more than one: b\.weight \(in 'a', 'b'\), "
                                         r"b\.bias \(in 'a', 'b'\)"):
        trainer.fit()
    assert trainer.state.step == 0 and not list_checkpoints(trainer.checkpoint_dir)
    missing = [lambda m: torch.optim.SGD([m.a.weight], lr=0.1)]
    with pytest.raises(ValueError, match=r"in no optimizer: a\.bias, b\.weight, b\.bias"):
        Trainer(Pair(), pair_batches(2), optimizer=missing, **quiet).fit()
    frozen = Pair()
    frozen.b.weight.requires_grad_(False)  # a frozen parameter needs no optimizer
    Trainer(frozen, pair_batches(3), resume=False, log_dir=quiet["log_dir"] + "2",
            progress=False, optimizer={"a": lambda m: torch.optim.SGD(m.a.parameters(), lr=0.1),
                                       "b": lambda m: torch.optim.SGD([m.b.bias], lr=0.1)}
            ).fit()


def test_a_loss_that_matches_no_optimizer_is_an_error_naming_it_and_the_keys(quiet):
    class Extra(Pair):
        def forward(self, batch):
            losses = super().forward(batch)
            if current_step() == 2:
                losses["aux"] = losses.pop("a/small")
            return losses

    model = Extra()
    trainer = Trainer(model, pair_batches(3), optimizer=pair_optimizers(), **quiet)
    with pytest.raises(ModelOutputError, match=r"the loss 'aux' at step 2, which matches none "
                                               r"of the optimizers' keys 'a', 'b'"):
        trainer.fit()
    assert trainer.state.step == 1


@pytest.mark.parametrize(("optimizer", "lr_scheduler", "error", "match"), [
    ([], None, ValueError, "empty list or dict"),
    ({"d/real": lambda m: None}, None, ValueError, "non-empty str without '/', got 'd/real'"),
    ({"a": functools.partial(torch.optim.AdamW, lr=1e-3)}, None, TypeError,
     r"optimizer\['a'\] is the optimizer class AdamW, which would be called with the whole "
     "model"),
    ([torch.optim.SGD], None, TypeError, r"optimizer\[0\] is the optimizer class SGD"),
    ({"a": 3}, None, TypeError, r"optimizer\['a'\] must be a torch.optim.Optimizer or a factory"),
    ({"a": lambda m: None}, {"c": step_lr}, ValueError,
     "lr_scheduler has 'c', which name no optimizer; the optimizers are 'a'"),
    ([lambda m: None], [step_lr, step_lr], ValueError, "lr_scheduler is a list of 2, and "
     "optimizer a list of 1"),
    ({"a": lambda m: None}, [step_lr], TypeError, "with several optimizers, lr_scheduler must "
     "be a dict"),
])
def test_wrong_optimizer_options_are_refused_before_anything_is_built(
        quiet, optimizer, lr_scheduler, error, match):
    with pytest.raises(error, match=match):
        Trainer(Pair(), pair_batches(1), optimizer=optimizer, lr_scheduler=lr_scheduler,
                **quiet)
    assert not os.path.exists(quiet["log_dir"])


def test_one_scheduler_for_several_optimizers_is_refused(quiet):
    model = Pair()
    opt = torch.optim.SGD(model.a.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="lr_scheduler is one scheduler, of one optimizer"):
        Trainer(model, pair_batches(1), lr_scheduler=step_lr(opt), **quiet,
                optimizer={"a": opt, "b": lambda m: torch.optim.SGD(m.b.parameters(), lr=0.1)})


def test_a_factory_returning_no_optimizer_or_one_over_other_parameters_is_named(quiet):
    with pytest.raises(TypeError, match="the factory of optimizer 'b' returned NoneType"):
        Trainer(Pair(), pair_batches(1), **quiet,
                optimizer={"a": lambda m: torch.optim.SGD(m.a.parameters(), lr=0.1),
                           "b": lambda m: None})
    other = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="optimizer '1' holds 2 tensor.s. that are not "
                                         "parameters of Pair: in a list or a dict each factory"):
        Trainer(Pair(), pair_batches(1), **quiet,
                optimizer=[lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                           torch.optim.SGD(other.parameters(), lr=0.1)])


def test_a_factory_of_parameters_in_a_list_is_explained(quiet):
    with pytest.raises(TypeError, match=r"the factory of optimizer '0' failed when called "
                                        r"with the model \(.*\): in a list or a dict each "
                                        r"factory is called with the model"):
        Trainer(Pair(), pair_batches(1), **quiet,
                optimizer=[lambda params: torch.optim.AdamW(params)])


class HeadOnSome(Both):
    """`Both`, whose 'b' loss is left out at even steps: at those steps the optimizer of
    'b' in a list steps with no gradient at all."""

    def forward(self, batch):
        losses = {key: 1e-3 * loss for key, loss in super().forward(batch).items()}
        if current_step() % 2 == 0:  # small enough that fp16 skips no step
            del losses["b"]
        return losses


@pytest.mark.parametrize("precision", ["32", "fp16"])
def test_a_list_optimizer_without_gradients_at_a_step_is_left_alone(quiet, precision):
    """fp16's GradScaler refuses to step an optimizer it found no gradient for; the
    step leaves it alone, as its own step would, and clipping by value logs a zero
    norm for it, in both precisions the same."""
    torch.manual_seed(0)
    model = HeadOnSome()
    trainer = Trainer(model, pair_batches(4), precision=precision, clip_grad_value=10.0,
                      log_every=1, **quiet, optimizer=[
                          lambda m: torch.optim.SGD(m.a.parameters(), lr=0.01),
                          lambda m: torch.optim.Adam(m.b.parameters(), lr=0.01)])
    trainer.fit()
    assert trainer.optimizers["1"].state[model.b[0].weight]["step"] == 2  # steps 1 and 3
    log = read_metrics(quiet["log_dir"])
    assert [r["grad_norm/1"] == 0.0 for r in log] == [False, True, False, True]
    if precision == "fp16":
        assert trainer.precision.skipped_steps.item() == 0


def test_a_custom_trainers_list_of_optimizers_is_logged_by_index(quiet):
    class Two(TrainerBase):
        def __init__(self, model, data, **options):
            super().__init__(model, data, **options)
            self.optimizers = [torch.optim.SGD(model.a.parameters(), lr=0.1),
                               torch.optim.SGD(model.b.parameters(), lr=0.2)]

        def run_step(self, batches):
            (batch,) = self.accumulate(batches)
            losses = self.compute_losses(batch)
            sum(losses.values()).backward()
            self.after_backward()
            for opt in self.optimizers:
                opt.step()
                opt.zero_grad()
            return losses

    Two(Both(), pair_batches(2), log_every=1, **quiet).fit()
    assert read_metrics(quiet["log_dir"])[-1]["lr/1"] == 0.2


# -- checkpoints --------------------------------------------------------------------------------


def pair_trainer(log_dir, steps, **options):
    torch.manual_seed(0)
    options.setdefault("optimizer", pair_optimizers())
    options.setdefault("lr_scheduler", {"a": step_lr})
    return Trainer(Pair(), pair_batches(12), max_steps=steps, log_dir=str(log_dir),
                   progress=False, log_every=2, checkpoint_every=2, seed=3, **options)


@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_several_optimizers_resume_bit_exactly(tmp_path, checkpoint_format):
    """Stopped at step 2 (before 'b' first stepped) and at 8, resumed to 12: the same
    weights, optimizer states and scheduler as 12 steps straight. The checkpoint exports."""
    straight = pair_trainer(tmp_path / "straight", 12, checkpoint_format=checkpoint_format)
    straight.fit()
    for steps in (2, 8, 12):
        resumed = pair_trainer(tmp_path / "resumed", steps, checkpoint_format=checkpoint_format)
        resumed.fit()
    assert resumed.resumed_from is not None
    assert not resumed.optimizers["b"].state or steps > 2
    assert_same(resumed.model, straight.model, resumed.optimizers, straight.optimizers)
    assert resumed.lr_scheduler["a"].state_dict() == straight.lr_scheduler["a"].state_dict()
    def logged(run):
        return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")}
                for r in read_metrics(tmp_path / run)]

    assert logged("resumed") == logged("straight")
    exported = export_model(tmp_path / "resumed", tmp_path / "model.pt")
    assert all(torch.equal(exported[k], v) for k, v in straight.model.state_dict().items())


def test_the_checkpoint_before_an_optimizers_first_step_keeps_its_state_empty(tmp_path):
    trainer = pair_trainer(tmp_path, 2, checkpoint_format="sharded")
    trainer.fit()
    again = pair_trainer(tmp_path, 2, checkpoint_format="sharded")
    again._seed_and_resume("auto", set_aside=False)
    assert again.resumed_from is not None and again.optimizers["b"].state == {}
    assert again.optimizers["a"].state[again.model.a.weight]["step"] == 2


@pytest.mark.parametrize(("other", "match"), [
    ({"a": lambda m: torch.optim.Adam(m.a.parameters(), lr=0.05),
      "c": lambda m: torch.optim.SGD(m.b.parameters(), lr=0.05)},
     "written with a dict of the optimizers 'a', 'b', and this run has a dict of the "
     "optimizers 'a', 'c'"),
    ([lambda m: torch.optim.Adam(m.a.parameters(), lr=0.05),
      lambda m: torch.optim.SGD(m.b.parameters(), lr=0.05)],
     "written with a dict of the optimizers 'a', 'b', and this run has a list of 2"),
    (None, "written with a dict of the optimizers 'a', 'b', and this run has one optimizer"),
])
def test_a_resume_with_other_optimizers_is_refused_before_anything_changes(
        tmp_path, other, match):
    pair_trainer(tmp_path, 4).fit()
    files = sorted(os.listdir(tmp_path / "checkpoints"))
    trainer = pair_trainer(tmp_path, 8, optimizer=other, lr_scheduler=None) \
        if other is not None else Trainer(
        Pair(), pair_batches(4), log_dir=str(tmp_path), progress=False, max_steps=8)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(CheckpointError, match=f"checkpoint .*step-000000004.pt does not fit "
                                              f"this run: it was {match}"):
        trainer.fit()
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == files
    assert trainer.state.step == 0


def test_a_list_resumes_a_list_of_the_same_length_and_classes(tmp_path):
    def run(optimizers, steps):
        torch.manual_seed(0)
        return Trainer(Both(), pair_batches(6), optimizer=optimizers, max_steps=steps,
                       log_dir=str(tmp_path), progress=False)

    sgd = lambda m: torch.optim.SGD(m.a.parameters(), lr=0.1)  # noqa: E731
    adam = lambda m: torch.optim.Adam(m.b.parameters())  # noqa: E731
    run([sgd, adam], 2).fit()
    with pytest.raises(CheckpointError, match="optimizer '1': it was written with the "
                                              "optimizer torch.optim.adam.Adam"):
        run([sgd, lambda m: torch.optim.SGD(m.b.parameters(), lr=0.1)], 4).fit()
    with pytest.raises(CheckpointError, match="a list of 2 optimizers, and this run has a "
                                              "list of 3"):
        run([sgd, lambda m: torch.optim.SGD(m.b[0].parameters(), lr=0.1),
             lambda m: torch.optim.SGD(m.b[2].parameters(), lr=0.1)], 4).fit()
    assert run([sgd, adam], 4).fit().step == 4


def script(mode: str, out: Path, nproc: int = 0, **env: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return subprocess.run([*launcher, str(TESTS / "optim_script.py"), mode, str(out)],
                          capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_a_dict_of_optimizers_resumes_bit_identically_after_a_kill(tmp_path):
    """SIGKILLed in the middle of step 7, the same command resumes from step 6 and ends
    with the uninterrupted run's weights and both optimizers' states."""
    assert script("kill", tmp_path / "reference").returncode == 0
    killed = script("kill", tmp_path / "run", KILL_AT="7")
    assert killed.returncode != 0 and (tmp_path / "run" / "killed").exists()
    again = script("kill", tmp_path / "run", KILL_AT="7")
    assert again.returncode == 0, again.stderr[-4000:]
    ours = torch.load(tmp_path / "run" / "result.pt", weights_only=True)
    theirs = torch.load(tmp_path / "reference" / "result.pt", weights_only=True)
    assert ours["resumed_from"].endswith("step-000000006.pt") and ours["step"] == 12
    for key, value in theirs["params"].items():
        assert torch.equal(ours["params"][key], value), key
    for name in ("a", "b"):
        for index, entries in theirs[name]["state"].items():
            for entry, value in entries.items():
                assert torch.equal(ours[name]["state"][index][entry], value), (name, entry)


def one_process_pair(log_dir: Path, steps: int) -> nn.Module:
    """The torchrun runs' reference: one process, batch 16 (the 2 ranks' 8 + 8)."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = Pair()
    Trainer(model, DataLoader(TensorDataset(*pair_data(16 * 15)), batch_size=16),
            optimizer=dist_optimizers(), max_steps=steps, clip_grad_norm=0.5,
            log_dir=str(log_dir), progress=False, keep_last=0).fit()
    return model


@pytest.mark.parametrize(("strategy", "checkpoint_format"),
                         [("ddp", "sharded"), ("fsdp", "sharded"), ("fsdp", "full")])
def test_an_alternating_dict_under_torchrun_equals_one_process(
        tmp_path, strategy, checkpoint_format):
    """Two ranks of 8 samples, parameters without gradients at alternate steps: the same
    weights as one process with the batch of 16, after 12 steps resumed from step 2's
    checkpoint (taken before 'b' first stepped) and after a resume to 15; no hang."""
    result = script(strategy, tmp_path, nproc=2, FORMAT=checkpoint_format)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    saved = torch.load(tmp_path / f"{strategy}.pt", weights_only=True)
    suffix = ".pt" if checkpoint_format == "full" else ""
    assert saved["first"]["resumed_from"].endswith(f"step-000000002{suffix}")
    assert saved["resumed"]["resumed_from"].endswith(f"step-000000012{suffix}")
    for part, steps in (("first", 12), ("resumed", 15)):
        reference = one_process_pair(tmp_path / f"single{steps}", steps)
        for key, value in reference.state_dict().items():
            assert torch.allclose(saved[part]["params"][key], value, atol=1e-6), (part, key)
    log = read_metrics(tmp_path / "run")
    assert {"lr/a", "lr/b", "grad_norm/a", "grad_norm/b"} <= log[-1].keys()


def test_under_torchrun_an_optimizer_steps_on_every_rank_when_any_rank_returned_its_losses(
        tmp_path):
    """Rank 0 returns 'a''s losses where rank 1 returns 'b''s, and the other way round
    at the next step: both optimizers step at every step on both ranks, which stay
    equal (DDP averages the gradients, zero from the rank without the loss)."""
    result = script("mixed", tmp_path, nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rank0, rank1 = (torch.load(tmp_path / f"mixed-rank{r}.pt", weights_only=True)
                    for r in (0, 1))
    for key, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][key]), key
    assert rank0["steps"] == rank1["steps"]
    assert rank0["steps"]["b"] == [6, 6]  # Adam's step count: all 6 steps
