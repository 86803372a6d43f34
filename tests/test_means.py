"""Exact means (means.py): a `Mean` loss stays the global mean under accumulation, and its
logged values are pooled over items, not averaged over batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyLM, UncountedLM, lm_batches, lm_sequences, read_metrics

from lossless_trainer import (
    Hook,
    Mean,
    Model,
    ModelOutputError,
    NonFiniteLossError,
    Trainer,
    write_summary,
)
from lossless_trainer.means import Normaliser
from lossless_trainer.summary import SummarySink

STEPS = 3
LR = 0.5


def big_batch_reference(sequences, aux: bool = False) -> TinyLM:
    """A hand-written loop: batch 8, the loss summed over the batch's tokens over their
    number (plus the plain auxiliary loss), SGD."""
    torch.manual_seed(0)
    model = TinyLM(aux=aux)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for batch in lm_batches(sequences, 8)[:STEPS]:
        logits = model.out(torch.tanh(model.mix(model.embed(batch["tokens"]))))
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                               reduction="sum") / (labels != -100).sum()
        if aux:
            loss = loss + 0.1 * logits[:, 0].pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def fit_lm(tmp_path, model_class=TinyLM, batch: int = 2, accum: int = 4, name: str = "run",
           **options) -> tuple[torch.nn.Module, Trainer]:
    torch.manual_seed(0)
    model = model_class(**options.pop("model_options", {}))
    trainer = Trainer(model, lm_batches(lm_sequences(8 * STEPS), batch),
                      optimizer=lambda p: torch.optim.SGD(p, lr=LR), grad_accum_steps=accum,
                      max_steps=STEPS, log_dir=str(tmp_path / name), progress=False,
                      keep_last=0, **options)
    trainer.fit()
    return model, trainer


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_accumulating_4_batches_of_2_equals_one_batch_of_8(tmp_path):
    reference = big_batch_reference(lm_sequences(8 * STEPS))
    ours, _ = fit_lm(tmp_path)
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    # The mean of means (each micro-batch's own mean, averaged) trains elsewhere: the
    # test above can fail.
    wrong, _ = fit_lm(tmp_path, model_options={"mean_of_means": True}, name="wrong")
    assert max_difference(wrong, reference) > 1e-3


def test_one_batch_of_8_without_count_items_equals_the_hand_written_loop(tmp_path):
    reference = big_batch_reference(lm_sequences(8 * STEPS))
    ours, _ = fit_lm(tmp_path, UncountedLM, batch=8, accum=1)
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_a_mean_and_a_plain_loss_are_each_weighted_right(tmp_path):
    reference = big_batch_reference(lm_sequences(8 * STEPS), aux=True)
    ours, trainer = fit_lm(tmp_path, model_options={"aux": True})
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert set(trainer.losses) == {"nll", "aux"} and type(trainer.losses["nll"]) is Mean


def test_clipping_clips_the_gradient_of_the_global_mean(tmp_path):
    sequences = lm_sequences(8 * STEPS)
    torch.manual_seed(0)
    reference = TinyLM()
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    for batch in lm_batches(sequences, 8)[:STEPS]:
        loss = reference(batch)["nll"]
        (loss.total / loss.count).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        optimizer.step()
        optimizer.zero_grad()
    ours, _ = fit_lm(tmp_path, clip_grad_norm=0.05)
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_on_the_normalised_loss(tmp_path, precision):
    """Autocast rounds each micro-batch differently, so the runs agree to bf16's
    precision; the fp16 scaler saw a loss of the global mean's size, not a token sum."""
    reference = big_batch_reference(lm_sequences(8 * STEPS))
    ours, trainer = fit_lm(tmp_path, precision=precision)
    assert max_difference(ours, reference) < 2e-2
    if precision == "fp16":
        assert trainer.precision.skipped_steps.item() == 0


