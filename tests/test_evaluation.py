"""lossless_trainer.evaluation: the evaluators and Trainer.evaluate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyClassifier, ValLossClassifier, make_batches, read_metrics
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Accuracy, MeanSquaredError, Trainer


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
    model = ValLossClassifier()
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


def test_evaluation_does_not_change_training(fresh):
    """A shuffling eval DataLoader draws from the RNG; training must not notice."""

    def run(with_eval: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = ValLossClassifier()
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
    trainer = Trainer(ValLossClassifier(), make_batches(1), **quiet)
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
