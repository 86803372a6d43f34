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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ModelOutputError
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

    Examples:
        >>> model = HuggingFace(GPT2LMHeadModel(GPT2Config(n_layer=2)), predictions="logits")
        >>> Trainer(model, loader).fit()      # batches: dicts with input_ids, labels
    """

    def __init__(self, model: nn.Module, *, predictions: str | None = None,
                 losses: Sequence[str] | Callable[[Any], dict[str, Any]] | None = None,
                 label_keys: Sequence[str] = ("labels",)) -> None:
        super().__init__()
        self.model = model
        self.predictions = predictions
        self.losses = tuple(losses) if isinstance(losses, (list, tuple)) else losses
        self.label_keys = tuple(label_keys)

    def forward(self, batch: Any) -> Any:
        name = type(self.model).__name__
        if not isinstance(batch, Mapping):
            raise ModelOutputError(
                f"HuggingFace({name}) takes batches that are dicts of keyword arguments (a "
                f"tokenizer's BatchEncoding, a data collator's output); got a "
                f"{type(batch).__name__}")
        if not self.training:
            inputs = {k: v for k, v in batch.items() if k not in self.label_keys}
            output = self.model(**inputs)
            return output if self.predictions is None else output[self.predictions]
        if not any(key in batch for key in self.label_keys):
            raise ModelOutputError(
                f"HuggingFace({name}) in training mode needs labels: the batch has "
                f"{sorted(batch)} and none of {list(self.label_keys)}, so the model computes "
                "no loss. Add them to the batch (for a causal LM, labels = input_ids, with "
                "-100 at padding: DataCollatorForLanguageModeling(mlm=False) does it), or "
                "pass label_keys= if yours are named otherwise")
        output = self.model(**batch)
        if callable(self.losses):
            return self.losses(output)
        if self.losses is not None:
            return {key: _field(output, key, name) for key in self.losses}
        return {"loss": _field(output, "loss", name)}


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