def test_without_count_items_accumulation_is_refused_before_any_backward(tmp_path):
    torch.manual_seed(0)
    model = UncountedLM()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, lm_batches(lm_sequences(16), 2), grad_accum_steps=4,
                      max_steps=2, log_dir=str(tmp_path), progress=False, keep_last=0)
    with pytest.raises(ModelOutputError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "'nll'" in message and "step 1" in message and "4 micro-batches" in message
    assert "UncountedLM.count_items(batch)" in message and "mean of means" in message
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_short_step_of_one_micro_batch_needs_no_count_items(tmp_path):
    """An epoch's leftover micro-batch makes a step of one: its counts come from the
    forward. 3 batches with grad_accum_steps=2: a step of 2, refused, would come first,
    so here 1 batch per epoch, one micro-batch per step."""
    torch.manual_seed(0)
    model = UncountedLM()
    Trainer(model, lm_batches(lm_sequences(2), 2), grad_accum_steps=2, max_epochs=2,
            log_dir=str(tmp_path), progress=False, keep_last=0).fit()


class MiscountedLM(TinyLM):
    """count_items counts the padding too."""

    def count_items(self, batch):
        return {"nll": batch["labels"].numel()}


def test_count_items_that_disagrees_with_the_forward_is_caught_at_the_flush(tmp_path):
    with pytest.raises(ModelOutputError) as caught:
        fit_lm(tmp_path, MiscountedLM, log_every=2)
    message = str(caught.value)
    batches = lm_batches(lm_sequences(8 * STEPS), 2)[:8]  # the 2 steps before the flush
    padded = sum(b["labels"].numel() for b in batches)
    real = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert padded != real
    assert "MiscountedLM.count_items(batch) disagrees" in message
    assert (f"over steps 1 to 2 ('nll': count_items counted {padded}, the forward's Means "
            f"{real})") in message


class IntCountedLM(TinyLM):
    """Counts on the host, as ints, and a forward that counts one more per batch."""

    def forward(self, batch):
        losses = super().forward(batch)
        if self.training:
            losses["nll"] = Mean(losses["nll"].total, int(losses["nll"].count) + 1)
        return losses

    def count_items(self, batch):
        return {"nll": int((batch["labels"] != -100).sum())}


def test_a_host_count_mismatch_names_both_counts_at_the_last_step(tmp_path):
    real = sum(len(s) - 1 for s in lm_sequences(8 * STEPS))
    with pytest.raises(ModelOutputError, match=rf"over steps 1 to 3 \('nll': count_items "
                                               rf"counted {real}, the forward's Means "
                                               rf"{real + 4 * STEPS}\)"):
        fit_lm(tmp_path, IntCountedLM, log_every=50)


@pytest.mark.parametrize(("counts", "fragment"), [
    ([5], "returned list"),
    ({}, "(empty)"),
    ({"nll": "7"}, "returned str for 'nll'"),
    ({"nll": torch.ones(3)}, "shape (3,) for 'nll'"),
    ({"nll": -1}, "returned -1 for 'nll'"),
])
def test_count_items_must_return_counts(tmp_path, counts, fragment):
    class Bad(TinyLM):
        def count_items(self, batch):
            return counts

    with pytest.raises(ModelOutputError) as caught:
        fit_lm(tmp_path, Bad)
    assert fragment in str(caught.value) and "at step 1" in str(caught.value)


def test_a_mean_count_items_does_not_know_is_refused(tmp_path):
    class Extra(TinyLM):
        def forward(self, batch):
            losses = super().forward(batch)
            if self.training:
                losses["z"] = Mean(losses["nll"].total * 0.1, 3)
            return losses

    with pytest.raises(ModelOutputError, match="'z' at step 1 is a Mean, but "
                                               r"Extra.count_items\(batch\) gives no count"):
        fit_lm(tmp_path, Extra)


def test_count_items_keys_must_not_change(tmp_path):
    class Changing(TinyLM):
        calls = 0

        def count_items(self, batch):
            Changing.calls += 1
            counts = super().count_items(batch)
            return counts if Changing.calls < 6 else {**counts, "other": 0}

    with pytest.raises(ModelOutputError, match=r"returned the keys \['nll', 'other'\] at step "
                                               r"2, but \['nll'\] at its first call"):
        fit_lm(tmp_path, Changing)


class Totals(Hook):
    """Adds up every micro-batch's nll totals and counts, as the steps run."""

    def __init__(self):
        self.total = self.count = 0.0

    def after_step(self, trainer):
        for losses in trainer.micro_losses:
            self.total += losses["nll"].total.item()
            self.count += losses["nll"].count.item()


def test_logged_losses_are_pooled_over_the_window(tmp_path):
    """loss/nll is the window's summed nll over its tokens; loss/total is the sum of the
    per-key values."""
    totals = Totals()
    fit_lm(tmp_path, model_options={"aux": True}, log_every=STEPS, callbacks=[totals])
    record = read_metrics(tmp_path / "run")[-1]
    assert totals.count == sum(len(s) - 1 for s in lm_sequences(8 * STEPS))
    assert record["loss/nll"] == pytest.approx(totals.total / totals.count, rel=1e-6)
    assert record["loss/total"] == pytest.approx(record["loss/nll"] + record["loss/aux"],
                                                 rel=1e-6)


class CountingLM(TinyLM):
    """Writes token accuracy as a Mean, and the raw totals, to check the pooling."""

    def forward(self, batch):
        losses = super().forward(batch)
        if self.training:
            logits = self.out(torch.tanh(self.mix(self.embed(batch["tokens"]))))
            labels = batch["labels"]
            real = labels != -100
            correct = ((logits.argmax(-1) == labels) & real).sum()
            write_summary("token_accuracy", Mean(correct, real.sum()))
            write_summary("seen/correct", correct.float(), reduce="sum")
            write_summary("seen/tokens", real.sum().float(), reduce="sum")
            write_summary("seen/nll", losses["nll"].total.detach(), reduce="sum")
        return losses


def test_write_summary_of_a_mean_is_the_pooled_ratio(tmp_path):
    _, _ = fit_lm(tmp_path, CountingLM, log_every=STEPS)
    record = read_metrics(tmp_path / "run")[-1]
    # reduce="sum" of a single process is the window mean; times the micro-batches of
    # the window (3 steps x 4) it is the window's sum.
    micro = STEPS * 4
    correct, tokens = record["seen/correct"] * micro, record["seen/tokens"] * micro
    assert record["token_accuracy"] == pytest.approx(correct / tokens, rel=1e-6)
    assert record["loss/nll"] == pytest.approx(record["seen/nll"] * micro / tokens, rel=1e-6)
    # ...which is not the mean of the per-batch accuracies in general: the test can fail.
    assert 0 < record["token_accuracy"] < 1


def test_a_mean_with_nothing_counted_adds_nothing(tmp_path):
    class Empty(Model):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, batch):
            return {"empty": Mean(self.w.sum() * 0.0, 0), "plain": self.w.pow(2).sum()}

        def count_items(self, batch):
            return {"empty": 0}

    model = Empty()
    Trainer(model, [torch.zeros(1)] * 4, grad_accum_steps=2, max_steps=2, log_every=1,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), log_dir=str(tmp_path),
            progress=False, keep_last=0).fit()
    assert torch.allclose(model.w, torch.full((3,), 0.8 ** 2))  # only the plain loss
    record = read_metrics(tmp_path)[-1]
    assert "loss/empty" not in record and record["loss/total"] == pytest.approx(
        record["loss/plain"])


