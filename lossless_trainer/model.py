"""The contract: a model that computes its own losses, and the check the trainer applies.

In training mode ``model(batch)`` returns a ``dict[str, Tensor]`` of scalar losses (a bare
scalar tensor counts as ``{"loss": t}``). In eval mode it returns predictions of any form.
Any `torch.nn.Module` that honours this works with the Trainer; `Model` only adds
conveniences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .data import Selector, move_to_device, select
from .errors import ModelOutputError, NonFiniteLossError
from .means import Mean
from .summary import summaries_off

__all__ = ["Model", "WithLoss", "call_error", "check_finite", "check_losses"]


class Model(nn.Module):
    """Base class for models that own their loss.

    Subclasses implement ``forward(batch)``: return named scalar losses when
    ``self.training`` is true, and predictions otherwise. The batch arrives whole, exactly
    as the data yields it (moved to the device); the model decides what is input and
    what is target.

    Examples:
        >>> class Classifier(Model):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(4, 3)
        ...     def forward(self, batch):
        ...         x, y = batch
        ...         logits = self.net(x)
        ...         if not self.training:
        ...             return logits.argmax(-1)
        ...         return {"ce": nn.functional.cross_entropy(logits, y)}
    """

    def forward(self, batch: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} must implement forward(batch): return a dict of scalar "
            "losses in training mode and predictions in eval mode"
        )

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU for a model with neither)."""
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @torch.inference_mode()
    def predict(self, batch: Any) -> Any:
        """Predictions for `batch`: eval mode, no autograd, batch moved to the device.

        The model's previous train/eval mode is restored afterwards. What the model
        writes with `write_summary` meanwhile is dropped, also during `fit` (a hook's
        predictions must not mix into the training summaries; `Trainer.evaluate` logs
        eval-mode summaries under ``eval/``).
        """
        was_training = self.training
        self.eval()
        try:
            with summaries_off():
                return self(move_to_device(batch, self.device))
        finally:
            self.train(was_training)


