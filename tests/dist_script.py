"""Training runs for the distributed tests, launched by real torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node=2 dist_script.py MODE OUT

Modes:
    equivalence  DDP with batch 8 per rank, SGD, 12 steps, log_every=1 (plus a run with
                 batch 4 and 2 accumulation steps, counting gradient all-reduces), and
                 summaries with every `reduce=` mode and a key only rank 1 writes.
    optional     A head used on even steps only: DDP's error without
                 find_unused_parameters, training with it, and a stop requested on one
                 rank only; then failures on one rank (unsharded data, NaN losses,
                 writers that fail on rank 0) that must stop both.
    resume       Shuffled data and dropout, a checkpoint every 3 steps; with KILL_AT set,
                 rank 1 SIGKILLs itself after that step (run again to resume).
    fsdp         strategy="fsdp" with the equivalence setup, full checkpoints.
    means        TinyLM's Mean loss: 2 ranks x batch 4, and 2 ranks x 2 micro-batches x
                 batch 2, under DDP (also with find_unused_parameters) and FSDP; the
                 error of a Mean under accumulation without count_items, on both ranks;
                 torchmetrics metrics as evaluators.

Rank 0 saves the final parameters (and whatever the test checks) to OUT/<name>.pt; every
rank saves its own to OUT/<name>-rank<r>.pt.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import TinyLM, UncountedLM, lm_sequences, pad_lm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import (
    Hook,
    Mean,
    MeanSquaredError,
    Model,
    ModelOutputError,
    NonFiniteLossError,
    Trainer,
    write_summary,
)
from lossless_trainer.resume import clear_termination


class Regressor(Model):
    """8 -> 16 -> 1, mean squared error, and summaries with every reduction."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout))
        self.head = nn.Linear(16, 1)

    def forward(self, batch):
        x, y = batch
        prediction = self.head(self.body(x)).squeeze(-1)
        if not self.training:
            return prediction
        rank = float(dist.get_rank()) if dist.is_initialized() else 0.0
        write_summary("rank/mean", rank)
        write_summary("rank/sum", rank + 1.0, reduce="sum")
        write_summary("rank/max", rank, reduce="max")
        write_summary("rank/none", rank + 10.0, reduce="none")
        if rank == 1.0:
            write_summary("only_rank1", 3.0)
        return {"mse": F.mse_loss(prediction, y)}


class TwoHeads(Model):
    """Head b is used, and its loss computed, on even steps only."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.a = nn.Linear(16, 1)
        self.b = nn.Linear(16, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, batch):
        x, y = batch
        h = torch.tanh(self.body(x))
        losses = {"a": F.mse_loss(self.a(h).squeeze(-1), y)}
        self.calls += 1
        if int(self.calls) % 2 == 0:
            losses["b"] = F.mse_loss(self.b(h).squeeze(-1), -y)
        return losses


def dataset(n: int = 192) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x.sum(1) * 0.3 + 0.1 * torch.randn(n, generator=g))


def save(out: str, name: str, value: object) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(value, os.path.join(out, f"{name}-rank{rank}.pt"))


def count_allreduces(ddp: nn.Module) -> list[int]:
    """Register a DDP comm hook that counts gradient all-reduces, then does the usual one."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = [0]

    def counting_hook(state, bucket):
        calls[0] += 1
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    return calls


_FSDP_REDUCE: list = []


