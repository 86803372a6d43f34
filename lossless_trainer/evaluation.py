"""Evaluation: the evaluator protocol, ready evaluators, and the evaluation loop.

In eval mode a model returns predictions; an evaluator sees each batch with its
predictions and streams a metric (no evaluator keeps every prediction). A validation
loss needs no evaluator: the model computes it in eval mode when labels are present and
logs it with `write_summary`; the evaluation loop averages such summaries over the whole
evaluation and writes them under ``eval/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.utils._pytree as pytree

from .data import Selector, move_to_device, select
from .precision import Precision
from .summary import SummarySink

if TYPE_CHECKING:
    from .distributed import Distributed

__all__ = ["Accuracy", "Evaluator", "MeanSquaredError", "TorchMetric", "as_evaluator",
           "evaluate_in_run", "merge_results", "run_evaluation"]


@runtime_checkable
class Evaluator(Protocol):
    """Streams a metric over an evaluation.

    `reset` starts an evaluation, `process` sees every batch (as the data yields it,
    moved to the device) with the model's eval-mode predictions, and `compute` returns
    named floats. Keep running sums, not predictions, so memory does not grow with the
    data set.
    """

    def reset(self) -> None:
        """Forget everything seen; called before every evaluation."""
        ...

    def process(self, batch: Any, predictions: Any) -> None:
        """Add one batch to the running state.

        Args:
            batch: The batch as the data yielded it, moved to the device.
            predictions: What the model returned for it in eval mode.
        """
        ...

    def compute(self) -> dict[str, float]:
        """The metric(s) over every batch since `reset`, as named floats."""
        ...


class _Streaming:
    """What the ready evaluators share: where targets and predictions are."""

    def __init__(self, targets: Selector | None, predictions: Selector | None,
                 name: str) -> None:
        self.targets = targets
        self.predictions = predictions
        self.name = name
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError

    def _pair(self, batch: Any, predictions: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(the relevant predictions, the targets) of one batch."""
        if self.predictions is not None:
            predictions = select(predictions, self.predictions, 0, "predictions",
                                 type(self).__name__)
        return predictions, select(batch, self.targets, 1, "targets", type(self).__name__)


class Accuracy(_Streaming):
    """Top-k classification accuracy.

    Args:
        top_k: The k values to report, as ``accuracy`` for k=1 and ``top<k>_accuracy``
            otherwise.
        targets: Where the class indices are in the batch: an index, a key or a callable
            (as for `WithLoss`). Default: ``batch[1]``.
        predictions: Picks the scores from the model's predictions (a key or callable)
            when they are not the predictions themselves.
        name: Prefix of the keys (``"<name>accuracy"``), to tell several apart.

    Predictions are scores of shape ``(N, C)``, or class indices of shape ``(N,)`` (then
    only ``top_k=(1,)`` is possible).
    """

    def __init__(self, top_k: Sequence[int] = (1,), targets: Selector | None = None,
                 predictions: Selector | None = None, name: str = "") -> None:
        if not top_k or any(k < 1 for k in top_k):
            raise ValueError(f"top_k must be positive ints, got {tuple(top_k)}")
        self.top_k = tuple(sorted(set(top_k)))
        super().__init__(targets, predictions, name)

    def reset(self) -> None:
        self._correct: torch.Tensor | None = None
        self._count = 0

    def process(self, batch: Any, predictions: Any) -> None:
        scores, target = self._pair(batch, predictions)
        if scores.ndim == 1:
            if self.top_k != (1,):
                raise ValueError(
                    "Accuracy got class indices of shape (N,); top-k above 1 needs scores of "
                    "shape (N, C)"
                )
            correct = (scores == target).sum().reshape(1)
        else:
            k_max = min(self.top_k[-1], scores.shape[-1])
            top = scores.topk(k_max, dim=-1).indices
            hits = top == target.unsqueeze(-1)
            correct = torch.stack([hits[:, :k].any(-1).sum() for k in self.top_k])
        # Kept on the device: no sync per batch.
        self._correct = correct if self._correct is None else self._correct + correct
        self._count += int(target.shape[0])

    def compute(self) -> dict[str, float]:
        if self._correct is None or self._count == 0:
            raise ValueError("Accuracy.compute() before any batch was processed")
        rates = (self._correct.double() / self._count).tolist()
        return {f"{self.name}{'accuracy' if k == 1 else f'top{k}_accuracy'}": rate
                for k, rate in zip(self.top_k, rates)}


