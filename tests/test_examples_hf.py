"""The Hugging Face fine-tuning example: a GPT-2 built from a config learns local text,
is saved with save_pretrained, and a second run fine-tunes the saved model.

Both runs go through the script in its fast mode in a subprocess; its data pipeline and
evaluator are checked in process against the model's own loss.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import read_metrics

pytest.importorskip("transformers")

from lossless_trainer.adapters import HuggingFace  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPT = EXAMPLES / "huggingface_finetune.py"


@pytest.fixture(scope="module")
def hf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_huggingface_finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, str(SCRIPT), "--fast", *args],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def bits(out: str) -> tuple[float, float]:
    found = re.search(r"held-out bits per byte: ([0-9.]+) before, ([0-9.]+) after", out)
    return float(found.group(1)), float(found.group(2))


def test_the_example_trains_saves_and_a_second_run_fine_tunes_the_saved_model(tmp_path):
    first = tmp_path / "first"
    out = run("--log-dir", str(first))
    before, after = bits(out)
    # A random model is near the uniform 8 bits; measured in fast mode: 7.72 -> 3.80.
    assert before > 7.0 and after < 4.3
    assert "greedy completion:\ndef __init__(self" in out
    assert f"tensorboard --logdir {first}" in out
    rows = read_metrics(str(first))
    tags = set().union(*rows)
    assert {"loss/loss", "eval/bits_per_byte", "eval/nll_per_byte", "perf/samples_per_sec",
            "lr"} <= tags
    assert [row["eval/bits_per_byte"] for row in rows
            if "eval/bits_per_byte" in row][-1] == pytest.approx(after, abs=1e-3)
    saved = first / "hf_model"
    assert (saved / "config.json").is_file() and any(saved.glob("*.safetensors"))

    # Fine-tune the saved model on one package: it starts from what the first run learnt.
    out = run("--log-dir", str(tmp_path / "second"), "--init", str(saved), "--source",
              "json", "--steps", "10")
    start, end = bits(out)
    assert "training on" in out and "of json" in out
    assert start < 5.0 and end < start


def test_documents_are_cut_into_pieces_and_padded_with_ignored_labels(hf):
    text = b"import os\nimport re\n\n\ndef f(x):\n    return x\n\n    # x\nclass C:\n    pass\n"
    # Top-level statements, each ending with one newline: blank lines split them, but not
    # before indented code, nor a line with no blank line before it.
    statements = [b"import os\nimport re\n",
                  b"def f(x):\n    return x\n\n    # x\nclass C:\n    pass\n"]
    assert [bytes(piece.tolist()) for piece in hf.documents([text], block=100)] == statements
    pieces = hf.documents([text], block=8)
    assert all(2 <= len(piece) <= 8 for piece in pieces)
    # Cut into consecutive pieces; a last piece of one token (nothing to predict) is left out.
    assert b"".join(bytes(piece.tolist()) for piece in pieces) == b"".join(
        statement[:len(statement) - (len(statement) % 8 == 1)] for statement in statements)
    batch = hf.collate(pieces[:3])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (3, 8)
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == hf.PAD).all()


def test_the_evaluator_and_the_adapters_count_match_the_models_own_loss(hf):
    torch.manual_seed(0)
    pieces = hf.documents([Path(hf.__file__).read_bytes()], block=40)[:6]
    batch = hf.collate(pieces)
    model = HuggingFace(hf.build_model(None), predictions="logits")
    # The adapter counts the tokens the causal LM's loss averages over: every real
    # token but the first of each piece, which nothing predicts.
    assert int(model.count_items(batch)["loss"]) == sum(len(p) - 1 for p in pieces)
    with torch.no_grad():
        own = model.model(**batch).loss  # Hugging Face's own mean over those tokens
        logits = model.eval()(batch)
    evaluator = hf.BitsPerByte()
    evaluator.reset()
    evaluator.process(batch, logits)
    result = evaluator.compute()
    assert result["nll_per_byte"] == pytest.approx(float(own), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(float(own) / math.log(2), rel=1e-5)
