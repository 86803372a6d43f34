"""Export a checkpoint's model weights as a plain ``state_dict``, for inference and sharing.

    python -m lossless_trainer.export runs/a/checkpoints/step-000001000.pt model.safetensors
    python -m lossless_trainer.export runs/a model.pt --strip-prefix model.

A training checkpoint holds the optimizer, RNG states, the data position and more; the
file written here holds only the model's tensors, under the model's own keys (a sharded
checkpoint's shards gathered into full tensors), and loads in one process without
torchrun or this library: ``model.load_state_dict(torch.load(path,
weights_only=True))``, or ``safetensors.torch.load_file(path)``. The checkpoint is
verified (its checksum) before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from . import sharded
from .checkpoint import (
    CheckpointError,
    checkpoint_step,
    load_checkpoint,
    load_newest_valid,
    write_atomic,
)

__all__ = ["export_model", "main"]

FORMATS = (".pt", ".safetensors")


def export_model(checkpoint: str | os.PathLike[str], output: str | os.PathLike[str], *,
                 strip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Write the model weights of `checkpoint` to `output`; return them.

    Args:
        checkpoint: A checkpoint file (``step-<n>.pt``, ``best.pt``), a sharded
            checkpoint's directory (``step-<n>``, gathered here into full tensors, in
            one process, without torchrun), or a run directory or its
            ``checkpoints/`` directory, for the newest valid checkpoint there.
        output: The file to write: ``.pt`` (``torch.save`` of the state dict) or
            ``.safetensors`` (needs the ``safetensors`` package: ``pip install
            "lossless_trainer[safetensors]"``). Written atomically (`write_atomic`).
        strip_prefix: Removed from the start of every key that has it: ``"model."`` turns
            the keys of an adapter (`adapters.HuggingFace`, `adapters.Torchvision`,
            `WithLoss`, whose network is its ``.model`` or ``.net``) into the bare
            model's.

    Raises:
        CheckpointError: the checkpoint cannot be read, fails its checksum, or holds no
            model weights.
        ValueError: `output` has another extension.
    """
    output = os.fspath(output)
    extension = os.path.splitext(output)[1]
    if extension not in FORMATS:
        raise ValueError(f"export to {output}: the file must end in .pt or .safetensors")
    state = _read(os.fspath(checkpoint))
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor)
                                                for v in weights.values()):
        raise CheckpointError(f"checkpoint {checkpoint} holds no model state_dict")
    if strip_prefix:
        weights = {key.removeprefix(strip_prefix): value for key, value in weights.items()}
    if extension == ".safetensors":
        write_atomic(output, lambda f: f.write(_safetensors_bytes(weights)))
    else:
        write_atomic(output, lambda f: torch.save(weights, f))
    return weights


def _read(checkpoint: str) -> dict:
    if os.path.isdir(checkpoint) and not _is_sharded_checkpoint(checkpoint):
        directory = checkpoint
        if os.path.isdir(os.path.join(checkpoint, "checkpoints")):
            directory = os.path.join(checkpoint, "checkpoints")
        found = load_newest_valid(directory, load=_load)
        if found is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        return found[1]
    return _load(checkpoint)


def _is_sharded_checkpoint(path: str) -> bool:
    """A sharded checkpoint's directory (its marker, DCP's metadata, or a checkpoint's
    name), as opposed to a run directory or its ``checkpoints/``."""
    return checkpoint_step(path) is not None or any(
        os.path.exists(os.path.join(path, name)) for name in (sharded.MARKER, ".metadata"))


def _load(path: str) -> dict:
    """A checkpoint file, or a sharded checkpoint gathered into full tensors in this
    process; verified either way."""
    if not os.path.isdir(path):
        return load_checkpoint(path)
    problem = sharded.verify(path)
    if problem is not None:
        raise CheckpointError(problem)
    return sharded.read_full(path)


def _safetensors_bytes(weights: dict[str, torch.Tensor]) -> bytes:
    try:
        from safetensors.torch import save
    except ImportError as exc:
        raise ImportError(
            "exporting to .safetensors needs the safetensors package: pip install "
            "'lossless_trainer[safetensors]' (or export to .pt)") from exc
    # safetensors stores each tensor once and refuses tensors that share memory (tied
    # weights): those are written as copies of their own.
    seen: set[int] = set()
    plain = {}
    for key, value in weights.items():
        pointer = value.untyped_storage().data_ptr()
        shared = value.numel() > 0 and pointer in seen
        seen.add(pointer)
        value = value.detach()
        plain[key] = value.clone() if shared else value.contiguous()
    return save(plain, metadata={"format": "pt", "exported_by": "lossless_trainer"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lossless_trainer.export",
        description="Write a checkpoint's model weights as a plain state_dict (.pt or "
                    ".safetensors), loadable in one process without torchrun.")
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory for its "
                                           "newest valid checkpoint")
    parser.add_argument("output", help="the file to write: .pt or .safetensors")
    parser.add_argument("--strip-prefix", default=None,
                        help="remove this prefix from every key (model. for an adapter)")
    args = parser.parse_args(argv)
    try:
        weights = export_model(args.checkpoint, args.output, strip_prefix=args.strip_prefix)
    except (CheckpointError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    count = sum(value.numel() for value in weights.values())
    print(f"wrote {args.output}: {len(weights)} tensors, {count:,} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
