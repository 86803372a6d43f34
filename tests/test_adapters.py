"""lossless_trainer.adapters: Hugging Face models (real transformers, built from a config,
never downloaded) and torchvision's detection convention (a detector written here with
its exact calling convention, and a real torchvision model when it imports)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics
from torch import nn

from lossless_trainer import Hook, Model, ModelOutputError, Trainer
from lossless_trainer.adapters import HuggingFace, Torchvision
from lossless_trainer.data import batch_size
from lossless_trainer.evaluation import TorchMetric

transformers = pytest.importorskip("transformers")


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def lm_batches(n: int, batch: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Repetitive token sequences a tiny model can learn, with labels = input_ids and
    -100 at the padding."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        start = torch.randint(0, 8, (batch, 1), generator=generator)
        ids = (start + torch.arange(12)) % 32
        mask = torch.ones_like(ids)
        mask[:, 10:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def test_a_causal_lm_trains_on_its_own_loss_and_predicts_logits(tmp_path):
    model = HuggingFace(tiny_gpt2(), predictions="logits")
    data = lm_batches(8)
    Trainer(model, data, max_steps=60, log_every=10, log_dir=str(tmp_path), progress=False,
            keep_last=0, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)).fit()
    losses = [line["loss/loss"] for line in read_metrics(tmp_path)]
    assert losses[-1] < 0.3 * losses[0]
    logits = model.predict(data[0])  # eval mode: the labels are left out of the call
    assert logits.shape == (4, 12, 32)
    assert (logits.argmax(-1)[:, :9] == data[0]["input_ids"][:, 1:10]).float().mean() > 0.9


def test_sequence_classification_with_named_loss_terms(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(6):
        ids = torch.randint(2, 32, (8, 6), generator=generator)
        labels = (ids[:, 0] > 16).long()  # the first token decides the class
        batches.append({"input_ids": ids, "labels": labels})
    model = HuggingFace(transformers.BertForSequenceClassification(config),
                        losses=["loss"], predictions="logits")
    trainer = Trainer(model, batches, max_epochs=15, log_every=30, log_dir=str(tmp_path),
                      progress=False, keep_last=0,
                      optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3))
    trainer.fit()
    assert set(trainer.losses) == {"loss"}
    predictions = torch.cat([model.predict(b).argmax(-1) for b in batches])
    assert (predictions == torch.cat([b["labels"] for b in batches])).float().mean() > 0.9


def test_a_resumed_hugging_face_run_equals_an_uninterrupted_one(tmp_path):
    def run(log_dir, steps):
        torch.manual_seed(0)
        model = HuggingFace(tiny_gpt2())
        Trainer(model, lm_batches(6), max_steps=steps, log_dir=str(log_dir), progress=False,
                checkpoint_every=3, seed=0).fit()
        return model

    uninterrupted = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6)
    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    # The adapter's checkpoint keys are the bare model's under "model.".
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-000000006.pt", weights_only=True)
    bare = tiny_gpt2()
    bare.load_state_dict({k.removeprefix("model."): v for k, v in state["model"].items()})
    assert all(torch.equal(p, q) for p, q in zip(bare.parameters(), uninterrupted.parameters()))


def test_a_batch_without_labels_is_refused_clearly(tmp_path):
    batch = {k: v for k, v in lm_batches(1)[0].items() if k != "labels"}
    with pytest.raises(ModelOutputError, match=r"needs labels: the batch has \['attention_mask', "
                                               r"'input_ids'\] and none of \['labels'\]"):
        Trainer(HuggingFace(tiny_gpt2()), [batch], log_dir=str(tmp_path), progress=False,
                keep_last=0).fit()
    with pytest.raises(ModelOutputError, match="takes batches that are dicts"):
        Trainer(HuggingFace(tiny_gpt2()), [(batch["input_ids"],)], log_dir=str(tmp_path),
                progress=False, keep_last=0).fit()


class Unwrapped(Model):
    """A Hugging Face model's output returned as it is: a ModelOutput, a dict subclass."""

    def __init__(self):
        super().__init__()
        self.net = tiny_gpt2()

    def forward(self, batch):
        return self.net(**batch)


