"""Evaluation: evaluators, the evaluate loop, validation losses via write_summary, and
periodic evaluation during fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyClassifier, make_batches, read_metrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Accuracy, MeanSquaredError, Model, Trainer, write_summary


class Scored(Model):
    """Eval mode: logits, and a validation loss through write_summary when labels exist."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(32, 4))
        self.inference_flags: list[bool] = []

    def forward(self, batch):
        x, y = batch
        logits = self.net(x)
        if self.training:
            return {"ce": F.cross_entropy(logits, y)}
        self.inference_flags.append(torch.is_inference_mode_enabled())
        write_summary("val_loss", F.cross_entropy(logits, y))
        return logits


def test_accuracy_top_k_and_mse_stream_correct_values():
    accuracy = Accuracy(top_k=(1, 2))
    accuracy.reset()
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    accuracy.process((None, torch.tensor([1, 1, 0])), scores)
    accuracy.process((None, torch.tensor([2])), torch.tensor([[0.0, 0.1, 0.9]]))
    assert accuracy.compute() == {"accuracy": 0.5, "top2_accuracy": 0.75}
    assert accuracy._correct.numel() == 2  # running counts, not predictions

    indices = Accuracy(targets="y")
    indices.process({"y": torch.tensor([1, 2])}, torch.tensor([1, 0]))
    assert indices.compute() == {"accuracy": 0.5}

    mse = MeanSquaredError()
    mse.process((None, torch.tensor([1.0, 2.0])), torch.tensor([1.0, 4.0]))
    mse.process((None, torch.tensor([0.0])), torch.tensor([3.0]))
    assert mse.compute() == {"mse": pytest.approx((0 + 4 + 9) / 3)}
    with pytest.raises(ValueError, match="differ"):
        mse.process((None, torch.zeros(2)), torch.zeros(3))


def test_evaluate_uses_eval_mode_inference_mode_and_restores_the_mode(quiet):
    model = Scored()
    data = make_batches(3)
    trainer = Trainer(model, make_batches(2), evaluators=[Accuracy(top_k=(1, 3))], **quiet)
    model.train()
    results = trainer.evaluate(data)
    assert model.training and model.inference_flags == [True, True, True]
    with torch.no_grad():
        model.eval()
        logits = [model.net(x) for x, _ in data]
        model.train()
    expected_acc = sum((lg.argmax(1) == y).sum().item() for lg, (_, y) in zip(logits, data)) / 24
    expected_loss = sum(F.cross_entropy(lg, y).item() for lg, (_, y) in zip(logits, data)) / 3
    assert results["accuracy"] == pytest.approx(expected_acc)
    assert 0 <= results["top3_accuracy"] <= 1 and results["top3_accuracy"] >= expected_acc
    assert results["val_loss"] == pytest.approx(expected_loss, rel=1e-6)
    # outside fit it is written as a record of its own
    line = read_metrics(quiet["log_dir"])[-1]
    assert line["step"] == 0 and line["eval/accuracy"] == pytest.approx(expected_acc)


def test_periodic_evaluation_lands_in_the_flush_of_its_step(quiet):
    trainer = Trainer(Scored(), make_batches(12), eval_data=make_batches(2, seed=9),
                      eval_every=5, evaluators=[Accuracy()], log_every=4, **quiet)
    trainer.fit()
    lines = read_metrics(quiet["log_dir"])
    assert [line["step"] for line in lines] == [4, 5, 8, 10, 12]
    evaluated = [line["step"] for line in lines if "eval/accuracy" in line]
    assert evaluated == [5, 10, 12]  # every 5 steps and at the end
    assert all("eval/val_loss" in line for line in lines if line["step"] in evaluated)
    assert trainer.last_eval.keys() == {"accuracy", "val_loss"}


