"""When a loss goes NaN: the record a failing `fit` leaves, the replay of the failing step,
and the report that names its batch and the operation (#27).

- A `fit` that fails on a non-finite value (`NonFiniteLossError`) writes
  ``<log_dir>/nonfinite/failure.json``: the step, the ranks, the loss keys and the newest
  checkpoint before the step (`FailureHook`). Its error then ends with the command that
  replays it: the same command line with ``LOSSLESS_TRAINER_REPLAY=1``.
- With that variable set, `fit` is a replay (`Replay`, `ReplayHook`): it resumes from that
  checkpoint without writing, pruning or setting aside any, logs to a directory of its
  own, checks the losses, the gradients and the weights at every step (one sync each),
  and at the first non-finite one writes ``<log_dir>/nonfinite/step-<N>/``: each
  micro-batch of the step as the model received it (on the CPU), and ``report.json``
  (`write_report`), naming the first operation that produced a non-finite value
  (`first_nonfinite_operation`). Then it raises the same error, naming the report.
- With ``finite_check="step"`` the batch is at hand when the error is raised, and the
  report is written at once.

Nothing here runs while nothing fails: outside a replay `FailureHook` has no hook
method, only `settle`, which `TrainerBase` calls as `fit` ends.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .checkpoint import checkpoint_step, list_checkpoints, write_atomic
from .data import move_to_device
from .errors import NonFiniteLossError, extend_message, first_cause
from .hooks import Hook
from .means import Mean
from .resume import capture_rng, restore_rng
from .state import TrainerView, logger

__all__ = ["REPLAY", "Failure", "FailureHook", "Replay", "ReplayHook",
           "first_nonfinite_operation", "nonfinite_hook", "replay_from_env", "replayed",
           "summary", "write_report"]

REPLAY = "LOSSLESS_TRAINER_REPLAY"
FAILURE_FILE = "failure.json"


@dataclass
class Failure:
    """What `failure.json` holds.

    Attributes:
        step: The first step known to be non-finite (a loss's first step; for weights
            found non-finite at a checkpoint, the step of that checkpoint).
        ranks: The ranks it was found on first, when known.
        losses: The loss keys that went non-finite.
        checkpoint: The newest checkpoint before `step`, or None (the replay starts
            from the beginning).
        message: The error's message.
    """

    step: int
    ranks: list[int]
    losses: list[str]
    checkpoint: str | None
    message: str


def replayed(log_dir: Any, resume: Any, max_steps: int | None, keep_last: int
             ) -> tuple[Replay | None, tuple[Any, Any, int | None, int]]:
    """The replay the environment asks for (`replay_from_env`), and the loop's options
    it changes: the run directory, the checkpoint to resume from, the last step, and no
    checkpoints kept (the options as given without a replay)."""
    replay = replay_from_env(log_dir)
    if replay is None:
        return None, (log_dir, resume, max_steps, keep_last)
    return replay, (replay.run_dir, replay.resume, replay.max_steps, 0)


def replay_from_env(log_dir: str | os.PathLike[str] | None) -> Replay | None:
    """The replay ``LOSSLESS_TRAINER_REPLAY`` asks for, or None: ``1`` replays the failure
    recorded in `log_dir`; a path names the run directory (for a run whose directory was
    chosen for it).

    Raises:
        ValueError: the variable is set but no failure is recorded there.
    """
    value = os.environ.get(REPLAY, "")
    if value in ("", "0"):
        return None
    run_dir = os.fspath(log_dir) if value == "1" and log_dir is not None else value
    if value == "1" and log_dir is None:
        raise ValueError(f"{REPLAY}=1 replays the failure recorded in the run directory, but "
                         "this Trainer has no log_dir: set the variable to the run directory")
    path = os.path.join(run_dir, "nonfinite", FAILURE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            failure = Failure(**json.load(f))
    except FileNotFoundError:
        raise ValueError(f"{REPLAY} is set, but {path} does not exist: only a run that failed "
                         "on a non-finite value can be replayed") from None
    return Replay(run_dir, failure)


def nonfinite_hook(replay: Replay | None, named_for_it: bool = False) -> Hook:
    """The hook of this module a run has: a replay's checks, or else the record of a
    failure (`settle` only: nothing while nothing fails). `named_for_it`: the
    run directory was chosen for the run (no `log_dir`), so the replay command names
    it."""
    return FailureHook(named_for_it) if replay is None else ReplayHook(replay)


class Replay:
    """A failed run's steps again, up to its first non-finite one, changing nothing of the
    run: `TrainerBase` takes its `log_dir` (where the replay's own logs go), resumes from
    `resume` without setting anything aside, writes no checkpoint, and stops at
    `max_steps`.

    Args:
        run_dir: The failed run's directory.
        failure: What it recorded.
    """

    def __init__(self, run_dir: str, failure: Failure) -> None:
        self.run_dir, self.failure = run_dir, failure
        self.log_dir = os.path.join(run_dir, "nonfinite", f"replay-of-step-{failure.step}")
        # None: from the start, whatever the directory holds (its checkpoints are later).
        self.resume: str | None = failure.checkpoint
        self.max_steps = failure.step


# -- the record a failing fit leaves ------------------------------------------------------


class FailureHook(Hook):
    """Records a fit that failed on a non-finite value (`settle`, at the end of `fit`,
    once the first cause is known), and puts the command that replays it into the error;
    with ``finite_check="step"`` the report too, from the step's batches at hand. It has
    no hook method: nothing runs while nothing fails."""

    priority = 10  # before your hooks (`Priority.DEFAULT`), which may read what it checks

    def __init__(self, named_for_it: bool = False) -> None:
        self.named_for_it = named_for_it

    def settle(self, trainer: Any, exc: BaseException | None,
               errors: list[BaseException]) -> BaseException | None:
        """What `fit` raises (`first_cause` of `exc` and the teardown's `errors`), a
        non-finite one recorded first."""
        error = _settled(trainer, exc, errors)
        if isinstance(error, NonFiniteLossError) and error.replay is None:
            try:
                self._record(trainer, error)
            except Exception as problem:  # the record must not hide the error it records
                logger.warning("could not record the non-finite failure: %s", problem)
        return error

    def _record(self, trainer: Any, exc: NonFiniteLossError) -> None:
        # A loss's first step; for weights found non-finite at a checkpoint, its step.
        step = min(exc.first_steps.values()) if exc.first_steps else trainer.state.step
        earlier = [path for s, path in list_checkpoints(trainer.checkpoint_dir) if s < step]
        started = trainer.resumed_from  # the checkpoint this fit began from, if any
        if not earlier and started and (checkpoint_step(started) or step) < step:
            earlier = [started]
        failure = Failure(step=step, ranks=sorted(set((exc.ranks or {}).values())),
                          losses=sorted(exc.first_steps), message=str(exc),
                          checkpoint=earlier[-1] if earlier else None)
        where = os.path.join(trainer.log_dir, "nonfinite")
        if trainer.dist.is_main:
            os.makedirs(where, exist_ok=True)
            _write_json(os.path.join(where, FAILURE_FILE), asdict(failure))
        report = None
        if getattr(trainer, "finite_check", None) == "step" and exc.first_steps:
            report = _report_at_hand(trainer, exc, step)
        command = replay_command(trainer.log_dir if self.named_for_it else None)
        exc.replay = (f"The record is in {where}. " + (
            f"The report of step {step}, with its batches, is in {report}. "
            if report else "")
            + (f"To replay step {step}" if exc.first_steps else  # weights: by this step
               f"To replay the steps up to {step}, stopping at the first non-finite value,")
            + " from " + (f"checkpoint {failure.checkpoint}" if failure.checkpoint
                          else "the start")
            + f" and save its batch and the operation that failed: {command}")
        extend_message(exc, exc.replay)


def _settled(trainer: Any, exc: BaseException | None,
             errors: list[BaseException]) -> BaseException | None:
    """`TrainerBase._teardown`'s outcome: after `exc`, its first cause (`first_cause`),
    which becomes `trainer.exception`; else the teardown's first error, or None."""
    if exc is None:
        return next(iter(errors), None)
    trainer.exception = first_cause(exc, errors)
    return trainer.exception


def replay_command(run_dir: str | None = None) -> str:
    """This process's command line with the replay variable set (to 1, or to `run_dir`
    for a run whose directory was chosen for it: the same command would choose
    another): as Python received it (``python -m pkg.train``, flags kept); under
    torchrun, the torchrun command (read from the parent process)."""
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    if "TORCHELASTIC_RUN_ID" in os.environ:
        parent = _parent_command()
        if parent and any("torchrun" in part or "torch.distributed.run" in part
                          for part in parent[:3]):
            argv = parent
    return f"{REPLAY}={shlex.quote(run_dir) if run_dir else 1} {shlex.join(argv)}"


def _parent_command() -> list[str] | None:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parts = [p.decode() for p in f.read().split(b"\0") if p]
    except OSError:
        return None
    return parts or None


# -- the replay ---------------------------------------------------------------------------


class ReplayHook(Hook):
    """Checks every step of a replay, and writes the report at the first non-finite value.

    Each call of `compute_losses` is recorded (its arguments and the RNG state before it)
    so the failing micro-batch can be run again; after the backward the step's losses and
    gradients are checked (not under fp16, where a non-finite gradient only skips the
    step), after the update the weights.
    """

    priority = 10  # before your hooks (`Priority.DEFAULT`), which may read what it checks

    def __init__(self, replay: Replay) -> None:
        self.replay = replay
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], Any, Mapping[str, Any]]] = []
        self.found = False
        self.raised: NonFiniteLossError | None = None  # the replay's own error

    def before_train(self, trainer: TrainerView) -> None:
        trainer.checkpointer.read_only = True  # type: ignore[attr-defined] # a hook's too
        original = getattr(trainer, "compute_losses")  # noqa: B009 - not on TrainerView

        def recorded(*args: Any, **kwargs: Any) -> Any:
            rng = capture_rng()
            losses = original(*args, **kwargs)
            self.calls.append((args, kwargs, rng, losses))
            return losses

        setattr(trainer, "compute_losses", recorded)  # noqa: B010 - shadows the method
        logger.warning("replaying %s from %s, checking every step up to step %d",
                       self.replay.run_dir, self.replay.failure.checkpoint or "the start",
                       self.replay.max_steps)

    def before_step(self, trainer: TrainerView) -> None:
        self.calls = []

    def after_backward(self, trainer: TrainerView) -> None:
        found = None
        for index, (_, _, _, losses) in enumerate(self.calls):
            bad = [key for key, value in losses.items() if not _finite(value)]
            if bad:
                found = ("loss", bad, index)
                break
        if found is None and trainer.precision.mode != "fp16":  # fp16 skips such steps
            bad = [name for name, p in trainer.model.named_parameters()
                   if p.grad is not None and not _finite(_local(p.grad))]
            if bad:
                found = ("gradient", bad, None)
        self._check(trainer, trainer.state.step + 1, found)

    def after_step(self, trainer: TrainerView) -> None:
        bad = [name for name, p in trainer.model.named_parameters()
               if p.is_floating_point() and not _finite(_local(p))]
        self._check(trainer, trainer.state.step, ("weights", bad, None) if bad else None)

    def after_train(self, trainer: TrainerView) -> None:
        if trainer.exception is None and not self.found \
                and trainer.state.step >= self.replay.max_steps:  # not stopped before it
            raise RuntimeError(
                f"the failure did not reproduce: the replay of {self.replay.run_dir} reached "
                f"step {trainer.state.step} from "
                f"{self.replay.failure.checkpoint or 'the start'} without a non-finite loss, "
                "gradient or weight. Common causes: nondeterministic kernels (atomics in "
                "scatter/index_add, cuDNN autotuning; try torch.use_deterministic_algorithms"
                "(True)), or data that changed since the run (files rewritten, another "
                "shuffle, a DataLoader whose workers draw their own random numbers)")

    def _check(self, trainer: TrainerView, step: int,
               found: tuple[str, list[str], int | None] | None) -> None:
        """Raise on every rank if any found a non-finite value (under torchrun one
        collective per check), after writing the report."""
        if not (trainer.dist.any(found is not None) if trainer.dist.enabled else found):
            return
        self.found = True
        report = write_report(trainer, step, found, self.calls)
        what, names = (found[0], found[1]) if found else ("value", ["on another rank"])
        if trainer.dist.is_main and report:
            print(summary(report), flush=True)
        self.raised = NonFiniteLossError(
            f"non-finite {what} at step {step} in the replay ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}); the report, with the step's batches "
            f"and the operation that produced it, is {report}",
            {name: step for name in names} if what == "loss" else {})
        raise self.raised

    def settle(self, trainer: Any, exc: BaseException | None,
               errors: list[BaseException]) -> BaseException | None:
        """What `fit` raises: the replay's own error, never replaced by what the teardown
        found after it; a non-finite loss that the step itself raised first
        (``finite_check="step"``) gets its report here."""
        vars(trainer).pop("compute_losses", None)  # the method again
        if self.raised is not None:
            trainer.exception = self.raised
            return self.raised
        error = _settled(trainer, exc, errors)
        if isinstance(error, NonFiniteLossError) and error.first_steps and self.calls:
            index = next((i for i, (_, _, _, losses) in enumerate(self.calls)
                          if not all(_finite(v) for v in losses.values())), None)
            found = None if index is None else ("loss", sorted(error.first_steps), index)
            report = write_report(trainer, min(error.first_steps.values()), found, self.calls)
            if report:
                print(summary(report), flush=True)
                extend_message(error, f"The report of the replay, with the step's batches and the "
                               f"operation that produced it, is {report}")
        return error