def test_an_output_object_with_a_loss_points_to_the_adapter(tmp_path):
    with pytest.raises(ModelOutputError) as caught:
        Trainer(Unwrapped(), lm_batches(1), log_dir=str(tmp_path), progress=False,
                keep_last=0).fit()
    message = str(caught.value)
    assert "Unwrapped(batch) returned a CausalLMOutputWithCrossAttentions at step 1" in message
    assert "scalar .loss" in message and "adapters.HuggingFace(model)" in message
    assert ".mean()" not in message  # reducing the logits is not the fix


def test_an_ordered_dict_of_losses_is_still_a_loss_dict(tmp_path):
    class Ordered(Model):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, batch):
            return OrderedDict(loss=self.w.sum(), aux=self.w.pow(2).sum())

    trainer = Trainer(Ordered(), [torch.zeros(1)] * 2, log_dir=str(tmp_path), progress=False,
                      keep_last=0)
    trainer.fit()
    assert set(trainer.losses) == {"loss", "aux"}


# --------------------------------------------------------------------------- torchvision


class ToyDetector(nn.Module):
    """torchvision's detection convention: images as a list of CHW tensors of any size,
    targets as a list of dicts with boxes and labels; a loss dict in training mode, a
    list of dicts in eval mode, and torchvision's assertion without targets."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 3, padding=1)
        self.box = nn.Linear(8, 4)
        self.cls = nn.Linear(8, 3)

    def forward(self, images, targets=None):
        if self.training and targets is None:
            raise AssertionError("targets should not be none when in training mode")
        features = torch.stack([self.backbone(image).mean(dim=(1, 2)) for image in images])
        boxes, scores = self.box(features), self.cls(features)
        if self.training:
            first_box = torch.stack([t["boxes"][0] for t in targets])
            first_label = torch.stack([t["labels"][0] for t in targets])
            return {"loss_box_reg": F.smooth_l1_loss(boxes, first_box),
                    "loss_classifier": F.cross_entropy(scores, first_label)}
        return [{"boxes": b[None], "labels": s.argmax()[None], "scores": s.softmax(-1).max()[None]}
                for b, s in zip(boxes, scores)]


def detection_batches(n: int) -> list[tuple[list[torch.Tensor], list[dict]]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        images = [torch.rand(3, 8 + i, 10, generator=generator) for i in range(3)]
        targets = [{"boxes": torch.tensor([[1.0, 1.0, 4.0, 5.0]]),
                    "labels": torch.tensor([i % 3])} for i in range(3)]
        batches.append((images, targets))
    return batches


def test_a_detector_trains_on_its_loss_dict_and_detects_from_images_alone(tmp_path):
    torch.manual_seed(0)
    model = Torchvision(ToyDetector())
    data = detection_batches(4)
    Trainer(model, data, max_epochs=20, log_every=20, log_dir=str(tmp_path), progress=False,
            keep_last=0, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)).fit()
    records = read_metrics(tmp_path)
    assert records[-1]["loss/total"] < records[0]["loss/total"]
    assert {"loss/loss_box_reg", "loss/loss_classifier"} <= set(records[-1])
    # Throughput counts the images of each (images, targets) batch: 3, not their channels.
    assert records[-1]["perf/samples_per_sec"] / records[-1]["perf/steps_per_sec"] == \
        pytest.approx(batch_size(data[0])) == 3
    images, _ = data[0]
    for batch in (images, data[0], torch.stack([i[:, :8] for i in images])):
        detections = model.predict(batch)
        assert len(detections) == 3 and detections[0]["boxes"].shape == (1, 4)


def test_mean_average_precision_evaluates_a_detector(tmp_path):
    # torchmetrics' detection metrics need torchvision, and a COCO backend (pycocotools
    # or faster-coco-eval): this runs where they import, and skips here.
    torchmetrics = pytest.importorskip("torchmetrics")
    try:
        from torchmetrics.detection import MeanAveragePrecision
        metric = MeanAveragePrecision()
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"MeanAveragePrecision does not work here: {exc}")
    data = detection_batches(2)
    trainer = Trainer(Torchvision(ToyDetector()), data, log_dir=str(tmp_path),
                      progress=False, keep_last=0)
    results = trainer.evaluate(data, [TorchMetric(metric, name="det")])
    assert {"det/map", "det/map_50", "det/mar_100"} <= set(results)
    assert all(-1.0 <= value <= 1.0 for key, value in results.items() if key != "det/classes")
    # The same as torchmetrics computes it on the detections and targets by hand.
    expected = torchmetrics.detection.MeanAveragePrecision()
    for images, targets in data:
        expected.update(trainer.model.predict(images), targets)
    assert results["det/map"] == pytest.approx(float(expected.compute()["map"]))


def test_a_detector_needs_targets_to_train(tmp_path):
    images, _ = detection_batches(1)[0]
    with pytest.raises(ModelOutputError, match=r"needs \(images, targets\) batches"):
        Trainer(Torchvision(ToyDetector()), [images], log_dir=str(tmp_path), progress=False,
                keep_last=0).fit()


def test_a_real_torchvision_detector_trains_when_torchvision_imports(tmp_path):
    try:
        from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
    except Exception as exc:  # the CUDA wheel next to the CPU torch fails to import
        pytest.skip(f"torchvision does not import here: {type(exc).__name__}")
    torch.manual_seed(0)
    detector = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None,
                                                 num_classes=3, min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}
               for _ in images]
    trainer = Trainer(Torchvision(detector), [(images, targets)] * 2, log_dir=str(tmp_path),
                      progress=False, keep_last=0)
    trainer.fit()
    assert "loss_classifier" in trainer.losses
    assert len(trainer.model.predict(images)) == 2


def test_a_hugging_face_model_passed_as_it_is_gets_an_error_naming_the_adapter(tmp_path):
    with pytest.raises(ModelOutputError) as caught:
        Trainer(tiny_gpt2(), lm_batches(1), log_dir=str(tmp_path), progress=False,
                keep_last=0).fit()
    message = str(caught.value)
    assert message.startswith("GPT2LMHeadModel(batch) raised AttributeError at step 1")
    assert "a dict with keys ['input_ids', 'attention_mask', 'labels']" in message
    assert "adapters.HuggingFace(model) calls model(**batch)" in message
    assert isinstance(caught.value.__cause__, AttributeError)  # the original, chained


def test_a_detector_passed_as_it_is_gets_an_error_naming_the_adapter(tmp_path):
    with pytest.raises(ModelOutputError) as caught:
        Trainer(ToyDetector(), detection_batches(1), log_dir=str(tmp_path), progress=False,
                keep_last=0).fit()
    message = str(caught.value)
    assert "ToyDetector(batch) raised AssertionError at step 1: targets should not be none" \
        in message
    assert "a tuple of length 2 (list, list)" in message
    assert "adapters.Torchvision(model) calls model(images, targets)" in message


def test_a_model_error_after_the_first_step_passes_through_unchanged(tmp_path):
    class FailsLater(Model):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))
            self.calls = 0

        def forward(self, batch):
            self.calls += 1
            if self.calls == 2:
                raise KeyError("missing")
            return {"loss": self.w.sum()}

    with pytest.raises(KeyError, match="missing"):
        Trainer(FailsLater(), [torch.zeros(1)] * 3, log_dir=str(tmp_path), progress=False,
                keep_last=0).fit()


def test_batch_encoding_batches_reach_the_model_as_keywords(tmp_path):
    batches = [transformers.BatchEncoding(batch) for batch in lm_batches(2)]
    seen = []

    class Seen(Hook):
        def after_step(self, trainer):
            seen.append((type(trainer.batch).__name__, set(trainer.losses)))

    trainer = Trainer(HuggingFace(tiny_gpt2()), batches, log_dir=str(tmp_path),
                      progress=False, keep_last=0, callbacks=[Seen()])
    trainer.fit()
    assert seen == [("BatchEncoding", {"loss"})] * 2
    assert trainer.model.predict(batches[0]).logits.shape == (4, 12, 32)


# -- exact token means -----------------------------------------------------------------


def padded(lengths: list[int], width: int, seed: int) -> dict[str, torch.Tensor]:
    """A causal-LM batch of sequences of these lengths, padded on the right to `width`
    (labels -100 at the padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 32, (len(lengths), width), generator=generator)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_token_mean_is_chosen_from_the_model_class():
    bert = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32)
    assert HuggingFace(tiny_gpt2()).token_mean == "shifted"
    assert HuggingFace(transformers.BertForMaskedLM(bert)).token_mean == "unshifted"
    assert HuggingFace(transformers.BertForTokenClassification(bert)).token_mean == "unshifted"
    assert HuggingFace(transformers.BertForSequenceClassification(bert)).token_mean is None
    assert HuggingFace(tiny_gpt2(), losses=["loss"]).token_mean is None
    assert HuggingFace(tiny_gpt2(), token_mean=None).count_items is None
    with pytest.raises(ValueError, match="token_mean=...\\) must be 'auto', 'shifted'"):
        HuggingFace(tiny_gpt2(), token_mean=True)
    with pytest.raises(ValueError, match="with losses= the losses are yours"):
        HuggingFace(tiny_gpt2(), losses=["loss"], token_mean="shifted")


