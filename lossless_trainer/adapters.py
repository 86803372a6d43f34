"""Adapters for models people already have, whose calling conventions are not ours.

* `HuggingFace`: a Hugging Face model takes keyword tensors and computes its loss when
  the batch has labels, returning an output object with ``.loss``.
* `Torchvision`: a torchvision detector takes ``(images, targets)`` in training mode and
  returns a dict of losses, and takes images alone in eval mode.
* `WithLoss` (model.py, importable here too): a predictions-only network plus a loss
  function, timm's or torchvision's classifiers for instance.

Each adapter is a `Model` holding the wrapped network as ``.model``: its checkpoints
keep the keys under ``model.``, and ``adapter.model.state_dict()`` is the bare model's
state (see docs/bring-your-model.md for loading a checkpoint into the bare model).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ModelOutputError
from .means import Mean
from .model import Model, WithLoss

__all__ = ["HuggingFace", "Torchvision", "WithLoss"]


class HuggingFace(Model):
    """A Hugging Face model (``transformers``) as a `Model`.

    Training mode calls ``model(**batch)`` and trains on the output's ``.loss``, which the
    model computes itself from the batch's labels. Eval mode calls the model without the
    label keys and returns its output, or the part named by `predictions`.

    Args:
        model: A ``transformers`` model (``PreTrainedModel``), or any module that takes
            keyword tensors and returns an object or dict with a ``loss``.
        predictions: What eval mode returns: None for the whole output, or the name of
            one of its fields (``"logits"``).
        losses: The named losses to train on: None for ``{"loss": output.loss}``, a
            sequence of output field names (each one a loss term), or a function
            ``output -> dict`` of losses.
        label_keys: The batch keys that hold labels: required in training mode, left
            out in eval mode.
        token_mean: Whether ``output.loss`` is a mean over the label tokens, to be
            trained on as the exact mean over the whole step (every micro-batch of
            ``grad_accum_steps``, every rank) rather than as a mean of per-batch means.
            ``"shifted"``: the model shifts the labels one place left and ignores -100
            (causal LMs); ``"unshifted"``: labels count where they are, -100 ignored
            (masked LMs, token classification); None: ``output.loss`` is a plain loss.
            ``"auto"`` (the default) picks ``"shifted"`` for the classes of transformers'
            causal-LM auto mapping (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...),
            ``"unshifted"`` for its masked-LM and token-classification mappings, and None
            otherwise or when `losses` is given. The loss is then ``Mean(output.loss *
            n, n)`` with n the batch's label tokens, and the model gets
            ``num_items_in_batch`` when it takes loss keywords, as Hugging Face's own
            Trainer does (so a batch with no label token gives 0, not NaN).

    Examples:
        >>> model = HuggingFace(GPT2LMHeadModel(GPT2Config(n_layer=2)), predictions="logits")
        >>> Trainer(model, loader).fit()      # batches: dicts with input_ids, labels
    """

    def __init__(self, model: nn.Module, *, predictions: str | None = None,
                 losses: Sequence[str] | Callable[[Any], dict[str, Any]] | None = None,
                 label_keys: Sequence[str] = ("labels",),
                 token_mean: str | None = "auto") -> None:
        super().__init__()
        self.model = model
        self.predictions = predictions
        self.losses = tuple(losses) if isinstance(losses, (list, tuple)) else losses
        self.label_keys = tuple(label_keys)
        if token_mean not in ("auto", "shifted", "unshifted", None):
            raise ValueError(f"HuggingFace(token_mean=...) must be 'auto', 'shifted', "
                             f"'unshifted' or None, got {token_mean!r}")
        if token_mean == "auto":
            token_mean = None if losses is not None else _token_mean_of(model)
        elif token_mean is not None and losses is not None:
            raise ValueError("HuggingFace(token_mean=...) applies to output.loss; with "
                             "losses= the losses are yours: return a Mean from losses= "
                             "for an exact mean")
        self.token_mean: str | None = token_mean
        self._loss_kwargs = token_mean is not None and _takes_loss_kwargs(model)

    @property
    def count_items(self) -> Callable[[Any], dict[str, torch.Tensor]] | None:
        """The batch's label tokens, ``{"loss": n}``, when `token_mean` is on (what the
        trainer needs under ``grad_accum_steps``); None otherwise."""
        return self._count_items if self.token_mean is not None else None

    def _count_items(self, batch: Any) -> dict[str, torch.Tensor]:
        self._check(batch, labels=True)
        return {"loss": self._tokens(batch)}

    def _check(self, batch: Any, labels: bool) -> None:
        """Refuse a batch the model cannot be called with: not a dict of keyword tensors,
        or (`labels`) without labels, so that the model would compute no loss."""
        name = type(self.model).__name__
        if not isinstance(batch, Mapping):
            raise ModelOutputError(
                f"HuggingFace({name}) takes batches that are dicts of keyword arguments (a "
                f"tokenizer's BatchEncoding, a data collator's output); got a "
                f"{type(batch).__name__}")
        if labels and not any(key in batch for key in self.label_keys):
            raise ModelOutputError(
                f"HuggingFace({name}) in training mode needs labels: the batch has "
                f"{sorted(batch)} and none of {list(self.label_keys)}, so the model computes "
                "no loss. Add them to the batch (for a causal LM, labels = input_ids, with "
                "-100 at padding: DataCollatorForLanguageModeling(mlm=False) does it), or "
                "pass label_keys= if yours are named otherwise")

    def _tokens(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """How many label tokens ``output.loss`` averages over."""
        if "shift_labels" in batch:  # already shifted by the data pipeline
            return batch["shift_labels"].ne(-100).sum()
        labels = batch[self.label_keys[0]]
        if self.token_mean == "shifted":
            labels = labels[..., 1:]
        return labels.ne(-100).sum()

    def forward(self, batch: Any) -> Any:
        self._check(batch, labels=self.training)
        if not self.training:
            inputs = {k: v for k, v in batch.items() if k not in self.label_keys}
            output = self.model(**inputs)
            return output if self.predictions is None else output[self.predictions]
        name = type(self.model).__name__
        if self.token_mean is not None:
            tokens = self._tokens(batch)
            extra = {"num_items_in_batch": tokens.clamp(min=1)} if self._loss_kwargs else {}
            # The model's loss is sum / n (with num_items_in_batch) or its own mean over
            # the same n tokens: times n, it is the sum either way.
            return {"loss": Mean(_field(self.model(**batch, **extra), "loss", name) * tokens,
                                 tokens)}
        output = self.model(**batch)
        if callable(self.losses):
            return self.losses(output)
        if self.losses is not None:
            return {key: _field(output, key, name) for key in self.losses}
        return {"loss": _field(output, "loss", name)}


def _token_mean_of(model: nn.Module) -> str | None:
    """`HuggingFace`'s ``token_mean="auto"``: from transformers' auto mappings."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # not a transformers model
        return None
    name = type(model).__name__

    def listed(mapping: str) -> bool:
        names = getattr(modeling_auto, mapping, {}).values()
        return any(name == n or (isinstance(n, tuple) and name in n) for n in names)

    if listed("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return "shifted"
    if listed("MODEL_FOR_MASKED_LM_MAPPING_NAMES") or listed(
            "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"):
        return "unshifted"
    return None


def _takes_loss_kwargs(model: nn.Module) -> bool:
    """Whether the model passes keywords such as ``num_items_in_batch`` to its loss (as
    Hugging Face's Trainer decides it: the model's ``accepts_loss_kwargs``, else a
    ``**kwargs`` in its forward)."""
    accepts = getattr(model, "accepts_loss_kwargs", None)
    if accepts is not None:
        return bool(accepts)
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "num_items_in_batch"
               for p in parameters)