# -- the report ---------------------------------------------------------------------------


Call = tuple[tuple[Any, ...], dict[str, Any], Any, Mapping[str, Any]]


def write_report(trainer: TrainerView, step: int,
                 found: tuple[str, Sequence[str], int | None] | None,
                 calls: Sequence[Call]) -> str | None:
    """Write ``<log_dir>/nonfinite/step-<step>/`` and return its report's path (None if
    no rank found anything).

    Every rank saves its micro-batches on the CPU (``batch-r<rank>-m<i>.pt``); a rank
    that `found` a non-finite value adds its part: ``(what, names, micro-batch)``, what
    being ``"loss"``, ``"gradient"`` or ``"weights"``, names the losses or parameters,
    the micro-batch None when to be found. `calls`: the step's `compute_losses` calls
    (arguments, RNG state before, losses). Under torchrun rank 0 gathers the parts (a
    collective, when the ranks can still agree; else each rank writes its own
    ``report-r<rank>.json``): the report is the lowest failing rank's, with
    ``failed_ranks`` and the others' parts.
    """
    where = os.path.join(trainer.log_dir, "nonfinite", f"step-{step}")
    os.makedirs(where, exist_ok=True)
    dist, part = trainer.dist, None
    try:
        files = []
        for i, (args, _, _, _) in enumerate(calls):
            files.append(f"batch-r{dist.rank}-m{i}.pt")
            torch.save(_to_cpu(args[0] if len(args) == 1 else list(args)),
                       os.path.join(where, files[-1]))
        together = _search_together(trainer, found, calls) if _needs_every_rank(trainer) \
            else None
        if found is not None:
            part = _part(trainer, step, found, calls, files, together)
    except Exception as error:  # the report must not hide the error it reports
        part = {"rank": dist.rank, "error": f"{type(error).__name__}: {error}"}
    gathered = dist.all_gather(part) if dist.enabled else [part]
    if len(gathered) < dist.world_size:  # the ranks cannot agree any more: each its own
        if part is None:
            return None
        path = os.path.join(where, f"report-r{dist.rank}.json")
        _write_json(path, {**part, "failed_ranks": [dist.rank]})
        return path
    path = os.path.join(where, "report.json")
    failed = [p for p in gathered if p is not None]
    if dist.is_main and failed:
        report = {**failed[0], "failed_ranks": [p["rank"] for p in failed]}
        if len(failed) > 1:
            report["other_ranks"] = failed[1:]
        _write_json(path, report)
    return path if failed else None