@pytest.mark.parametrize(("args", "error"), [
    ((torch.tensor(1.0), "3"), "count must be an int, a float or a tensor"),
    (("x", 3), "total must be a tensor or a number"),
    ((torch.tensor(1.0), torch.ones(2)), "count must be one number"),
    ((torch.tensor(1.0), -2), "count must be >= 0"),
    ((torch.tensor(1.0), math.nan), "count must be >= 0"),
])
def test_mean_checks_its_arguments(args, error):
    with pytest.raises((TypeError, ValueError), match=error):
        Mean(*args)


def test_a_mean_total_must_be_a_trainable_scalar(tmp_path):
    class Detached(TinyLM):
        def forward(self, batch):
            loss = super().forward(batch)["nll"]
            return {"nll": Mean(loss.total.detach(), loss.count)}

    with pytest.raises(ModelOutputError, match="the total of Mean 'nll' at step 1 does not "
                                               "require grad"):
        fit_lm(tmp_path, Detached)


@pytest.mark.parametrize("now", [True, False], ids=["read-now", "kept"])
def test_the_sink_pools_means_and_keeps_them_across_a_checkpoint(now):
    sink = SummarySink(read_cpu_now=now)
    sink.put_mean("acc", torch.tensor(3.0), torch.tensor(4))
    sink.put_mean("acc", 1.0, 6)
    saved = SummarySink()
    saved.load_state_dict(sink.state_dict())  # the window, through a checkpoint
    for target in (sink, saved):
        target.put_mean("acc", torch.tensor(2.0), 10.0)
    for target in (sink, saved):
        record = target.flush()
        assert record.scalars["acc"] == pytest.approx(6.0 / 20.0)
        assert record.counts["acc"] == 20
    with pytest.raises(ValueError, match="a Mean and a plain value in the same window"):
        sink.put_mean("acc", 1.0, 1)
        sink.put_scalar("acc", torch.tensor(1.0))