def _field(output: Any, key: str, name: str) -> Any:
    value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
    if value is None:
        raise ModelOutputError(
            f"{name} returned no {key!r} although the batch has labels (its output has "
            f"{sorted(output.keys()) if isinstance(output, Mapping) else type(output).__name__}"
            "); check that the model computes a loss from its labels")
    return value


class Torchvision(Model):
    """A torchvision detector (Faster/Mask R-CNN, RetinaNet, FCOS, SSD, keypoint R-CNN)
    as a `Model`: training mode calls ``model(images, targets)`` and returns its loss dict;
    eval mode calls ``model(images)`` and returns its list of detections.

    Batches are ``(images, targets)``: a list of CHW tensors (or an NCHW tensor) and a
    list of target dicts (``boxes``, ``labels``, ...). In eval mode a batch of images
    alone works too.

    Args:
        model: A detector following torchvision's detection convention.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> Any:
        images, targets = _images_and_targets(batch)
        if not self.training:
            return self.model(images)
        if targets is None:
            raise ModelOutputError(
                f"Torchvision({type(self.model).__name__}) in training mode needs "
                "(images, targets) batches, a list of images and a list of target dicts; "
                "got images alone")
        return self.model(images, targets)


def _images_and_targets(batch: Any) -> tuple[list[torch.Tensor], list[Any] | None]:
    """Split a detection batch: ``(images, targets)``, or images alone."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and (
            isinstance(batch[1], (list, tuple)) and all(isinstance(t, Mapping) for t in batch[1])
            and not isinstance(batch[0], Mapping)):
        return _as_images(batch[0]), list(batch[1])
    return _as_images(batch), None


def _as_images(images: Any) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            return [images]
        if images.ndim == 4:
            return list(images.unbind(0))
    elif isinstance(images, (list, tuple)) and all(isinstance(i, torch.Tensor) for i in images):
        return list(images)
    raise ModelOutputError(
        "a detection batch's images must be a list of CHW tensors or an NCHW tensor, got "
        f"{type(images).__name__}"
        + (f" of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else ""))