def summary(path: str) -> str:
    """A few lines saying what the report at `path` found."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return f"[lossless_trainer] replay: no report at {path}"
    names = report.get("nonfinite_losses") if report.get("what") == "loss" else report.get(
        f"nonfinite_{'gradients' if report.get('what') == 'gradient' else 'weights'}", [])
    lines = [f"[lossless_trainer] replay: step {report.get('step')}, rank "
             f"{report.get('rank')}, micro-batch {report.get('micro_batch')}: non-finite "
             f"{report.get('what')} ({', '.join(map(str, (names or [])[:5]))})"]
    operation = report.get("first_operation") or {}
    if operation.get("operation"):
        where = operation.get("where") or ["(no frame of the model's code)"]
        place = where[-1] if isinstance(where, list) else where
        lines.append(f"  first operation: {operation['operation']} in the "
                     f"{operation.get('phase')}, at {place}")
    elif operation:
        lines.append(f"  first operation: {operation.get('where')}")
    lines.append(f"  report and batches: {os.path.dirname(path)}")
    return "\n".join(lines)


def _needs_every_rank(trainer: TrainerView) -> bool:
    """Whether running a micro-batch again takes every rank (FSDP's all-gathers,
    SyncBatchNorm's statistics), so all must search at once."""
    return trainer.dist.enabled and (trainer.dist.strategy == "fsdp" or any(
        isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules()))


def _search_together(trainer: TrainerView, found: tuple[str, Sequence[str], int | None] | None,
                     calls: Sequence[Call]) -> tuple[int, dict[str, Any]] | None:
    """Every rank runs the same micro-batch again at once (its own), the failing rank's
    (for a gradient, each in turn until a rank finds the operation); returns this rank's
    micro-batch and finding. None when the ranks cannot agree any more, or nothing to
    search."""
    dist = trainer.dist
    wanted = dist.all_gather(None if found is None or found[0] == "weights" or not calls
                             else found[2] if found[2] is not None else -1)
    if len(wanted) < dist.world_size or all(w is None for w in wanted):
        return None
    first = next(w for w in wanted if w is not None)
    for index in [first] if first >= 0 else range(len(calls)):
        args, kwargs, rng, _ = calls[index]
        operation = first_nonfinite_operation(trainer.model, args, kwargs, rng,
                                              trainer.precision.autocast)
        if first >= 0 or dist.any(operation["phase"] is not None):
            return index, operation
    return None


def _part(trainer: TrainerView, step: int, found: tuple[str, Sequence[str], int | None],
          calls: Sequence[Call], files: list[str],
          together: tuple[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """This rank's part of the report (`together`: the micro-batch and the operation all
    ranks searched at once)."""
    what, names, index = found
    operation = None
    if what != "weights" and calls:
        if _needs_every_rank(trainer):
            index, operation = together if together is not None else (index, {
                "phase": None, "operation": None,
                "where": "not searched: the ranks could not run it again together"})
        else:  # a gradient: the first micro-batch whose backward makes one
            for i in ([index] if index is not None else range(len(calls))):
                args, kwargs, rng, _ = calls[i]
                operation = first_nonfinite_operation(trainer.model, args, kwargs, rng,
                                                      trainer.precision.autocast)
                if operation["phase"] is not None:
                    index = i
                    break
    index = len(calls) - 1 if index is None else index
    part: dict[str, Any] = {"step": step, "rank": trainer.dist.rank, "micro_batch": index,
                            "what": what, "batches": files}
    if calls:
        losses = calls[index][3]
        part["losses"] = {key: _number(value) for key, value in losses.items()}
        part["nonfinite_losses"] = [key for key, value in losses.items() if not _finite(value)]
    if what != "loss":
        part[f"nonfinite_{'gradients' if what == 'gradient' else 'weights'}"] = list(names)
    if operation is not None:
        part["first_operation"] = operation
    return part


def _report_at_hand(trainer: TrainerView, exc: NonFiniteLossError, step: int) -> str | None:
    """``finite_check="step"``: the report from the step's batches, still at hand (the
    micro-batches up to the failing one, whose losses the step checked)."""
    losses = list(trainer.micro_losses)
    if not losses:
        return None
    calls = [((move_to_device(batch, trainer.device),), {}, None, micro)
             for batch, micro in zip(trainer.micro_batches, losses)]
    index = next((i for i, micro in enumerate(losses)
                  if any(not _finite(v) for v in micro.values())), None)
    found = None if index is None else ("loss", sorted(exc.first_steps), index)
    try:
        return write_report(trainer, step, found, calls)
    except Exception as error:  # the report must not hide the error it reports
        logger.warning("could not write the report of step %d: %s", step, error)
        return None


class _Watch(TorchDispatchMode):
    """Records the first operation whose output is not finite while its inputs are: in
    the forward, the operation and the model's lines that called it; in the backward,
    the backward function running it (``SqrtBackward0``), the operation inside it, and
    the forward lines that function comes from (recorded by anomaly mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, Any] | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        # Inputs count a float argument too: a mask filled with -inf is meant, not found.
        if self.found is None and not _all_finite(out) and _all_finite((args, kwargs)):
            self.found = self._where(func)
        return out

    @staticmethod
    def _where(func: Any) -> dict[str, Any]:
        name = str(func.overloadpacket.__name__)
        node = torch._C._current_autograd_node()
        if node is None:
            return {"operation": name, "where": _user_frames(traceback.extract_stack()[:-2])}
        return {"operation": node.name(), "kernel": name, "where": _forward_trace(
            "".join(node.metadata.get("traceback_", [])))}


def first_nonfinite_operation(model: torch.nn.Module, args: tuple[Any, ...],
                              kwargs: dict[str, Any], rng: Any,
                              autocast: Callable[[], Any]) -> dict[str, Any]:
    """Run `model` eagerly on `args` (with the RNG state `rng` restored, under
    `autocast`), checking every operation's output, then its backward under
    `torch.autograd.detect_anomaly`; return the first operation that produced a NaN or
    Inf from finite inputs and where in the model's code it ran (the forward call of a
    backward function), or what prevented finding one."""
    saved = capture_rng()
    compiled = getattr(model, "_compiled_call_impl", None)
    try:
        if rng is not None:
            restore_rng(rng)
        model._compiled_call_impl = None  # type: ignore[assignment] # the eager model
        if not _all_finite(args):
            return {"phase": "input", "operation": None,
                    "where": "the batch itself holds NaN or Inf"}
        def run() -> torch.Tensor:
            with autocast():
                losses = model(*args, **kwargs)
            return sum(_value(v) for v in losses.values()) if isinstance(losses, Mapping) \
                else losses

        watch = _Watch()
        with watch:
            run()
        if watch.found is not None:
            return {"phase": "forward", **watch.found}
        if rng is not None:
            restore_rng(rng)  # the same forward again, for the backward
        return _backward_operation(run, [p for p in model.parameters() if p.requires_grad])
    except Exception as error:  # a model that cannot run twice, say: the report says so
        return {"phase": None, "operation": None,
                "where": f"the micro-batch could not be run again: {type(error).__name__}: "
                         f"{error}"}
    finally:
        model._compiled_call_impl = compiled  # type: ignore[assignment]
        restore_rng(saved)


def _backward_operation(run: Callable[[], Any], params: list[torch.nn.Parameter]
                        ) -> dict[str, Any]:
    """Run the forward again under anomaly mode (which records where each backward
    function comes from), then the backward under `_Watch`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode's own warning
        with torch.autograd.detect_anomaly(check_nan=False):
            total = run()
            watch = _Watch()
            with watch:
                torch.autograd.grad(total, params, allow_unused=True)
    if watch.found is not None:
        return {"phase": "backward", **watch.found}
    return {"phase": None, "operation": None,
            "where": "no operation produced a non-finite value when this micro-batch ran "
                     "again (the value may depend on the order of earlier steps' state)"}


def _forward_trace(trace: str) -> list[str]:
    """`_user_frames` of a forward traceback as anomaly mode keeps it (the text of
    `traceback.format_stack`)."""
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    frames = []
    for i, line in enumerate(lines):
        if line.startswith('File "'):
            file, rest = line.split('"')[1], line.split('"', 2)[2]  # , line 12, in forward
            number = rest.split("line", 1)[-1].split(",")[0].strip()
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith(
                'File "') else ""
            frames.append(traceback.FrameSummary(file, int(number) if number.isdigit() else 0,
                                                 rest.rsplit("in ", 1)[-1].strip(), line=code))
    return _user_frames(frames)


def _user_frames(stack: Iterable[traceback.FrameSummary]) -> list[str]:
    """The frames of the model's code in `stack`, innermost last, as ``file:line in
    function: code``: those after the trainer called the model (the last frame of this
    package), leaving out torch's and the standard library's."""
    frames = list(stack)
    ours = [i for i, frame in enumerate(frames) if _in_package(frame.filename)]
    inside = frames[ours[-1] + 1:] if ours else frames
    return [f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
            for frame in inside if _is_user_file(frame.filename)][-8:]


_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(module.__file__ or ""))
                      for module in (torch, sys.modules[__package__ or "lossless_trainer"]))