class WithLoss(Model):
    """Adapter: a predictions-only network plus a separate loss function, as a `Model`.

    The separated style is a special case of the model owning its loss: in training mode
    this returns ``{name: loss_fn(net(inputs), targets)}``, in eval mode ``net(inputs)``.

    Args:
        net: Maps inputs to predictions.
        loss_fn: ``loss_fn(predictions, targets)`` returning a scalar tensor, or a dict
            of them (kept as named losses).
        inputs: Which part of the batch `net` receives. An index or key (``batch[inputs]``),
            a callable ``batch -> inputs``, or a tuple of those to pass several positional
            arguments. Default: ``batch[0]`` for a tuple or list, the batch itself for a
            tensor.
        targets: Which part of the batch is the target, selected like `inputs`. Default:
            ``batch[1]`` for a tuple or list.
        name: Key of the loss in the returned dict.

    Examples:
        >>> model = WithLoss(nn.Linear(4, 3), nn.CrossEntropyLoss())
        >>> model = WithLoss(net, loss_fn, inputs="image", targets="label")
    """

    def __init__(
        self,
        net: nn.Module,
        loss_fn: Callable[[Any, Any], Any],
        *,
        inputs: Selector | None = None,
        targets: Selector | None = None,
        name: str = "loss",
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.targets = targets
        self.name = name

    def forward(self, batch: Any) -> Any:
        inputs = select(batch, self.inputs, 0, "inputs")
        predictions = self.net(*inputs) if isinstance(self.inputs, tuple) else self.net(inputs)
        if not self.training:
            return predictions
        loss = self.loss_fn(predictions, select(batch, self.targets, 1, "targets"))
        return loss if isinstance(loss, dict) else {self.name: loss}


def check_losses(output: Any, step: int, where: str = "model") -> dict[str, Any]:
    """Validate a training-mode output and return it as a dict of scalar losses (tensors
    and `Mean` terms).

    Cheap enough for every step: attribute checks only, no device synchronisation.

    Args:
        output: What ``model(batch)`` returned.
        step: The step being run, for the error message.
        where: How to name the model in errors (its class name).

    Raises:
        ModelOutputError: naming the loss key, the step and the fix.
    """
    if type(output) is dict:  # the common case first: isinstance costs more
        pass
    elif isinstance(output, torch.Tensor):
        output = {"loss": output}
    elif _has_scalar_loss(output):  # a Hugging Face ModelOutput, or another output object
        raise ModelOutputError(
            f"{where}(batch) returned a {type(output).__name__} at step {step}, not a dict of "
            "losses. It has a scalar .loss, which the model computed from the batch's labels: "
            "wrap the model in lossless_trainer.adapters.HuggingFace(model) to train on it, "
            "or return {'loss': output.loss} from your forward. Its other fields (logits, "
            "hidden states) are outputs, not losses"
        )
    elif not isinstance(output, dict):
        raise ModelOutputError(
            f"{where}(batch) returned {type(output).__name__} at step {step} in training mode; "
            "expected a dict of scalar loss tensors, e.g. {'ce': loss}, or one scalar tensor. "
            "Predictions belong to eval mode (model.eval())"
        )
    if not output:
        raise ModelOutputError(
            f"{where}(batch) returned an empty dict at step {step}: there is nothing to train "
            "on. Return at least one loss; to skip a batch, filter it out of the data"
        )
    for key, loss in output.items():
        if (type(key) is str and type(loss) is torch.Tensor and loss.requires_grad
                and loss.ndim == 0 and loss.dtype.is_floating_point):
            continue  # the common case, in one test; the checks below name what is wrong
        if not isinstance(key, str):
            raise ModelOutputError(
                f"{where}(batch) returned a loss key {key!r} of type {type(key).__name__} at "
                f"step {step}; loss names must be strings"
            )
        if type(loss) is Mean:
            _check_tensor(f"the total of Mean {key!r}", loss.total, step)
            continue
        _check_tensor(f"loss {key!r}", loss, step)
    return output


def call_failed(where: str, batch: Any, step: int, error: BaseException) -> str:
    """Why ``model(batch)`` failing at the first step may be a calling convention: how the
    model was called, and the adapters that call models the way they expect."""
    return (
        f"{where}(batch) raised {type(error).__name__} at step {step}: {error}. The trainer "
        f"calls model(batch) with the whole batch, here {_describe(batch)}. A model that "
        "takes the parts of a batch as arguments needs an adapter: "
        "lossless_trainer.adapters.HuggingFace(model) calls model(**batch) (Hugging Face), "
        "adapters.Torchvision(model) calls model(images, targets) (torchvision detection), "
        "WithLoss(net, loss_fn, inputs=..., targets=...) feeds a network and a loss function"
    )


def call_error(exc: Exception, batch: Any, step: int, first_step: int, where: str,
               dist: Any, model: nn.Module) -> BaseException:
    """What to raise for `exc`, raised by the model's call at `step`: DDP's error about
    parameters without a gradient, made clear (`Distributed.explain`); at the first step
    of a fit, how the model was called (`call_failed`, most often a calling
    convention); otherwise `exc` itself."""
    if isinstance(exc, RuntimeError):
        explained = dist.explain(exc, step, model)
        if explained is not exc:
            return explained
    if step == first_step and not isinstance(exc, ModelOutputError):
        return ModelOutputError(call_failed(where, batch, step, exc))
    return exc


def check_finite(losses: Mapping[str, Any], total: torch.Tensor, step: int, dist: Any) -> None:
    """``finite_check="step"``: raise `NonFiniteLossError` if `total`, the step's
    objective, is NaN or Inf, before the optimizer steps on it. One sync; under torchrun
    a collective, and every rank raises together, naming each rank's non-finite losses.
    """
    finite = bool(torch.isfinite(total))
    if dist.enabled:  # every rank stops together, or the others would hang
        if not dist.any(not finite):
            return
    elif finite:
        return
    bad = {key: step for key, loss in losses.items()
           if not bool(torch.isfinite(loss.total if type(loss) is Mean else loss))}
    where = ", ".join(repr(key) for key in bad) or "the total"
    ranks = None
    if dist.enabled:
        per_rank = dist.all_gather(None if finite else sorted(bad))
        where = "; ".join(f"rank {rank}: {', '.join(map(repr, keys)) or 'the total'}"
                          for rank, keys in enumerate(per_rank) if keys is not None)
        ranks = {}
        for rank, keys in enumerate(per_rank):
            for key in keys or ():
                ranks.setdefault(key, rank)
        bad = {key: step for key in ranks} or bad
    raise NonFiniteLossError(
        f"non-finite loss (NaN or Inf) at step {step}: {where}. The optimizer did not "
        "step; the weights are those of the previous step",
        bad, ranks,
    )


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {list(batch)}"
    if isinstance(batch, (list, tuple)):
        parts = ", ".join(type(part).__name__ for part in batch[:4])
        return (f"a {type(batch).__name__} of length {len(batch)} ({parts}"
                f"{', ...' if len(batch) > 4 else ''})")
    return f"a {type(batch).__name__}"


def _has_scalar_loss(output: Any) -> bool:
    """Whether an output that is not a plain dict is a model's output object carrying a
    scalar ``loss``: an object with a ``.loss``, or a dict subclass (a Hugging Face
    ``ModelOutput``) with other fields that are not scalars. A dict subclass of scalar
    losses (an OrderedDict) is a loss dict like any other."""
    if isinstance(output, dict):
        loss = output.get("loss")
        others_are_outputs = any(
            not (isinstance(v, torch.Tensor) and v.ndim == 0) and type(v) is not Mean
            for k, v in output.items() if k != "loss")
        return isinstance(loss, torch.Tensor) and loss.ndim == 0 and others_are_outputs
    loss = getattr(output, "loss", None)
    return isinstance(loss, torch.Tensor) and loss.ndim == 0


def _check_tensor(what: str, loss: Any, step: int) -> None:
    """Raise why `loss` cannot be trained on, naming `what` and `step`; or return."""
    if not isinstance(loss, torch.Tensor):
        raise ModelOutputError(
            f"{what} at step {step} is a {type(loss).__name__}, not a tensor; "
            "compute losses with torch so they can be backpropagated"
        )
    if loss.ndim != 0:
        raise ModelOutputError(
            f"{what} at step {step} has shape {tuple(loss.shape)}; losses must be "
            "scalars: reduce it with .mean() or .sum() (or, for a mean over a varying "
            "number of items, return Mean(its .sum(), the number of items))"
        )
    if not loss.is_floating_point():
        raise ModelOutputError(
            f"{what} at step {step} has dtype {loss.dtype}; losses must be floating "
            "point. Counts and other metrics go to write_summary()"
        )
    if not loss.requires_grad:
        raise ModelOutputError(
            f"{what} at step {step} does not require grad: it has no path to any "
            "trainable parameter (computed under no_grad, detached, or from constants). "
            "To log a value without training on it use write_summary(); to skip an "
            "optional loss, leave its key out of the dict"
        )