def test_evaluation_does_not_change_training(fresh):
    """A shuffling eval DataLoader draws from the RNG; training must not notice."""

    def run(with_eval: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = Scored()
        loader = DataLoader(TensorDataset(torch.randn(48, 16), torch.randint(0, 4, (48,))),
                            batch_size=8, shuffle=True)
        eval_loader = DataLoader(TensorDataset(torch.randn(16, 16), torch.randint(0, 4, (16,))),
                                 batch_size=8, shuffle=True)
        extra = {"eval_data": eval_loader, "eval_every": 2} if with_eval else {}
        Trainer(model, loader, max_epochs=2, seed=3, **extra, **fresh()).fit()
        return model

    plain, evaluated = run(False), run(True)
    for a, b in zip(plain.parameters(), evaluated.parameters()):
        assert torch.equal(a, b)


def test_evaluation_errors(quiet):
    with pytest.raises(ValueError, match="eval_every is set but there is no eval_data"):
        Trainer(TinyClassifier(), make_batches(1), eval_every=3, **quiet)
    trainer = Trainer(Scored(), make_batches(1), **quiet)
    with pytest.raises(ValueError, match="evaluate\\(\\) needs data"):
        trainer.evaluate()
    with pytest.raises(ValueError, match="two evaluators report 'accuracy'"):
        trainer.evaluate(make_batches(1), [Accuracy(), Accuracy()])
    with pytest.raises(TypeError, match="object is not an evaluator"):
        trainer.evaluate(make_batches(1), [object()])
    with pytest.raises(ValueError, match="'val_loss' is both an evaluator key"):
        trainer.evaluate(make_batches(1), [MeanSquaredError(name="val_loss",
                                                            targets=lambda b: b[0],
                                                            predictions=lambda p: p[:, :1]
                                                            .expand(-1, 16))])
    assert trainer.model.training


class Replay:
    """An evaluator that reports preset values, one per evaluation."""

    def __init__(self, values: list[float]) -> None:
        self.values = iter(values)

    def reset(self) -> None:
        pass

    def process(self, batch, predictions) -> None:
        pass

    def compute(self) -> dict[str, float]:
        return {"score": next(self.values)}


def test_early_stopping_after_patience_evaluations_without_improvement(quiet):
    from lossless_trainer import EarlyStopping

    stopper = EarlyStopping("score", mode="min", patience=2, min_delta=0.01)
    trainer = Trainer(Scored(), make_batches(20), eval_data=make_batches(1), eval_every=2,
                      evaluators=[Replay([0.5, 0.4, 0.395, 0.46, 0.3, 0.2])],
                      callbacks=[stopper], checkpoint_every=2, **quiet)
    state = trainer.fit()
    # 0.5 and 0.4 improve; 0.395 is within min_delta, 0.46 is worse: stop at the 4th
    assert state.step == 8 and state.stop_reason.startswith("early stopping: score")
    saved = torch.load(quiet["log_dir"] + "/checkpoints/step-000000008.pt", weights_only=True)
    assert saved["hooks"]["EarlyStopping"] == {"best": 0.4, "bad_evaluations": 2}
    with pytest.raises(KeyError, match="'missing' is not among the evaluation results"):
        Trainer(Scored(), make_batches(4), eval_data=make_batches(1), eval_every=2,
                callbacks=[EarlyStopping("missing")], log_dir=quiet["log_dir"] + "2",
                progress=False).fit()


def test_best_checkpoint_keeps_the_best_evaluation(quiet):
    from lossless_trainer import BestCheckpoint
    from lossless_trainer.checkpoint import list_checkpoints, load_checkpoint

    best = BestCheckpoint("score", mode="max")
    Trainer(Scored(), make_batches(8), eval_data=make_batches(1), eval_every=2,
            evaluators=[Replay([0.1, 0.7, 0.3, 0.2])], callbacks=[best], checkpoint_every=2,
            keep_last=1, **quiet).fit()
    assert best.best_step == 4 and best.tracker.best == 0.7
    directory = quiet["log_dir"] + "/checkpoints"
    assert load_checkpoint(directory + "/best.pt")["trainer"]["step"] == 4
    assert [step for step, _ in list_checkpoints(directory)] == [8]  # best.pt not pruned