def test_mean_value_is_the_batch_mean():
    assert Mean(torch.tensor(6.0), torch.tensor(4)).value.item() == 1.5
    assert Mean(6.0, 4).value == 1.5
    assert Mean(torch.tensor(0.0), 0).value.item() == 0.0


def test_the_mean_step_reads_only_count_items_host_counts(tmp_path, syncs):
    """Between flushes nothing computed by the forward is read back: the only reads are
    count_items' counts, CPU tensors from the batch as the data yields it (one per
    micro-batch; reading them waits for no device), and a fixed number per flush."""
    calls = syncs
    per_run = []
    for steps in (6, 12):
        calls.update(dict.fromkeys(calls, 0))
        torch.manual_seed(0)
        Trainer(CountingLM(), lm_batches(lm_sequences(4 * steps), 2), grad_accum_steps=2,
                max_steps=steps, log_every=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                log_dir=str(tmp_path / str(steps)), progress=False, keep_last=0).fit()
        assert calls["bool"] == calls["float"] == 0
        assert calls["item"] == steps * 2  # count_items: 2 micro-batches, 1 key
        per_run.append(calls["tolist"])
    # Twice the steps, twice the flushes, twice the reads: all of them at flushes
    # (the window's values and counts, and the count check).
    assert per_run[1] == 2 * per_run[0] and per_run[0] == 2 * 3


class FakeRanks:
    """A `Distributed` stand-in for rank 0 of 2 whose other rank said `other_keys` at the
    agreement and counts as much as this one."""

    enabled = True
    world_size = 2
    rank = 0
    device = torch.device("cpu")

    def __init__(self, other_keys):
        self.other_keys = other_keys

    def all_gather(self, keys):
        return [keys, self.other_keys]

    def all_reduce_sum(self, tensor, async_op=False):
        tensor.mul_(2)

    def any(self, flag):
        return flag


def test_under_torchrun_the_mean_keys_are_agreed_at_the_first_step():
    means = Normaliser(UncountedLM(), FakeRanks(("aux",)), "LM")
    total = torch.tensor(6.0, requires_grad=True)
    # Step 1: this rank has "nll", the other "aux": both are counted from now on.
    loss = means.objective(None, {"nll": Mean(total, 3)}, 1, step=1)
    assert means.keys == ("aux", "nll")
    assert loss.item() == pytest.approx(6.0 * 2 / 6)  # world size over both ranks' count
    with pytest.raises(ModelOutputError, match=r"'late' at step 2 on rank 0 is a Mean, but "
                                               r"no rank returned it at the first step"):
        means.objective(None, {"late": Mean(total, 3)}, 1, step=2)


def test_a_plain_model_under_torchrun_stops_consulting_the_normaliser():
    means = Normaliser(UncountedLM(), FakeRanks(()), "LM")
    plain = torch.tensor(2.0, requires_grad=True)
    assert means.objective(plain, None, 2, step=1).item() == 1.0
    assert means.keys == () and not means.active


def test_count_items_keys_must_agree_across_ranks():
    means = Normaliser(TinyLM(), FakeRanks(("nll", "other")), "LM")
    batch = lm_batches(lm_sequences(2), 2)[0]
    with pytest.raises(ModelOutputError, match=r"different keys on different ranks at step 1: "
                                               r"rank 0: \['nll'\]; rank 1: \['nll', 'other'\]"):
        means.begin([batch], step=1)


def test_a_miscount_in_the_last_window_is_raised_when_fit_ends(tmp_path):
    """Data without a length: no step is known to be the last, so the last window is
    flushed by the logging hook after the loop, and the count check runs there too."""
    sequences = lm_sequences(24)
    torch.manual_seed(0)
    trainer = Trainer(MiscountedLM(), (b for b in lm_batches(sequences, 2)),
                      grad_accum_steps=4, log_every=100, log_dir=str(tmp_path),
                      progress=False, keep_last=0)
    with pytest.raises(ModelOutputError, match="MiscountedLM.count_items.*disagrees"):
        trainer.fit()


