"""The standard step's optimizers (`Trainer`'s ``optimizer=`` and ``lr_scheduler=``):
one; a list, whose optimizers step together; or a dict keyed by loss name, whose
optimizer ``"d"`` steps only at the steps where the model returned a loss named ``"d"``
or ``"d/<anything>"``.

The step is one backward of the summed losses either way. `Optimizers.stepping` says
which optimizers step (the same on every rank), `clip` clips each one's gradients on its
own, and `finish` steps their schedulers and drops every gradient, so an optimizer that
did not step keeps its state untouched and its parameters' gradients of that step are
gone. A checkpoint holds every optimizer and scheduler by name (`state_dict`); a resume
with other names is refused before anything changes (`check_state`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from .checkpointer import apply_optimizer_changes, compare_optimizers, optimizer_record
from .errors import ModelOutputError
from .gradients import clip_gradients

__all__ = ["Optimizers", "build_optimizer", "build_scheduler", "check_optimizer_options",
           "summary_name"]

# The name of the single optimizer of ``optimizer=<one>``: its summaries are ``lr`` and
# ``grad_norm``, its checkpoint entries ``optimizer``, ``optimizer_record`` and
# ``lr_scheduler``, as they always were.
ONE = ""

_FACTORY_HINT = ("in a list or a dict each factory is called with the model and picks its "
                 "own parameters, e.g. lambda model: torch.optim.AdamW("
                 "model.head.parameters(), lr=1e-3)")


def summary_name(base: str, name: str) -> str:
    """The tag of an optimizer's summary: ``base`` for the single optimizer (`ONE`),
    ``base/<name>`` for one of several."""
    return f"{base}/{name}" if name else base


def check_optimizer_options(optimizer: Any, lr_scheduler: Any) -> None:
    """Raise `TypeError`/`ValueError` for an ``optimizer=`` or ``lr_scheduler=`` that
    cannot work, before anything is built (`check_step_options` calls it)."""
    if isinstance(optimizer, (list, tuple, dict)):
        entries = _entries(optimizer)
        for name, entry in entries.items():
            where = f"optimizer[{name!r}]" if isinstance(optimizer, dict) else f"optimizer[{name}]"
            if not isinstance(entry, torch.optim.Optimizer) and not callable(entry):
                raise TypeError(f"{where} must be a torch.optim.Optimizer or a factory taking "
                                f"the model, got {type(entry).__name__}")
            if _takes_parameters(entry):
                raise TypeError(f"{where} is {_describe(entry)}, which would be called with "
                                f"the whole model: {_FACTORY_HINT}")
        _check_schedulers(lr_scheduler, entries, isinstance(optimizer, dict))
        return
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) \
            and not callable(optimizer):
        raise TypeError("optimizer must be a torch.optim.Optimizer, a factory taking the "
                        "model's parameters, or a list or dict of optimizers, got "
                        f"{type(optimizer).__name__}")
    if lr_scheduler is not None and not isinstance(lr_scheduler, LRScheduler) \
            and not callable(lr_scheduler):
        raise TypeError("lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler or a "
                        f"factory taking the optimizer, got {type(lr_scheduler).__name__}")


def _entries(optimizer: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """A list's or dict's optimizers by name (a list's: "0", "1", ...), the names checked."""
    if not optimizer:
        raise ValueError("optimizer is an empty list or dict; give at least one optimizer")
    if not isinstance(optimizer, dict):
        return {str(i): entry for i, entry in enumerate(optimizer)}
    for name in optimizer:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(
                f"optimizer={{...}}: each key names the losses its optimizer steps with "
                f"(the loss 'd' or 'd/<anything>' for the key 'd'), so it must be a "
                f"non-empty str without '/', got {name!r}")
    return dict(optimizer)


def _check_schedulers(lr_scheduler: Any, entries: dict[str, Any], keyed: bool) -> None:
    if lr_scheduler is None or (callable(lr_scheduler)
                                and not isinstance(lr_scheduler, LRScheduler)):
        return  # none, or one factory called with each optimizer
    if isinstance(lr_scheduler, LRScheduler):
        raise TypeError(
            "lr_scheduler is one scheduler, of one optimizer, but there are several "
            "optimizers: pass a dict {name: scheduler or factory} with the optimizers' "
            "keys (a list for a list), or one factory, called with each optimizer")
    if isinstance(lr_scheduler, dict):
        given = {str(name): value for name, value in lr_scheduler.items()}
    elif isinstance(lr_scheduler, (list, tuple)) and not keyed:
        if len(lr_scheduler) != len(entries):
            raise ValueError(f"lr_scheduler is a list of {len(lr_scheduler)}, and optimizer a "
                             f"list of {len(entries)}: give one (or None) per optimizer")
        given = {str(i): value for i, value in enumerate(lr_scheduler)}
    else:
        raise TypeError("with several optimizers, lr_scheduler must be a dict keyed like "
                        "optimizer, a list as long as its list, or one factory called with "
                        f"each optimizer; got {type(lr_scheduler).__name__}")
    unknown = sorted(set(given) - set(entries))
    if unknown:
        raise ValueError(f"lr_scheduler has {_names(unknown)}, which name no optimizer; the "
                         f"optimizers are {_names(entries)}")
    for name, value in given.items():
        if value is not None and not isinstance(value, LRScheduler) and not callable(value):
            raise TypeError(f"lr_scheduler[{name!r}] must be an LRScheduler, a factory taking "
                            f"the optimizer, or None; got {type(value).__name__}")


def _takes_parameters(entry: Any) -> bool:
    """Whether a factory is an optimizer class (or a partial of one): it takes
    parameters, not the model a list's or dict's factory is called with."""
    func = entry.func if isinstance(entry, functools.partial) else entry
    return inspect.isclass(func) and issubclass(func, torch.optim.Optimizer)


def _describe(entry: Any) -> str:
    func = entry.func if isinstance(entry, functools.partial) else entry
    return f"the optimizer class {getattr(func, '__name__', func)!s}"


def _names(names: Any) -> str:
    return ", ".join(repr(name) for name in names) or "none"


class Optimizers:
    """The optimizers of a run, by name, with their schedulers.

    Assumptions: built once the model is placed (and, under FSDP, sharded); every rank
    calls `stepping` at every step after the backward, and `finish` after the update.

    Args:
        optimizer: ``Trainer(optimizer=...)``: None, an optimizer, a factory (called with
            ``model.parameters()``), or a list or dict of optimizers and factories (each
            factory called with the model, choosing its parameters).
        lr_scheduler: ``Trainer(lr_scheduler=...)``.
        model: The model, placed.
        dist: This process's place in the run (a dict agrees across ranks on who steps).
    """

    def __init__(self, optimizer: Any, lr_scheduler: Any, model: nn.Module, dist: Any) -> None:
        self.keyed = isinstance(optimizer, dict)
        self.several = self.keyed or isinstance(optimizer, (list, tuple))
        self._dist = dist
        if not self.several:
            built = build_optimizer(optimizer, model)
            self.named = {ONE: built}
            self.schedulers = {ONE: build_scheduler(lr_scheduler, built)}
        else:
            self.named = {name: _build(name, entry, model)
                          for name, entry in _entries(optimizer).items()}
            self.schedulers = {name: build_scheduler(_scheduler_for(lr_scheduler, name, i), opt)
                               for i, (name, opt) in enumerate(self.named.items())}
        # What each was built with, before a scheduler changes lr: checkpoints keep it,
        # and a resume compares it with the checkpoint's (compare_optimizers).
        self.records = {name: optimizer_record(opt) for name, opt in self.named.items()}
        self._all = tuple(self.named.values())
        self._names = tuple(self.named)
        self._params = {name: [p for group in opt.param_groups for p in group["params"]
                               if p.requires_grad] for name, opt in self.named.items()}
        self._stepped: dict[int, tuple[torch.optim.Optimizer, ...]] = {}
        self._routes: dict[tuple[str, ...], int] = {}

    @property
    def optimizer(self) -> Any:
        """As the Trainer shows it: the optimizer, or the list or dict of them."""
        if not self.several:
            return self.named[ONE]
        return dict(self.named) if self.keyed else list(self.named.values())

    @property
    def lr_scheduler(self) -> Any:
        """The scheduler, or None; with several optimizers a list or dict like
        `optimizer`'s (None for each without one), or None when none has one."""
        if not self.several:
            return self.schedulers[ONE]
        if all(s is None for s in self.schedulers.values()):
            return None
        return dict(self.schedulers) if self.keyed else list(self.schedulers.values())

    # -- the step -----------------------------------------------------------------------------

    def check_parameters(self, model: nn.Module, where: str) -> None:
        """With several optimizers: every trainable parameter of `model` must belong to
        exactly one of them.

        Raises:
            ValueError: naming the parameters in none, and those in two or more.
        """
        if not self.several:
            return
        owners: dict[int, list[str]] = {}
        for name, opt in self.named.items():
            for group in opt.param_groups:
                for p in group["params"]:
                    owners.setdefault(id(p), []).append(name)
        missing, shared = [], []
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            held = owners.get(id(p), [])
            if not held:
                missing.append(pname)
            elif len(held) > 1:
                shared.append(f"{pname} (in {_names(held)})")
        if missing or shared:
            problems = []
            if missing:
                problems.append(f"in no optimizer: {_list(missing)}")
            if shared:
                problems.append(f"in more than one: {_list(shared)}")
            raise ValueError(
                f"optimizer: every trainable parameter of {where} must be updated by exactly "
                f"one of the optimizers {_names(self._names)}; {'; '.join(problems)}. Build "
                "each over its own part (freeze a parameter with requires_grad_(False) to "
                "leave it out)")

    def stepping(self, micro_losses: Sequence[Mapping[str, Any]], step: int
                 ) -> tuple[torch.optim.Optimizer, ...]:
        """The optimizers that step now: all of a list's; a dict's whose losses this
        step's micro-batches returned on any rank (under torchrun one small all-reduce
        on the CPU side channel, no device sync)."""
        if not self.keyed:
            return self._all
        mask = 0
        for losses in micro_losses:
            key = tuple(losses)
            routed = self._routes.get(key)
            if routed is None:
                routed = self._route(key, step)
            mask |= routed
        if self._dist.enabled:
            mask = self._dist.any_bits(mask, len(self._all))
        chosen = self._stepped.get(mask)
        if chosen is None:
            chosen = self._stepped[mask] = tuple(
                opt for i, opt in enumerate(self._all) if mask >> i & 1)
        return chosen

    def _route(self, key: tuple[str, ...], step: int) -> int:
        mask = 0
        for loss in key:
            name = loss.split("/", 1)[0]
            if name not in self.named:
                raise ModelOutputError(
                    f"the model returned the loss {loss!r} at step {step}, which matches none "
                    f"of the optimizers' keys {_names(self._names)}: the optimizer 'd' steps "
                    "with the losses 'd' and 'd/<anything>'; name the loss after the "
                    "optimizer it trains, or add one for it")
            mask |= 1 << self._names.index(name)
        if len(self._routes) < 1024:  # the combinations a model returns are few
            self._routes[key] = mask
        return mask

    def clip(self, stepping: Sequence[torch.optim.Optimizer], params: Sequence[nn.Parameter],
             max_norm: float | None, max_value: float | None,
             put: Callable[[str, torch.Tensor], None]) -> None:
        """Clip the gradients of each optimizer in `stepping` on its own (the single one's:
        `params`, the model's), and put each norm before clipping as ``grad_norm`` or
        ``grad_norm/<name>``."""
        if not self.several:
            put("grad_norm", clip_gradients(params, max_norm, max_value))
            return
        for name, opt in self.named.items():
            if opt in stepping and self._params[name]:
                put(summary_name("grad_norm", name),
                    clip_gradients(self._params[name], max_norm, max_value))

    def finish(self, stepping: Sequence[torch.optim.Optimizer]) -> None:
        """After the update: the schedulers of the optimizers that stepped step; every
        gradient is dropped (an optimizer that did not step loses this step's)."""
        if not self.several:
            scheduler = self.schedulers[ONE]
            if scheduler is not None:
                scheduler.step()
            self._all[0].zero_grad(set_to_none=True)
            return
        for name, opt in self.named.items():
            scheduler = self.schedulers[name]
            if scheduler is not None and opt in stepping:
                scheduler.step()
            opt.zero_grad(set_to_none=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self, optimizer_state: Callable[[torch.optim.Optimizer], dict[str, Any]]
                   ) -> dict[str, Any]:
        """The checkpoint's entries: the single optimizer's under ``optimizer``,
        ``optimizer_record`` and ``lr_scheduler``, as always; several under
        ``optimizer:<name>`` each (top level, so a sharded save writes each with DCP),
        with ``optimizers`` saying which, how they were built, and their schedulers."""
        if not self.several:
            scheduler = self.schedulers[ONE]
            return {"optimizer": optimizer_state(self.named[ONE]),
                    "optimizer_record": self.records[ONE],
                    "lr_scheduler": None if scheduler is None else scheduler.state_dict()}
        state: dict[str, Any] = {f"optimizer:{name}": optimizer_state(opt)
                                 for name, opt in self.named.items()}
        state["optimizers"] = {
            "kind": "dict" if self.keyed else "list", "names": list(self._names),
            "records": self.records,
            "lr_schedulers": {name: None if s is None else s.state_dict()
                              for name, s in self.schedulers.items()}}
        return state

    def check_state(self, state: dict[str, Any]) -> dict[str, list[tuple[int, str, Any, Any]]]:
        """Check that a checkpoint's optimizers are this run's (same names, classes,
        parameter groups, schedulers), before anything changes; returns each one's
        changed hyperparameters (`compare_optimizers`), which `load_state_dict` applies.

        Raises:
            ValueError: naming what differs (the checkpoint's path is added by resume).
        """
        saved = state.get("optimizers")
        if saved is None:
            kind, names = "one", [ONE]
            records = {ONE: state.get("optimizer_record")}
            schedulers = {ONE: state.get("lr_scheduler")}
        else:
            kind, names = saved["kind"], list(saved["names"])
            records, schedulers = saved["records"], saved["lr_schedulers"]
        mine = "dict" if self.keyed else "list" if self.several else "one"
        if (kind, names) != (mine, list(self._names)):
            raise ValueError(
                f"it was written with {_describe_set(kind, names)}, and this run has "
                f"{_describe_set(mine, list(self._names))}; pass the same optimizers to "
                "resume, or start a new run (another log_dir) from the model's weights")
        changes = {}
        for name in self._names:
            has = self.schedulers[name] is not None
            if (schedulers.get(name) is None) == has:
                raise ValueError(f"the checkpoint and this run disagree on having an "
                                 f"lr_scheduler{f' for the optimizer {name!r}' if name else ''}")
            try:
                changes[name] = compare_optimizers(records.get(name), self.records[name], has)
            except ValueError as exc:
                if not name:
                    raise
                raise ValueError(f"optimizer {name!r}: {exc}") from exc
        return changes

    def load_state_dict(self, state: dict[str, Any],
                        load: Callable[[torch.optim.Optimizer, dict[str, Any]], None],
                        changes: dict[str, list[tuple[int, str, Any, Any]]]) -> None:
        """Load what `state_dict` returned (checked by `check_state`) with `load`, the
        trainer's `load_optimizer_state_dict`; then apply this run's hyperparameters."""
        for name, opt in self.named.items():
            load(opt, state["optimizer" if not name else f"optimizer:{name}"])
            scheduler = self.schedulers[name]
            if scheduler is not None:
                scheduler.load_state_dict(state["lr_scheduler"] if not name
                                          else state["optimizers"]["lr_schedulers"][name])
            apply_optimizer_changes(opt, changes[name])


def _build(name: str, entry: Any, model: nn.Module) -> torch.optim.Optimizer:
    """One optimizer of a list or dict: given (over this model's parameters), or built by
    a factory called with the model."""
    if not isinstance(entry, torch.optim.Optimizer):
        try:
            built = entry(model)
        except TypeError as exc:  # most likely a factory of parameters, as for one optimizer
            raise TypeError(f"the factory of optimizer {name!r} failed when called with "
                            f"the model ({exc}): {_FACTORY_HINT}") from exc
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"the factory of optimizer {name!r} returned "
                            f"{type(built).__name__}, not a torch.optim.Optimizer")
        entry = built
    foreign = _foreign(entry, model)
    if foreign:
        raise ValueError(f"optimizer {name!r} holds {foreign} tensor(s) that are not "
                         f"parameters of {type(model).__name__}: {_FACTORY_HINT}")
    return entry


