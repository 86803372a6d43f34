"""Exact means: a loss (or summary) that is a sum over a varying number of items.

A model returns ``Mean(total, count)`` for a loss that is `total` summed over `count`
items (tokens, boxes, pixels). The step then trains on the global mean: every `total` of
the optimizer step, over all micro-batches and all ranks, divided by the sum of their
`count`s, which gives the gradient of one big batch whatever the split. The normaliser
must be known before the step's first backward (a gradient already in ``.grad`` cannot be
re-weighted term by term), without a host sync:

* one micro-batch per step: the counts come from the forward; under torchrun one
  all-reduce of them runs on the device between forward and backward;
* several micro-batches (``grad_accum_steps``): the model's ``count_items(batch)`` gives
  each micro-batch's counts before the first forward, and under torchrun they are
  all-reduced once, asynchronously, while the forwards run.

`Normaliser` does this for the trainer; see docs/means.md.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import ModelOutputError

__all__ = ["Mean", "Normaliser", "split_losses"]

Count = int | float | torch.Tensor

# What the count check keeps between two checks is summed every this many steps.
_FOLD_AT = 256


@dataclasses.dataclass(slots=True, eq=False)
class Mean:
    """A value that is `total` summed over `count` items: its mean is ``total / count``.

    Return it in the training-mode loss dict for a loss that is a mean over a varying
    number of items, so the trainer divides by the step's whole count (over every
    micro-batch and every rank) instead of averaging per-batch means. Pass it to
    `write_summary` for a metric whose window mean must be pooled the same way (token
    accuracy: ``Mean(correct, n_tokens)``).

    A dataclass registered as a pytree node, so DDP (``find_unused_parameters``), FSDP
    (which hooks the backward on the output's tensors) and ``torch.compile`` see the
    tensors inside it.

    Args:
        total: The sum over the items: a scalar tensor (for a loss, with a gradient) or,
            for a summary, a number.
        count: How many items `total` sums over: an int, a float (a sum of weights), or
            a scalar tensor (a count computed on the device, read without a sync). It may
            differ from batch to batch and from rank to rank; it may be 0.

    Examples:
        >>> nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
        ...                       ignore_index=-100, reduction="sum")
        >>> return {"nll": Mean(nll, (labels != -100).sum())}
    """

    total: torch.Tensor | float
    count: Count

    def __post_init__(self) -> None:
        total, count = self.total, self.count
        if isinstance(total, bool) or not isinstance(total, (torch.Tensor, numbers.Real)):
            raise TypeError(f"Mean(total, count): total must be a tensor or a number, got "
                            f"{type(total).__name__}")
        if isinstance(count, bool) or not isinstance(count, (torch.Tensor, numbers.Real)):
            raise TypeError(f"Mean(total, count): count must be an int, a float or a tensor, "
                            f"got {type(count).__name__}")
        if isinstance(count, torch.Tensor):
            if count.numel() != 1:
                raise ValueError(f"Mean(total, count): count must be one number, got a "
                                 f"tensor of shape {tuple(count.shape)}")
            if count.requires_grad:
                self.count = count.detach()
        elif not count >= 0:  # also refuses NaN
            raise ValueError(f"Mean(total, count): count must be >= 0, got {count}")

    @property
    def value(self) -> torch.Tensor | float:
        """``total / count``, the mean of this one batch (0 when both are 0)."""
        if isinstance(self.count, torch.Tensor):
            return self.total / self.count.clamp_min(1e-12)
        return self.total / self.count if self.count else self.total * 0.0



# torch has no public pytree registration; Hugging Face registers its outputs this way.
pytree.register_dataclass(Mean)
# A hook state or a checkpointed record holding a Mean loads with weights_only=True.
torch.serialization.add_safe_globals([Mean])


def split_losses(losses: Mapping[str, Any]) -> tuple[torch.Tensor | None,
                                                     dict[str, Mean] | None]:
    """The sum of a step's plain losses (a left fold, in their order) and its `Mean` terms
    by key (None for none of either): what a step backpropagates, and `total_loss`."""
    total = terms = None
    for key, loss in losses.items():
        if type(loss) is Mean:
            if terms is None:
                terms = {}
            terms[key] = loss
        else:
            total = loss if total is None else total + loss
    return total, terms


class Normaliser:
    """The scale of every `Mean` term of a step, known before its first backward.

    A term's scale is ``world_size / C``, where C is the step's count of its key over every
    micro-batch and rank (DDP and FSDP average gradients over ranks: the world size undoes
    that). A micro-batch then backpropagates ``sum(plain) / n_micro + sum(total * scale)``,
    and the accumulated gradient is that of the global mean.

    Who calls what: the trainer's step calls `begin` before the first forward when the
    model has ``count_items``, `objective` after each forward that returned a `Mean` (or
    whenever `active`), and `check` at flushes, checkpoints and the end of `fit`. A
    model without `Mean` terms never reaches it on a single process; under torchrun
    `objective` runs once, at the first step, to agree that no rank has any.

    Args:
        model: The user's model; its ``count_items(batch)``, if it has one, is used.
        dist: The trainer's `Distributed`.
        name: The model's class name, for errors.
    """

    def __init__(self, model: Any, dist: Any, name: str) -> None:
        count_items = getattr(model, "count_items", None)
        if count_items is None and isinstance(getattr(model, "module", None), torch.nn.Module):
            count_items = getattr(model.module, "count_items", None)  # a DDP the user built
        if count_items is not None and not callable(count_items):
            raise TypeError(f"{name}.count_items must be a method count_items(batch) -> "
                            f"dict of counts, got {type(count_items).__name__}")
        self.count_items: Callable[[Any], Any] | None = count_items
        self.dist = dist
        self.name = name
        self.world = dist.world_size if dist.enabled else 1
        self.device: torch.device = dist.device
        # The keys counted every step, agreed by every rank: count_items' keys, or under
        # torchrun the Mean keys of the first step. None until the first step.
        self.keys: tuple[str, ...] | None = None
        self._index: dict[str, int] = {}
        # Whether the step must consult the normaliser even without a Mean in sight.
        self.active = count_items is not None or dist.enabled
        self._counted: torch.Tensor | None = None  # this step's counts: local, then global
        self._work: Any = None  # the asynchronous all-reduce of `_counted`
        # This step's scales by key index: for float32 (and reduced precision) totals,
        # and for float64 ones. Python floats when the counts were on the host.
        self._ready = False
        self._scales32: list[torch.Tensor | float] = []
        self._scales64: list[torch.Tensor | float] | None = None
        self._vector64: torch.Tensor | None = None
        # What `check` compares, kept since the last check at no per-step device cost:
        # count_items' counts of every step (vectors by key index), the forwards' counts
        # by key index, and the steps they span.
        self._expected: list[torch.Tensor | list[float]] = []
        self._seen: list[list[Count]] = []
        self._window: tuple[int, int] | None = None

    # -- with count_items: before the first forward ---------------------------------------

    def begin(self, batches: Sequence[Any], step: int) -> None:
        """Count every micro-batch with ``count_items`` and start the all-reduce of the
        step's counts (asynchronous: it runs while the forwards do)."""
        assert self.count_items is not None
        with torch.no_grad():  # a count is a number, never part of the graph
            per_batch = [self._call_count_items(batch, step) for batch in batches]
        if self.keys is None:
            self._agree(tuple(sorted(per_batch[0])), step, from_count_items=True)
        keys = self.keys
        assert keys is not None
        for counts in per_batch:
            if set(counts) != set(keys):
                raise ModelOutputError(
                    f"{self.name}.count_items(batch) returned the keys {sorted(counts)} at "
                    f"step {step}, but {list(keys)} at its first call; it must return the "
                    "same keys for every batch (0 for a Mean term with nothing to count)")
        flat = [counts[key] for counts in per_batch for key in keys]
        host = _on_host(flat)
        if host is not None:  # counted on the host (numbers, CPU tensors): no device op
            local = [math.fsum(host[i::len(keys)]) for i in range(len(keys))]
            self._expected.append(local)
            counted = _vector(local, self.device) if self.dist.enabled else None
        else:  # counted on the device
            counted = _vector(flat, self.device)
            if len(per_batch) > 1:
                counted = counted.view(len(per_batch), len(keys)).sum(0)
            self._expected.append(counted.clone() if self.dist.enabled else counted)
        self._window = (self._window or (step, step))[0], step
        if len(self._expected) >= _FOLD_AT:
            self._fold()
        if self.dist.enabled:
            self._counted, self._ready = counted, False
            self._work = self.dist.all_reduce_sum(counted, async_op=True)
        else:
            self._set_scales(local if counted is None else counted)

    def _call_count_items(self, batch: Any, step: int) -> dict[str, Count]:
        assert self.count_items is not None
        counts = self.count_items(batch)
        if not isinstance(counts, dict) or not counts:
            raise ModelOutputError(
                f"{self.name}.count_items(batch) returned {type(counts).__name__} "
                f"{'(empty)' if isinstance(counts, dict) else ''} at step {step}; it must "
                "return a dict with, for each Mean term the model returns, its key and the "
                "number of items of this batch, e.g. {'nll': (labels != -100).sum()}")
        for key, count in counts.items():
            if type(count) is torch.Tensor and count.ndim == 0:
                continue  # the common case, in one test
            if isinstance(count, bool) or not isinstance(count, (numbers.Real, torch.Tensor)):
                raise ModelOutputError(
                    f"{self.name}.count_items(batch) returned {type(count).__name__} for "
                    f"{key!r} at step {step}; a count is an int, a float or a one-element "
                    "tensor")
            if isinstance(count, torch.Tensor) and count.numel() != 1:
                raise ModelOutputError(
                    f"{self.name}.count_items(batch) returned a tensor of shape "
                    f"{tuple(count.shape)} for {key!r} at step {step}; a count is one "
                    "number: reduce it with .sum()")
            if not isinstance(count, torch.Tensor) and not count >= 0:
                raise ModelOutputError(
                    f"{self.name}.count_items(batch) returned {count} for {key!r} at step "
                    f"{step}; a count is >= 0")
        return counts

    # -- after each forward -----------------------------------------------------------------

    def objective(self, plain: torch.Tensor | None, terms: dict[str, Mean] | None,
                  n_micro: int, step: int) -> torch.Tensor | None:
        """What this micro-batch backpropagates: its plain losses over `n_micro`, plus
        each `Mean` term's total times its scale. None if there is nothing to train on
        (cannot happen for a checked loss dict)."""
        if self.keys is None and self.count_items is None:
            # Under torchrun, the first step: agree on the Mean keys with every rank.
            if self.dist.enabled:
                self._agree(tuple(sorted(terms or ())), step, from_count_items=False)
                if not self.keys:
                    self.active = False
            if n_micro > 1 and (terms or self.keys):
                key = next(iter(terms)) if terms else self.keys[0]  # type: ignore[index]
                raise ModelOutputError(self._needs_count_items(key, step, n_micro))
        loss = None if plain is None else (plain / n_micro if n_micro > 1 else plain)
        if not terms and not self.keys:
            return loss
        index = self._step_scales(terms or {}, n_micro, step)
        for key, term in (terms or {}).items():
            total = term.total
            if total.dtype == torch.float64:  # a float64 model keeps float64 scales
                if self._scales64 is None:
                    self._scales64 = list(self._vector64.unbind())  # type: ignore[union-attr]
                scale = self._scales64[index[key]]
            else:
                scale = self._scales32[index[key]]
                if type(scale) is float and total.dtype != torch.float32:
                    total = total.float()  # a bf16/fp16 total times a number stays bf16
            part = total * scale
            loss = part if loss is None else loss + part
        return loss

    def _step_scales(self, terms: dict[str, Mean], n_micro: int, step: int,
                     ) -> dict[str, int]:
        """Set this step's scales (once per step with count_items) and return where each
        term's is: its index in them."""
        if self.count_items is not None:  # counted before the first forward
            seen, index = self._seen, self._index
            for key, term in terms.items():
                i = index.get(key)
                if i is None:
                    raise ModelOutputError(
                        f"loss {key!r} at step {step} is a Mean, but {self.name}.count_items"
                        f"(batch) gives no count for it (it gives {list(self.keys or ())}): "
                        f"add {key!r} to what count_items returns")
                seen[i].append(term.count)
            if not self._ready:
                self._set_scales(self._wait())
            return index
        if n_micro > 1:
            raise ModelOutputError(self._needs_count_items(next(iter(terms)), step, n_micro))
        if not self.dist.enabled:  # one micro-batch, one process: its own counts
            keys = list(terms)
            counts = [terms[k].count for k in keys]
            host = _on_host(counts)
            self._set_scales(_vector(counts, self.device) if host is None else host)
            return {key: i for i, key in enumerate(keys)}
        # Under torchrun: one all-reduce of the agreed keys' counts, forward to backward.
        for key in terms:
            if key not in self._index:
                raise ModelOutputError(
                    f"loss {key!r} at step {step} on rank {self.dist.rank} is a Mean, but "
                    f"no rank returned it at the first step (the Mean keys then were "
                    f"{list(self.keys or ()) or 'none'}). Under torchrun every rank counts "
                    "the same Mean keys at every step, agreed at the first step: return "
                    "every Mean term from the first step on (Mean(total, 0) when there is "
                    f"nothing to count), or define {self.name}.count_items(batch)")
        zero: Count = 0
        counts = [terms[key].count if key in terms else zero for key in self.keys or ()]
        counted = _vector(counts, self.device)
        self.dist.all_reduce_sum(counted, async_op=False)
        self._set_scales(counted)
        return self._index

    def _wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        assert self._counted is not None
        return self._counted

    def _set_scales(self, counts: torch.Tensor | list[float]) -> None:
        """world_size / count per key, as this step's scales. Counts on the host (or in
        a CPU tensor, read at no device cost) give Python floats, exact for any dtype.
        Counts on the device give tensors, float32 and float64 (on demand), with no
        sync. A count of 0 adds nothing of a total of 0; a NaN or negative count makes
        the loss NaN or wrong, and the flush names its key."""
        if isinstance(counts, torch.Tensor) and counts.device.type == "cpu":
            counts = counts.tolist()
        if isinstance(counts, list):
            self._scales32 = self._scales64 = [self.world / c if c else 0.0 for c in counts]
            self._vector64 = None
        else:
            self._vector64 = self.world / counts.clamp_min(1e-30)
            self._scales32 = list(self._vector64.to(torch.float32).unbind())
            self._scales64 = None
        self._ready = True

    # -- the count check ----------------------------------------------------------------------

    def check(self) -> None:
        """Raise if the forwards' Mean counts differ from what count_items said, summed
        over the steps since the last check. One device read; under torchrun every rank
        must call it at the same step (a flush, a checkpoint, the end of `fit`), and
        every rank raises together. Nothing to do without count_items."""
        window, self._window = self._window, None
        # Nothing counted since the last check (a checkpoint right after a flush): every
        # rank counts every step, so every rank returns here alike, with no collective.
        if self.count_items is None or self.keys is None or window is None:
            return
        self._fold()
        want, got = torch.stack([self._expected[0],  # type: ignore[list-item]
                                 _vector([c[0] for c in self._seen], self.device)]).tolist()
        bad = {key: (w, g) for key, w, g in zip(self.keys, want, got)
               if not math.isclose(w, g, rel_tol=1e-6, abs_tol=1e-6)}
        self._expected, self._seen = [], [[] for _ in self.keys]
        if self.dist.enabled and self.dist.any(bool(bad)) and not bad:
            raise ModelOutputError(
                f"{self.name}.count_items(batch) disagrees with the Mean counts of the "
                "forward on another rank (its error names the key and the steps)")
        if bad:
            raise ModelOutputError(self._mismatch(bad, window))

    def _fold(self) -> None:
        """Sum what `check` compares into one entry each (a vector of count_items'
        counts, one count per key of the forwards'), so memory stays bounded."""
        keys = self.keys or ()
        numbers = [e for e in self._expected if isinstance(e, list)]
        tensors = [e for e in self._expected if isinstance(e, torch.Tensor)]
        expected = _vector([math.fsum(column) for column in zip(*numbers)] if numbers
                           else [0.0] * len(keys), self.device)
        if tensors:
            expected = expected + torch.stack(tensors).to(expected.dtype).sum(0)
        self._expected = [expected]
        self._seen = [[_sum(counts, self.device)] for counts in self._seen]

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The agreed Mean keys, so a resumed run counts what the uninterrupted one did."""
        return {"keys": None if self.keys is None else list(self.keys)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the agreed keys (count_items' are agreed afresh: it defines them)."""
        if self.count_items is not None or state.get("keys") is None:
            return
        self.keys = tuple(state["keys"])
        self._index = {key: i for i, key in enumerate(self.keys)}
        self._seen = [[] for _ in self.keys]
        self.active = bool(self.keys)

    # -- agreement and errors -----------------------------------------------------------------

    def _agree(self, keys: tuple[str, ...], step: int, from_count_items: bool) -> None:
        if self.dist.enabled:
            gathered = self.dist.all_gather(keys)
            if from_count_items and any(other != keys for other in gathered):
                raise ModelOutputError(
                    f"{self.name}.count_items(batch) returned different keys on different "
                    f"ranks at step {step}: "
                    + "; ".join(f"rank {r}: {list(k)}" for r, k in enumerate(gathered))
                    + ". Every rank must count the same Mean keys (0 for none)")
            keys = tuple(sorted(set().union(*gathered)))
        self.keys = keys
        self._index = {key: i for i, key in enumerate(keys)}
        self._seen = [[] for _ in keys]

    def _needs_count_items(self, key: str, step: int, n_micro: int) -> str:
        return (
            f"loss {key!r} at step {step} is a Mean, and this step accumulates {n_micro} "
            "micro-batches (grad_accum_steps): to divide by the step's whole count, the "
            "counts of every micro-batch must be known before the first backward, and only "
            f"the model can give them. Define {self.name}.count_items(batch) returning "
            f"{{{key!r}: <number of items in batch>}} (for tokens, e.g. "
            "(batch['labels'] != -100).sum()); it is called with each micro-batch as the "
            "data yields it, before the step's first forward. Without it the step would "
            "train on a mean of means, which it refuses to do")

    def _mismatch(self, bad: dict[str, tuple[float, float]], window: tuple[int, int]) -> str:
        steps = f"step {window[0]}" if window[0] == window[1] else \
            f"steps {window[0]} to {window[1]}"
        counts = "; ".join(f"{key!r}: count_items counted {want:g}, the forward's Means "
                           f"{got:g}" for key, (want, got) in bad.items())
        return (
            f"{self.name}.count_items(batch) disagrees with the counts of the Mean terms "
            f"its forward returned, over {steps} ({counts}). The steps divided by "
            "count_items' counts, so they trained on a wrong mean: make count_items count "
            "exactly the items each Mean's total sums over")