@pytest.mark.parametrize("bad", [math.nan, -1.0])
def test_a_nan_or_negative_count_is_reported_not_dropped(tmp_path, bad):
    class BadCount(UncountedLM):
        def forward(self, batch):
            losses = super().forward(batch)
            if self.training:
                losses["nll"] = Mean(losses["nll"].total, losses["nll"].count * bad)
            return losses

    with pytest.raises(NonFiniteLossError, match="'nll' first at step 1"):
        fit_lm(tmp_path, BadCount, batch=8, accum=1, log_every=2)


def test_a_nan_total_over_zero_items_is_named(tmp_path):
    class Empty(UncountedLM):
        def forward(self, batch):
            losses = super().forward(batch)
            if self.training:
                losses["z"] = Mean(losses["nll"].total * math.nan, 0)
            return losses

    with pytest.raises(NonFiniteLossError, match="'z' first at step 1"):
        fit_lm(tmp_path, Empty, batch=8, accum=1, log_every=2)


def test_float64_models_stay_exact_in_float64(tmp_path):
    sequences = lm_sequences(8 * STEPS)
    torch.set_default_dtype(torch.float64)
    try:
        reference = big_batch_reference(sequences)
        ours, _ = fit_lm(tmp_path)
    finally:
        torch.set_default_dtype(torch.float32)
    for p, q in zip(ours.parameters(), reference.parameters()):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0)


def test_count_items_keys_must_agree_within_the_first_step(tmp_path):
    class Partial(TinyLM):
        calls = 0

        def count_items(self, batch):
            Partial.calls += 1
            return super().count_items(batch) if Partial.calls != 2 else {"other": 1}

    with pytest.raises(ModelOutputError, match=r"returned the keys \['other'\] at step 1, but "
                                               r"\['nll'\] at its first call"):
        fit_lm(tmp_path, Partial)


def test_counts_from_count_items_need_no_detach(tmp_path):
    class Traced(TinyLM):
        def count_items(self, batch):  # a count that touches a parameter
            return {"nll": (batch["labels"] != -100).sum() + 0 * self.out.bias.sum()}

    reference = big_batch_reference(lm_sequences(8 * STEPS))
    ours, _ = fit_lm(tmp_path, Traced)
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_the_agreed_keys_travel_with_a_checkpoint():
    means = Normaliser(UncountedLM(), FakeRanks(("aux",)), "LM")
    means.objective(None, {"nll": Mean(torch.tensor(1.0, requires_grad=True), 2)}, 1, 1)
    resumed = Normaliser(UncountedLM(), FakeRanks(()), "LM")
    resumed.load_state_dict(means.state_dict())
    assert resumed.keys == ("aux", "nll") and resumed.active


@pytest.mark.parametrize("now", [True, False], ids=["read-now", "kept"])
def test_the_sink_keeps_big_counts_exact_and_in_place_totals_by_value(now):
    sink = SummarySink(read_cpu_now=now)
    sink.put_mean("tokens", torch.tensor(1.0), torch.tensor(2 ** 25 + 1))
    sink.put_mean("other", torch.tensor(1.0), torch.tensor(2.0))  # a float count, same device
    buffer, count = torch.zeros(()), torch.zeros(())
    for i in (1.0, 2.0, 2.0):
        buffer += i
        count += 1
        sink.put_mean("running", buffer, count)  # updated in place: kept by value
    record = sink.flush()
    assert record.counts["tokens"] == 2 ** 25 + 1
    assert record.scalars["running"] == pytest.approx((1 + 3 + 5) / (1 + 2 + 3))


def test_a_mean_summary_is_pooled_and_only_pooled():
    sink = SummarySink()
    with sink.activate(), pytest.raises(ValueError, match="a Mean is pooled over ranks"):
        write_summary("acc", Mean(1.0, 2), reduce="sum")


def test_a_loss_is_always_a_mean_or_always_plain(tmp_path):
    class Switching(UncountedLM):
        calls = 0

        def forward(self, batch):
            losses = super().forward(batch)
            Switching.calls += 1
            if self.training and Switching.calls == 2:
                losses["nll"] = losses["nll"].value
            return losses

    with pytest.raises(ModelOutputError, match="'nll' at step 2 is a plain tensor, and was a "
                                               "Mean before"):
        fit_lm(tmp_path, Switching, batch=8, accum=1)