def count_fsdp_reductions() -> list[int]:
    """Count FSDP2's gradient reduce-scatters (one per sharded group per synced backward)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    calls = [0]
    original = group.foreach_reduce

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    _FSDP_REDUCE.append(original)
    group.foreach_reduce = counting
    return calls


def uncount_fsdp_reductions() -> None:
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    group.foreach_reduce = _FSDP_REDUCE.pop()


class ReadsOnRank0(Hook):
    """Reads `trainer.last_summary` after the logging hook, on rank 0 only, as a hook
    that sends the losses elsewhere would: (step, the record's step) at every step."""

    priority = 93  # after the logging hook (90) and the checkpoint hook (92)

    def __init__(self) -> None:
        self.reads: list[tuple[int, int | None]] = []
        self.on_disk: list[int] = []  # the last step in metrics.jsonl, after a checkpoint

    def after_step(self, trainer):
        if trainer.dist.is_main:
            if trainer.state.step in (4, 8):  # checkpoint_every=4; 12 is saved at the end
                with open(os.path.join(trainer.log_dir, "metrics.jsonl")) as lines:
                    self.on_disk.append(json.loads(lines.readlines()[-1])["step"])
            record = trainer.last_summary
            self.reads.append((trainer.state.step, None if record is None else record.step))


def equivalence(out: str, strategy: str = "auto") -> None:
    # FSDP runs with momentum, so resuming it restores optimizer state too.
    momentum = 0.9 if strategy == "fsdp" else 0.0
    for name, batch, accum in (("plain", 8, 1), ("accum", 4, 2)):
        reads = ReadsOnRank0()
        torch.manual_seed(0)
        model = Regressor()
        trainer = Trainer(model, DataLoader(dataset(), batch_size=batch, shuffle=False),
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum),
                          max_steps=12, checkpoint_every=4,
                          log_every=1, grad_accum_steps=accum, log_dir=os.path.join(out, name),
                          progress=False, keep_last=1, strategy=strategy,
                          checkpoint_format="full",  # one file, read back below
                          eval_data=DataLoader(dataset(40), batch_size=16), eval_every=6,
                          evaluators=[MeanSquaredError(targets=1)], callbacks=[reads])
        counter = count_allreduces(trainer._train_model) if strategy != "fsdp" \
            else count_fsdp_reductions()
        trainer.fit()
        params = {k: v.detach().cpu() for k, v in model.state_dict().items()} \
            if strategy != "fsdp" else torch.load(
                os.path.join(out, name, "checkpoints", "step-000000012.pt"),
                weights_only=True)["model"]
        if strategy == "fsdp":
            uncount_fsdp_reductions()
        save(out, name, {"params": params, "allreduces": counter[0] if counter else None,
                         "sampler": type(trainer.data.sampler).__name__,
                         "reads": reads.reads, "on_disk": reads.on_disk,
                         "device": str(trainer.device), "world": trainer.dist.world_size})
    if strategy == "fsdp":  # resume the sharded model from the full checkpoint
        torch.manual_seed(1)  # different initial weights: the checkpoint must replace them
        model = Regressor()
        trainer = Trainer(model, DataLoader(dataset(), batch_size=8, shuffle=False),
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum),
                          max_steps=14,
                          log_every=1, log_dir=os.path.join(out, "plain"), progress=False,
                          keep_last=1, strategy=strategy, checkpoint_format="full")
        trainer.fit()
        params = torch.load(os.path.join(out, "plain", "checkpoints", "step-000000014.pt"),
                            weights_only=True)["model"]
        save(out, "resumed", {"params": params, "resumed_from": trainer.resumed_from})