@pytest.mark.parametrize("token_mean", ["auto", None])
def test_accumulated_micro_batches_train_on_the_whole_step_token_mean(tmp_path, token_mean):
    # Two micro-batches with 4 + 6 and 20 + 22 tokens: the step's gradient must be the
    # gradient of the token mean over all of them, as one batch gives it.
    micro = [padded([5, 7], 12, seed=1), padded([11, 12], 12, seed=2)]
    whole = {key: torch.cat([b[key] for b in micro]) for key in micro[0]}
    reference = tiny_gpt2()
    reference(**whole).loss.backward()
    expected = [p.grad for p in reference.parameters()]

    model = HuggingFace(tiny_gpt2(), token_mean=token_mean)
    grads = []

    class Grads(Hook):
        def after_backward(self, trainer):
            grads.extend(p.grad.clone() for p in trainer.model.model.parameters())

    Trainer(model, micro, grad_accum_steps=2, log_dir=str(tmp_path), progress=False,
            keep_last=0, callbacks=[Grads()], optimizer=lambda p: torch.optim.SGD(p, lr=0.0)).fit()
    close = all(torch.allclose(g, e, rtol=1e-4, atol=1e-7) for g, e in zip(grads, expected))
    assert close == (token_mean == "auto")  # the mean of the two means is not the mean