class MeanSquaredError(_Streaming):
    """Mean squared error between predictions and targets, over all elements.

    Args:
        targets: Where the targets are in the batch (index, key or callable).
            Default: ``batch[1]``.
        predictions: Picks the values from the predictions when needed.
        name: The key (default ``"mse"``).
    """

    def __init__(self, targets: Selector | None = None, predictions: Selector | None = None,
                 name: str = "mse") -> None:
        super().__init__(targets, predictions, name)

    def reset(self) -> None:
        self._sum: torch.Tensor | None = None
        self._count = 0

    def process(self, batch: Any, predictions: Any) -> None:
        values, target = self._pair(batch, predictions)
        if values.shape != target.shape:
            raise ValueError(
                f"MeanSquaredError: predictions of shape {tuple(values.shape)} and targets of "
                f"shape {tuple(target.shape)} differ"
            )
        error = (values.double() - target.double()).pow(2).sum()
        self._sum = error if self._sum is None else self._sum + error
        self._count += target.numel()

    def compute(self) -> dict[str, float]:
        if self._sum is None or self._count == 0:
            raise ValueError("MeanSquaredError.compute() before any batch was processed")
        return {self.name: float(self._sum) / self._count}


class TorchMetric(_Streaming):
    """A torchmetrics ``Metric`` (or ``MetricCollection``) as an evaluator.

    Each batch calls ``metric.update(predictions, targets)``; `compute` reports the
    metric's value as floats: a scalar under `name`, a per-class tensor as
    ``<name>/<i>``, a dict (a collection, or a metric that returns several values) as
    ``<name>/<key>``, or as its own keys when `name` is ``""``. Passing a ``Metric``
    straight to ``evaluators=`` wraps it with the defaults.

    Under torchrun every rank evaluates the whole evaluation data (see
    `Trainer.evaluate`), so the metric's own cross-process reduction would count every
    batch once per rank: it is switched off (its ``distributed_available_fn`` says no
    process group), and each rank's result is the whole data's.

    Args:
        metric: The torchmetrics metric; it is moved to the batch's device on first use.
        targets: Where the targets are in the batch (an index, a key or a callable).
            Default: ``batch[1]``.
        predictions: Picks the metric's input from the model's predictions (a key or a
            callable) when it is not the predictions themselves (``"logits"``).
        name: The key, or key prefix. Default: the metric's class name in snake case
            (``MulticlassAccuracy`` gives ``multiclass_accuracy``).
    """

    def __init__(self, metric: Any, targets: Selector | None = None,
                 predictions: Selector | None = None, name: str | None = None) -> None:
        if not all(callable(getattr(metric, m, None)) for m in ("update", "compute", "reset")):
            raise TypeError(
                f"{type(metric).__name__} is not an evaluator: it needs reset(), "
                "process(batch, predictions) and compute() (or, for a torchmetrics Metric, "
                "update(predictions, targets), compute() and reset())"
            )
        self.metric = metric
        members = metric.values() if callable(getattr(metric, "values", None)) else [metric]
        for member in members:  # a MetricCollection's metrics, or the metric itself
            if hasattr(member, "distributed_available_fn"):
                # Its documented switch for "is there anything to reduce over": here, no.
                member.distributed_available_fn = _not_distributed
        super().__init__(targets, predictions,
                         _snake(type(metric).__name__) if name is None else name)

    def reset(self) -> None:
        self.metric.reset()
        self._moved = False

    def process(self, batch: Any, predictions: Any) -> None:
        values, target = self._pair(batch, predictions)
        if not self._moved and hasattr(self.metric, "to"):
            # The first tensor of the predictions: a tensor, or inside a list of dicts
            # (a detector's, for mean average precision).
            first = next((leaf for leaf in pytree.tree_leaves(values)
                          if isinstance(leaf, torch.Tensor)), None)
            if first is not None:
                self.metric.to(first.device)
                self._moved = True
        self.metric.update(values, target)

    def compute(self) -> dict[str, float]:
        return _flatten(self.name, self.metric.compute())