def _scheduler_for(lr_scheduler: Any, name: str, index: int) -> Any:
    if lr_scheduler is None or isinstance(lr_scheduler, LRScheduler):
        return lr_scheduler
    if isinstance(lr_scheduler, dict):
        return {str(k): v for k, v in lr_scheduler.items()}.get(name)
    if isinstance(lr_scheduler, (list, tuple)):
        return lr_scheduler[index]
    return lr_scheduler  # one factory, called with each optimizer


def _describe_set(kind: str, names: list[str]) -> str:
    if kind == "one":
        return "one optimizer"
    if kind == "list":
        return f"a list of {len(names)} optimizers"
    return f"a dict of the optimizers {_names(names)}"


def _list(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def build_optimizer(optimizer: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer: AdamW (lr 1e-3) by default, a factory's result, or one given,
    checked to update this model's parameters only."""
    if optimizer is None:
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer or a factory taking the model's "
                f"parameters, got {type(optimizer).__name__}"
            )
        built = optimizer(model.parameters())
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(
                f"the optimizer factory returned {type(built).__name__}, not a "
                "torch.optim.Optimizer"
            )
        return built
    foreign = _foreign(optimizer, model)
    if foreign:
        raise ValueError(
            f"the optimizer holds {foreign} tensor(s) that are not parameters of "
            f"{type(model).__name__}; build it from this model's parameters, or pass a "
            "factory such as functools.partial(torch.optim.SGD, lr=0.1)"
        )
    return optimizer


def build_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> LRScheduler | None:
    """The LR scheduler, given or built by a factory, checked to step per optimizer step
    and to schedule the Trainer's optimizer."""
    if scheduler is None:
        return None
    if not isinstance(scheduler, LRScheduler):
        if not callable(scheduler):
            raise TypeError(
                "lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler or a factory "
                f"taking the optimizer, got {type(scheduler).__name__}"
            )
        scheduler = scheduler(optimizer)
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(f"the lr_scheduler factory returned {type(scheduler).__name__}, "
                            "not an LRScheduler")
    if isinstance(scheduler, ReduceLROnPlateau):
        raise TypeError(
            "ReduceLROnPlateau steps on a metric, not once per optimizer step, so it cannot be "
            "the lr_scheduler; step it from a hook after each evaluation instead: "
            "scheduler.step(trainer.last_eval['val_loss']) (see docs/faq.md)"
        )
    if scheduler.optimizer is not optimizer:
        raise ValueError("lr_scheduler schedules a different optimizer than the Trainer's; "
                         "pass a factory (lambda opt: ...) so it is built on the right one")
    return scheduler


def _foreign(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """How many of `optimizer`'s tensors are not parameters of `model`."""
    own = {id(p) for p in model.parameters()}
    return sum(id(p) not in own for group in optimizer.param_groups for p in group["params"])
