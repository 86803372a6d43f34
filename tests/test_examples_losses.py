"""The loss-scenario examples (multitask, vae, regularized, separate_loss) in fast mode.

Each script runs once, in a subprocess, as a user would run it; the four start together
(one thread each) so the module costs about half their summed time on two cores. The
tests check the figures each script prints and the tags its runs wrote. Model-level
behaviour (which losses a batch produces) is checked in-process on the imported module.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lossless_trainer import WithLoss

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ("multitask", "vae", "regularized", "separate_loss")


class Runs:
    """The four example scripts, started at once, each awaited by the test that reads it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self._processes = {
            name: subprocess.Popen(
                [sys.executable, str(EXAMPLES / f"{name}.py"), "--fast", "--no-progress",
                 "--log-dir", str(root / name)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for name in SCRIPTS
        }
        self._outputs: dict[str, str] = {}

    def stdout(self, name: str) -> str:
        """The script's standard output, after checking it succeeded."""
        if name not in self._outputs:
            out, err = self._processes[name].communicate(timeout=300)
            assert self._processes[name].returncode == 0, err
            self._outputs[name] = out
        return self._outputs[name]

    def close(self) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    started = Runs(tmp_path_factory.mktemp("example_runs"))
    yield started
    started.close()


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in:\n{text}"
    return float(match.group(1))


def tags(run_dir: Path) -> dict[str, list[str]]:
    """Tags of every kind in the run's TensorBoard event files."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator.Tags()


def scalar_tags(run_dir: Path) -> set[str]:
    return {tag for record in read_metrics(str(run_dir)) for tag in record}


def import_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- multitask --------------------------------------------------------------------------


def test_multitask_reports_every_head_and_logs_each_loss(runs):
    out = runs.stdout("multitask")
    assert number(r"digit accuracy:\s+([0-9.]+)", out) >= 0.85
    assert number(r"parity accuracy:\s+([0-9.]+)", out) >= 0.85
    assert number(r"R\^2 ([-0-9.]+)", out) >= 0.3  # ink regression beats predicting the mean
    run_dir = runs.root / "multitask"
    assert f"tensorboard --logdir {run_dir}" in out
    logged = scalar_tags(run_dir)
    assert {"loss/digit", "loss/parity", "loss/ink", "loss/total"} <= logged
    assert {"eval/digit_accuracy", "eval/parity_accuracy", "eval/ink_mse"} <= logged
    # Batches come from one source at a time, so some lack the ink labels entirely.
    fractions = [r["batches_with/ink"] for r in read_metrics(str(run_dir))]
    assert 0.0 < sum(fractions) / len(fractions) < 1.0


@pytest.fixture(scope="module")
def multitask():
    return import_example("multitask")


def test_multitask_model_returns_only_the_losses_a_batch_has_labels_for(multitask):
    train_set, _ = multitask.load_data()
    by_source = {s: [i for i in range(len(train_set)) if int(train_set.sources[i]) == k]
                 for k, s in enumerate(multitask.SOURCES)}
    torch.manual_seed(0)
    model = multitask.MultiTaskNet(0.3, 0.1).train()

    scanner = multitask.collate([train_set[i] for i in by_source["scanner"][:16]])
    assert set(scanner) == {"image", "ink", "ink_mask"}
    assert set(model(scanner)) == {"ink"}

    crowd = multitask.collate([train_set[i] for i in by_source["crowd"][:32]])
    losses = model(crowd)
    assert set(losses) == {"digit", "parity"}
    mask = crowd["digit_mask"]
    assert 0 < int(mask.sum()) < len(mask)  # some crowd samples lack their digit
    with torch.no_grad():  # the digit loss is the mean over the labelled samples only
        logits = model.digit_head(model.trunk(crowd["image"][mask]))
        expected = F.cross_entropy(logits, crowd["digit"][mask])
    torch.testing.assert_close(losses["digit"].detach(), expected)

    predictions = model.eval()(scanner)  # eval mode: every head, for every sample
    assert set(predictions) == {"digit", "parity", "ink"}
    assert all(p.shape == (16,) for p in predictions.values())


def test_multitask_separated_style_computes_the_same_losses(multitask):
    train_set, _ = multitask.load_data()
    batch = multitask.collate([train_set[i] for i in range(64)])
    torch.manual_seed(0)
    owned = multitask.MultiTaskNet(0.3, 0.1).train()
    net = multitask.SeparatedMultiTaskNet()
    # Same weights; the ink standardisation is a buffer of the owned model only.
    net.load_state_dict({k: v for k, v in owned.state_dict().items()
                         if k not in ("ink_mean", "ink_std")})
    separated = WithLoss(net, functools.partial(multitask.separated_loss, ink_mean=0.3,
                                                ink_std=0.1),
                         inputs="image", targets=lambda b: b).train()
    expected, got = owned(batch), separated(batch)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


# --- vae --------------------------------------------------------------------------------


def test_vae_beats_the_mean_image_and_logs_both_terms_and_an_image(runs):
    out = runs.stdout("vae")
    mse = number(r"reconstruction MSE: ([0-9.]+)", out)
    baseline = number(r"baseline: ([0-9.]+)", out)
    assert mse < 0.6 * baseline
    run_dir = runs.root / "vae"
    records = read_metrics(str(run_dir))
    assert {"loss/reconstruction", "loss/kl", "vae/kl_unweighted",
            "eval/reconstruction_mse"} <= scalar_tags(run_dir)
    betas = [r["vae/beta"] for r in records]
    assert betas[0] < 0.5 and betas[-1] == 1.0  # the KL warm-up ran to the end
    # Once warmed up, the KL loss is the unweighted KL.
    assert records[-1]["loss/kl"] == pytest.approx(records[-1]["vae/kl_unweighted"])
    assert "vae/inputs_vs_reconstructions" in tags(run_dir)["images"]


# --- regularized ------------------------------------------------------------------------


def test_regularized_penalty_makes_activations_sparser_and_logs_histograms(runs):
    out = runs.stdout("regularized")
    pattern = r"{}: held-out accuracy ([0-9.]+), zero activations ([0-9.]+)%"
    figures = {}
    for name in ("l1_0.3", "no_penalty"):
        match = re.search(pattern.format(re.escape(name)), out)
        assert match, out
        figures[name] = float(match.group(1)), float(match.group(2))
        assert figures[name][0] >= 0.9
    assert figures["l1_0.3"][1] > figures["no_penalty"][1] + 15  # percentage points

    penalised, plain = (runs.root / "regularized" / name for name in ("l1_0.3", "no_penalty"))
    assert "loss/activation_l1" in scalar_tags(penalised)
    assert "loss/activation_l1" not in scalar_tags(plain)  # penalty 0: no key at all
    assert {"activations/layer1", "activations/layer2"} <= set(tags(penalised)["histograms"])


def test_regularized_recorders_nest():
    regularized = import_example("regularized")
    regularized.record_activation("nobody", torch.ones(2))  # no recorder: a no-op
    with regularized.recording_activations() as outer:
        with regularized.recording_activations() as inner:
            regularized.record_activation("a", torch.ones(2))
        regularized.record_activation("b", torch.zeros(2))
    assert set(inner) == {"a"} and set(outer) == {"a", "b"}


# --- separate_loss ----------------------------------------------------------------------


def test_separate_loss_both_styles_train_and_the_weighted_one_recalls_rare_classes(runs):
    out = runs.stdout("separate_loss")
    recalls = {}
    for name in ("with_loss", "model_owned"):
        line = re.search(rf"{name}: held-out accuracy ([0-9.]+), rare-class recall (.*)", out)
        assert line, out
        assert float(line.group(1)) >= 0.8
        recalls[name] = [float(v) for v in re.findall(r"\d: ([0-9.]+)", line.group(2))]
        assert len(recalls[name]) == 3
    assert sum(recalls["model_owned"]) > sum(recalls["with_loss"])
    assert "loss/loss" in scalar_tags(runs.root / "separate_loss" / "with_loss")
    assert {"loss/ce", "loss/rare_ovr", "rare/train_recall"} <= scalar_tags(
        runs.root / "separate_loss" / "model_owned")