def _in_package(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_LIBRARY_DIRS[1])


def _is_user_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    return not path.startswith(_LIBRARY_DIRS) and not path.startswith(
        os.path.dirname(os.__file__)) and "<frozen" not in filename


# -- small helpers --------------------------------------------------------------------------


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP tensor (a DTensor), or the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _value(value: Any) -> torch.Tensor:
    return value.total if type(value) is Mean else value


def _finite(value: Any) -> bool:
    tensor = _value(value)
    return bool(torch.isfinite(tensor).all()) if isinstance(tensor, torch.Tensor) else \
        math.isfinite(tensor)


def _all_finite(tree: Any) -> bool:
    """Whether every floating tensor and float in `tree` is finite."""
    leaves = pytree.tree_leaves(tree)
    if any(isinstance(x, float) and not math.isfinite(x) for x in leaves):
        return False  # a -inf fill value, say
    tensors = [t for t in leaves
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())



def _number(value: Any) -> float | str:
    tensor = _value(value)
    if type(value) is Mean:
        tensor = value.total / value.count
    number = float(tensor.detach().float()) if isinstance(tensor, torch.Tensor) else float(tensor)
    return number if math.isfinite(number) else str(number)


def _to_cpu(batch: Any) -> Any:
    """`batch` on the CPU, as tensors, lists, tuples and dicts (what
    ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu()
    if isinstance(batch, Mapping):
        return {key: _to_cpu(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_cpu(value) for value in batch) if type(batch) in (list, tuple) \
            else [_to_cpu(value) for value in batch]
    if hasattr(batch, "__dataclass_fields__"):
        return {name: _to_cpu(getattr(batch, name)) for name in batch.__dataclass_fields__}
    return batch


def _write_json(path: str, value: Any) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()))