def optional(out: str) -> None:
    torch.manual_seed(0)
    data = DataLoader(dataset(64), batch_size=8)
    try:
        Trainer(TwoHeads(), data, max_steps=4, log_dir=os.path.join(out, "strict"),
                progress=False, keep_last=0).fit()
        save(out, "strict", {"error": None})
    except RuntimeError as exc:
        save(out, "strict", {"error": str(exc)})

    torch.manual_seed(0)
    model = TwoHeads()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    Trainer(model, data, max_steps=6, log_every=2, log_dir=os.path.join(out, "optional"),
            progress=False, keep_last=0, find_unused_parameters=True).fit()
    save(out, "optional", {"before": before,
                           "after": {k: v.detach().clone() for k, v in model.state_dict().items()}})

    class StopOnRank1(Hook):
        def after_step(self, trainer):
            if trainer.dist.rank == 1 and trainer.state.step == 3:
                trainer.request_stop("rank 1 asked")

    # 8 batches per rank: the request travels with the flush of step 4, not with the
    # vote at the end of an epoch.
    trainer = Trainer(TwoHeads(), DataLoader(dataset(128), batch_size=8), max_steps=8,
                      log_dir=os.path.join(out, "stop"),
                      progress=False, keep_last=0, find_unused_parameters=True,
                      callbacks=[StopOnRank1()], log_every=2)
    state = trainer.fit()
    save(out, "stop", {"step": state.step, "reason": state.stop_reason})

    class SigtermOnRank1(Hook):  # as if the scheduler signalled one process only
        def after_step(self, trainer):
            if trainer.dist.rank == 1 and trainer.state.step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = Trainer(TwoHeads(), DataLoader(dataset(16 * 1200), batch_size=8),
                      max_steps=1200, log_every=1000,
                      log_dir=os.path.join(out, "sigterm"), progress=False, keep_last=0,
                      find_unused_parameters=True, callbacks=[SigtermOnRank1()])
    state = trainer.fit()
    save(out, "sigterm", {"step": state.step, "reason": state.stop_reason})
    clear_termination()

    class StopAfterEpochOnRank1(Hook):
        def after_epoch(self, trainer):
            if trainer.dist.rank == 1:
                trainer.request_stop("rank 1 asked after the epoch")

    trainer = Trainer(TwoHeads(), data, max_epochs=3, log_dir=os.path.join(out, "epoch"),
                      progress=False, keep_last=0, find_unused_parameters=True,
                      callbacks=[StopAfterEpochOnRank1()])
    state = trainer.fit()
    save(out, "epoch_stop", {"step": state.step, "epoch": state.epoch,
                             "reason": state.stop_reason})

    # Data the Trainer cannot shard: the same list on every rank is trained on, with a
    # warning; lists of different lengths would hang at the epoch's end, so they fail.
    same = [(torch.ones(4, 8), torch.ones(4))] * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(Regressor(), same, log_dir=os.path.join(out, "same"), progress=False,
                keep_last=0).fit()
    uneven = same * (dist.get_rank() + 1)
    try:
        Trainer(Regressor(), uneven, log_dir=os.path.join(out, "uneven"), progress=False,
                keep_last=0).fit()
        error = None
    except ValueError as exc:
        error = str(exc)
    # A length on one rank only (a generator on rank 1) is refused on both ranks too.
    mixed = same if dist.get_rank() == 0 else (batch for batch in same)
    try:
        Trainer(Regressor(), mixed, log_dir=os.path.join(out, "mixed"), progress=False,
                keep_last=0).fit()
        mixed_error = None
    except ValueError as exc:
        mixed_error = str(exc)
    save(out, "unsharded", {"warnings": [str(w.message) for w in caught], "uneven": error,
                            "mixed": mixed_error})

    # A loss that goes NaN on rank 1 only, at step 3: every rank raises at the same
    # flush (or, with finite_check="step", before that step's update), naming rank 1.
    class NaNOnRank1(Regressor):
        def forward(self, batch):
            losses = super().forward(batch)
            if self.training and dist.get_rank() == 1 and int(self.step) == 3:
                losses["mse"] = losses["mse"] * float("nan")
            self.step += 1
            return losses

    class SeesFailure(Hook):
        failed = None

        def on_exception(self, trainer, exc):
            self.failed = type(exc).__name__

    nonfinite = {}
    # "last": the NaN is in the window of the last step, whose record lands after the
    # loop; it fails the fit as any other does.
    for check, steps in (("flush", 6), ("step", 6), ("last", 4)):
        model = NaNOnRank1()
        model.register_buffer("step", torch.ones((), dtype=torch.long))
        sees = SeesFailure()
        trainer = Trainer(model, data, max_steps=steps, log_every=4,
                          finite_check="step" if check == "step" else "flush",
                          log_dir=os.path.join(out, f"nan-{check}"), progress=False,
                          keep_last=0, callbacks=[sees])
        try:
            trainer.fit()
            nonfinite[check] = None
        except NonFiniteLossError as exc:
            nonfinite[check] = str(exc)
        nonfinite[f"{check}_at"] = [trainer.state.step, sees.failed,
                                    type(trainer.exception).__name__]
    save(out, "nonfinite", nonfinite)

    # A loss key only rank 1 has: in loss/total on rank 0 too, and its NaN stops both.
    class AuxOnRank1(Regressor):
        def __init__(self, nan_at: int) -> None:
            super().__init__()
            self.nan_at = nan_at
            self.register_buffer("step", torch.ones((), dtype=torch.long))

        def forward(self, batch):
            losses = super().forward(batch)
            if self.training and dist.get_rank() == 1:
                losses["aux"] = losses["mse"] * (0.5 if int(self.step) != self.nan_at
                                                 else float("nan"))
            self.step += 1
            return losses

    Trainer(AuxOnRank1(nan_at=0), data, max_steps=4, log_every=1, progress=False,
            log_dir=os.path.join(out, "aux"), keep_last=0).fit()
    try:
        Trainer(AuxOnRank1(nan_at=2), data, max_steps=4, log_every=2, progress=False,
                log_dir=os.path.join(out, "aux-nan"), keep_last=0).fit()
        aux_error = None
    except NonFiniteLossError as exc:
        aux_error = str(exc)
    save(out, "aux", {"error": aux_error})

    # Rank 0 alone opens the writers and writes to them: a writer factory failing there,
    # or a background write failing before a checkpoint, fails every rank at the same
    # point instead of leaving the other waiting in a collective.
    def unreachable_server(log_dir, start_step):
        raise OSError("the tracking server is down")

    class FullDisk:
        def write(self, record):
            raise OSError("disk full")

        def close(self):
            pass

    failures = {}
    for name, options in (("open", {"writers": [unreachable_server]}),
                          ("save", {"writers": [FullDisk()], "checkpoint_every": 2})):
        try:
            Trainer(Regressor(), data, max_steps=4, log_every=2, progress=False,
                    log_dir=os.path.join(out, f"writers-{name}"), **options).fit()
            failures[name] = None
        except (OSError, RuntimeError) as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
    save(out, "writers", failures)


