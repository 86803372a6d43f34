"""lossless_trainer.export: a checkpoint's model weights as a plain state_dict (.pt or
.safetensors), loadable in one process; its command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, train

from lossless_trainer import CheckpointError
from lossless_trainer.checkpoint import checkpoint_path
from lossless_trainer.export import export_model

ROOT = Path(__file__).resolve().parent.parent


def test_a_checkpoint_exports_to_pt_and_safetensors_that_load_into_the_bare_model(tmp_path):
    trainer, model = train(tmp_path / "run", max_steps=12)
    safetensors = pytest.importorskip("safetensors.torch")
    for name in ("weights.pt", "weights.safetensors"):
        # A run directory: its newest valid checkpoint, step 12.
        export_model(tmp_path / "run", tmp_path / name)
        loaded = (safetensors.load_file(tmp_path / name) if name.endswith(".safetensors")
                  else torch.load(tmp_path / name, weights_only=True))
        fresh = TinyClassifier(dropout=0.3)
        fresh.load_state_dict(loaded)  # strict: exactly the model's keys
        for key, value in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), (name, key)
    older = export_model(checkpoint_path(str(tmp_path / "run" / "checkpoints"), 6),
                         tmp_path / "older.pt")
    assert not torch.equal(older["head.weight"], model.state_dict()["head.weight"])
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_an_adapters_prefix_is_stripped_and_tied_weights_survive_safetensors(tmp_path):
    transformers = pytest.importorskip("transformers")
    safetensors = pytest.importorskip("safetensors.torch")
    from lossless_trainer import Trainer
    from lossless_trainer.adapters import HuggingFace

    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2)
    model = HuggingFace(transformers.GPT2LMHeadModel(config))
    ids = torch.arange(12)[None] % 32
    Trainer(model, [{"input_ids": ids, "labels": ids}] * 3, log_dir=str(tmp_path / "run"),
            progress=False).fit()
    export_model(tmp_path / "run", tmp_path / "gpt2.safetensors", strip_prefix="model.")
    bare = transformers.GPT2LMHeadModel(config)
    bare.load_state_dict(safetensors.load_file(tmp_path / "gpt2.safetensors"))  # strict
    for key, value in model.model.state_dict().items():
        assert torch.equal(bare.state_dict()[key], value), key
    assert bare.lm_head.weight.data_ptr() == bare.transformer.wte.weight.data_ptr()  # tied


def test_a_corrupt_checkpoint_or_a_wrong_extension_is_refused(tmp_path):
    train(tmp_path / "run", max_steps=6)
    path = checkpoint_path(str(tmp_path / "run" / "checkpoints"), 6)
    with pytest.raises(ValueError, match=r"must end in \.pt or \.safetensors"):
        export_model(path, tmp_path / "weights.bin")
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="step-000000006.pt cannot be loaded"):
        export_model(path, tmp_path / "weights.pt")
    assert not (tmp_path / "weights.pt").exists()


def test_the_command_line(tmp_path):
    train(tmp_path / "run", max_steps=6)
    command = [sys.executable, "-m", "lossless_trainer.export"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*command, str(tmp_path / "run"), str(tmp_path / "w.pt")],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {tmp_path / 'w.pt'}: 4 tensors, ")
    fresh = TinyClassifier()
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    failed = subprocess.run([*command, str(tmp_path / "nowhere"), str(tmp_path / "x.pt")],
                            capture_output=True, text=True, env=env, check=False)
    assert failed.returncode == 1 and failed.stderr.startswith("error: ")