def test_a_micro_batch_with_no_label_token_adds_nothing(tmp_path):
    empty = padded([3, 4], 12, seed=3)
    empty["labels"] = torch.full_like(empty["labels"], -100)
    full = padded([12, 12], 12, seed=4)
    model = HuggingFace(tiny_gpt2())
    trainer = Trainer(model, [empty, full], grad_accum_steps=2, log_dir=str(tmp_path),
                      progress=False, keep_last=0, log_every=1)
    trainer.fit()  # the bare model's mean over 0 tokens would be NaN
    reference = tiny_gpt2()
    assert read_metrics(tmp_path)[0]["loss/loss"] == pytest.approx(
        reference(**full).loss.item(), rel=1e-5)


def test_a_compiled_hugging_face_model_trains(tmp_path):
    model = HuggingFace(tiny_gpt2(), predictions="logits")
    data = lm_batches(4)
    trainer = Trainer(model, data, max_steps=24, log_every=4, log_dir=str(tmp_path),
                      progress=False, keep_last=0, compile=True,
                      optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer.fit()
    losses = [line["loss/loss"] for line in read_metrics(tmp_path)]
    assert losses[-1] < 0.6 * losses[0]
    assert list(model.state_dict()) == ["model." + k for k in tiny_gpt2().state_dict()]
    assert model.predict(data[0]).shape == (4, 12, 32)