def resume(out: str) -> None:
    kill_at = int(os.environ.get("KILL_AT", "0"))

    class Kill(Hook):
        def after_step(self, trainer):
            if trainer.dist.rank == 1 and trainer.state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    torch.manual_seed(0)
    model = Regressor(dropout=0.2)
    trainer = Trainer(model, DataLoader(dataset(), batch_size=8, shuffle=True), seed=3,
                      optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), max_epochs=2,
                      log_every=2, checkpoint_every=3, log_dir=os.path.join(out, "run"),
                      progress=False, callbacks=[Kill()] if kill_at else [])
    trainer.fit()
    save(out, "resume", {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                         "optimizer": trainer.optimizer.state_dict(),
                         "resumed_from": trainer.resumed_from, "step": trainer.state.step})


def elastic(out: str) -> None:
    """A run that torchrun --max-restarts restarts after one of its workers is killed.

    ``KILL=<point>:<step>`` kills a worker once (a marker file remembers it) with
    SIGKILL: ``forward`` (rank 1, inside the forward of that step), ``after_step`` (rank
    1), ``epoch`` (rank 1, as the epoch after that step begins), ``save`` (rank 0,
    halfway through writing that step's checkpoint), ``first`` (rank 1 after that step,
    then again in the first step after the restart's resume: two restarts). The final
    parameters and optimizer state go to ``elastic-rank<r>.pt``.
    """
    point, _, at = os.environ.get("KILL", ":0").partition(":")
    at = int(at or 0)
    marker = os.path.join(out, "killed")
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))

    def kill(where: str, step: int, mark: str = marker) -> None:
        if where == point and step == at and not os.path.exists(mark):
            open(mark, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    class Kill(Hook):
        def before_step(self, trainer):
            if rank == 1 and point == "epoch" and trainer.state.batch_in_epoch == 0:
                kill("epoch", trainer.state.step)
            if rank == 1 and point == "first" and restarts == 1 and \
                    trainer.state.step == self.resumed_at:
                kill("first", at, marker + "2")  # the first step of the restart

        def before_train(self, trainer):
            self.resumed_at = trainer.state.step

        def after_step(self, trainer):
            if rank == 1 and point in ("after_step", "first"):
                kill(point, trainer.state.step)

    class KillInForward(Regressor):
        def forward(self, batch):
            if rank == 1 and self.training:
                kill("forward", trainer.state.step + 1)
            return super().forward(batch)

    if rank == 0 and point == "save":
        real_save = torch.save

        def half_then_die(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("trainer", {}).get("step") == at \
                    and hasattr(f, "write") and not os.path.exists(marker):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
                f.flush()
                kill("save", at)
            return real_save(obj, f, *args, **kwargs)

        torch.save = half_then_die

    torch.manual_seed(0)
    model = KillInForward(dropout=0.2)
    trainer = Trainer(model, DataLoader(dataset(), batch_size=8, shuffle=True), seed=3,
                      optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), max_epochs=3,
                      log_every=2, checkpoint_every=3, log_dir=os.path.join(out, "run"),
                      progress=False, callbacks=[Kill()],
                      async_checkpoint=os.environ.get("ASYNC") == "1")
    trainer.fit()
    save(out, "elastic", {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                          "optimizer": trainer.optimizer.state_dict(), "restarts": restarts,
                          "resumed_from": trainer.resumed_from, "step": trainer.state.step})


MEAN_STEPS = 4


class AccuracyLM(TinyLM):
    """TinyLM that also writes its token accuracy as a Mean."""

    def forward(self, batch):
        losses = super().forward(batch)
        if self.training:
            logits = self.out(torch.tanh(self.mix(self.embed(batch["tokens"]))))
            real = batch["labels"] != -100
            correct = ((logits.argmax(-1) == batch["labels"]) & real).sum()
            write_summary("token_accuracy", Mean(correct, real.sum()))
        return losses


def lm_shard(rank: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """This rank's half of each step's 8 sequences (the reference's batch of 8), in
    batches of `batch`: ranks see different numbers of tokens."""
    sequences = lm_sequences(8 * MEAN_STEPS)
    return [pad_lm(sequences[step * 8 + rank * 4 + i:step * 8 + rank * 4 + i + batch])
            for step in range(MEAN_STEPS) for i in range(0, 4, batch)]


def means(out: str) -> None:
    rank = int(os.environ["RANK"])  # the Trainer joins the process group
    for strategy, unused in (("ddp", False), ("fsdp", False), ("ddp", True)):
        for name, batch, accum in (("plain", 4, 1), ("accum", 2, 2)):
            # find_unused_parameters: DDP looks for the tensors inside the Mean.
            name = f"{strategy}{'-unused' if unused else ''}-{name}"
            torch.manual_seed(0)
            model = AccuracyLM()
            trainer = Trainer(model, lm_shard(rank, batch), grad_accum_steps=accum,
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                              max_steps=MEAN_STEPS, log_every=1, strategy=strategy,
                              find_unused_parameters=unused,
                              log_dir=os.path.join(out, name), progress=False, keep_last=1,
                              checkpoint_format="full")
            trainer.fit()
            params = {k: v.detach().cpu() for k, v in model.state_dict().items()} \
                if strategy == "ddp" else torch.load(
                    os.path.join(out, name, "checkpoints", f"step-{MEAN_STEPS:09d}.pt"),
                    weights_only=True)["model"]
            save(out, name, {"params": params})
    try:
        Trainer(UncountedLM(), lm_shard(rank, 2), grad_accum_steps=2, max_steps=1,
                log_dir=os.path.join(out, "uncounted"), progress=False, keep_last=0).fit()
        save(out, "uncounted", {"error": None})
    except ModelOutputError as exc:
        save(out, "uncounted", {"error": str(exc)})
    metrics(out)


def metrics(out: str) -> None:
    """torchmetrics as evaluators: every rank evaluates the whole data, so a metric that
    counts its samples must count them once, not once per rank."""
    import torchmetrics

    class Count(torchmetrics.Metric):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("n", torch.tensor(0), dist_reduce_fx="sum")

        def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
            self.n += target.numel()

        def compute(self) -> torch.Tensor:
            return self.n

    trainer = Trainer(Regressor(), DataLoader(dataset(32), batch_size=8), max_steps=1,
                      log_dir=os.path.join(out, "metrics"), progress=False, keep_last=0)
    trainer.fit()
    results = trainer.evaluate(DataLoader(dataset(40), batch_size=8),
                               [Count(), torchmetrics.MeanSquaredError(),
                                MeanSquaredError(targets=1)])
    save(out, "metrics", results)


def locked(out: str) -> None:
    """A run on a directory whose lock another process holds: every rank must raise the
    same error (rank 0 takes the lock), and none must wait for the others."""
    from lossless_trainer import RunDirectoryInUseError

    trainer = Trainer(Regressor(), DataLoader(dataset(32), batch_size=8), max_steps=2,
                      log_dir=os.path.join(out, "held"), progress=False)
    try:
        trainer.fit()
    except RunDirectoryInUseError as exc:
        save(out, "locked", {"error": str(exc)})
        raise


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    {"equivalence": equivalence, "optional": optional, "resume": resume,
     "fsdp": lambda o: equivalence(o, "fsdp"), "means": means, "locked": locked,
     "elastic": elastic}[mode](out)