def _on_host(counts: Sequence[Count]) -> list[float] | None:
    """The counts as numbers if none lives on an accelerator (reading a CPU tensor waits
    for nothing), else None."""
    values: list[float] = []
    for count in counts:
        if isinstance(count, torch.Tensor):
            if count.device.type != "cpu":
                return None
            values.append(count.item())
        else:
            values.append(float(count))
    return values


def _sum(counts: Sequence[Count], device: torch.device) -> Count:
    """The sum of numbers and one-element tensors, without a sync."""
    total: Count = math.fsum(float(c) for c in counts if not isinstance(c, torch.Tensor))
    tensors = [c.reshape(()).to(device) for c in counts if isinstance(c, torch.Tensor)]
    if tensors:
        total = torch.stack(tensors).to(torch.float64 if device.type != "mps"
                                        else torch.float32).sum() + total
    return total


def _vector(values: Sequence[Count], device: torch.device) -> torch.Tensor:
    """The counts as one float64 vector on `device` (float32 on MPS), with no host sync:
    numbers are filled on the device, tensors copied without blocking."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        vector = torch.tensor([float(v) for v in values], dtype=dtype)
        return vector if device.type == "cpu" else vector.to(device, non_blocking=True)
    if len(tensors) == len(values) and all(t.device == tensors[0].device for t in tensors):
        # The common case, in two operations: counts computed on one device.
        stacked = torch.stack([t if t.ndim == 0 else t.reshape(()) for t in tensors])
        return stacked.to(device=device, dtype=dtype, non_blocking=True)
    return torch.stack([
        v.reshape(()).to(device=device, dtype=dtype, non_blocking=True)
        if isinstance(v, torch.Tensor) else torch.full((), float(v), dtype=dtype, device=device)
        for v in values])