def _not_distributed() -> bool:
    return False


def as_evaluator(evaluator: Any) -> Evaluator:
    """`evaluator` itself, or a torchmetrics ``Metric`` wrapped in `TorchMetric`."""
    return evaluator if isinstance(evaluator, Evaluator) else TorchMetric(evaluator)


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower()
                   for i, c in enumerate(name))


def _flatten(name: str, value: Any) -> dict[str, float]:
    """A metric's value as named floats."""
    if isinstance(value, dict):
        flat: dict[str, float] = {}
        for key, part in value.items():
            flat.update(_flatten(f"{name}/{key}" if name else str(key), part))
        return flat
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        return {f"{name}/{i}": v for i, v in enumerate(value.reshape(-1).tolist())}
    return {name: float(value)}


def run_evaluation(model: torch.nn.Module, data: Iterable[Any], evaluators: Sequence[Evaluator],
                   device: torch.device, precision: Precision) -> tuple[dict[str, float],
                                                                        dict[str, float]]:
    """Run `model` in eval mode under `torch.inference_mode()` over `data`.

    The model's previous train/eval mode is restored afterwards, even on error.

    Returns:
        The evaluators' merged results, and the mean of every scalar the model wrote with
        `write_summary` during the evaluation (see `merge_results`).

    Raises:
        ValueError: two evaluators report the same key, or the data is empty.
    """
    evaluators = [as_evaluator(evaluator) for evaluator in evaluators]
    for evaluator in evaluators:
        evaluator.reset()
    sink = SummarySink()  # never flush-due: histograms and images of every batch would be waste
    was_training = model.training
    model.eval()
    batches = 0
    try:
        with torch.inference_mode(), sink.activate(), precision.autocast():
            for batch in data:
                batch = move_to_device(batch, device)
                predictions = model(batch)
                for evaluator in evaluators:
                    evaluator.process(batch, predictions)
                batches += 1
    finally:
        model.train(was_training)
    if batches == 0:
        raise ValueError("the evaluation data yielded no batches")
    results: dict[str, float] = {}
    for evaluator in evaluators:
        for key, value in evaluator.compute().items():
            if key in results:
                raise ValueError(
                    f"two evaluators report {key!r}; give one of them a name= prefix"
                )
            results[key] = float(value)
    return results, sink.flush().scalars


def merge_results(results: dict[str, float], summaries: dict[str, float]) -> dict[str, float]:
    """The evaluators' results and the model's eval-mode summaries as one dict.

    Raises:
        ValueError: a key is both an evaluator's and a summary tag.
    """
    for key in summaries.keys() & results.keys():
        raise ValueError(f"{key!r} is both an evaluator key and a write_summary tag in "
                         "eval mode; rename one")
    return {**results, **summaries}


def evaluate_in_run(model: torch.nn.Module, data: Iterable[Any] | None,
                    evaluators: Sequence[Evaluator], device: torch.device,
                    precision: Precision, dist: Distributed,
                    rng_kept: Callable[[], AbstractContextManager[Any]]) -> dict[str, float]:
    """An evaluation within a training run (`TrainerBase.evaluate`): `run_evaluation`
    with the run's RNG draws undone (`rng_kept`), so a run with evaluation trains exactly
    as one without, and under torchrun rank 0's results on every rank (every rank
    evaluated the same data; rank 0's numbers make every rank decide alike, early
    stopping or the best checkpoint, even if results differ in the last bit).

    Returns:
        The evaluators' results and the model's averaged summaries, merged.

    Raises:
        ValueError: there is no data, or the results clash (`merge_results`).
    """
    if data is None:
        raise ValueError("evaluate() needs data: pass it, or eval_data= to the Trainer")
    with rng_kept():
        results, summaries = run_evaluation(model, data, evaluators, device, precision)
    return merge_results(*dist.broadcast((results, summaries)))
