"""Fine-tune a Hugging Face causal language model on local text.

A tiny GPT-2 learns Python source code: the standard library's own ``*.py`` files, which
every machine with Python has, read as bytes (a byte is a token, so no tokenizer is
needed and nothing is downloaded). The model is built from a ``GPT2Config``; with
internet access, ``GPT2LMHeadModel.from_pretrained("gpt2")`` (and its tokenizer) goes in
its place and nothing else changes. ``--init DIR`` starts from a model saved with
``save_pretrained``, such as the one every run of this script writes to
``<log dir>/hf_model``: run it twice to fine-tune its own output on other text.

`adapters.HuggingFace` calls the model the way Hugging Face models are called,
``model(**batch)`` with ``labels``, and trains on the loss the model computes itself.
That loss is a mean over the batch's label tokens, and batches of documents of different
lengths hold different numbers of them: the adapter turns it into an exact mean over
every token of the optimizer step (``grad_accum_steps`` micro-batches), as one big batch
would give.

    python examples/huggingface_finetune.py                # about 2 minutes on a CPU
    python examples/huggingface_finetune.py --fast         # about 15 seconds (the tests)
    python examples/huggingface_finetune.py --init runs/<time>/hf_model --source email
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from lossless_trainer import Trainer
from lossless_trainer.adapters import HuggingFace

IGNORE = -100  # the label at padding: ignored by the model's loss
PAD = 0  # the input id at padding (a NUL byte, which Python sources never contain)
NEWLINE = 10

Batch = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- data


def python_sources(source: str, train_bytes: int, heldout_bytes: int
                   ) -> tuple[list[bytes], list[bytes]]:
    """The standard library's sources as bytes: its top-level modules (``source="stdlib"``)
    or one package (``"email"``, ``"json"``, ...), files in sorted order, every fifth held
    out, each split stopping once it has its number of bytes."""
    root = os.path.dirname(os.__file__)
    pattern = "*.py" if source == "stdlib" else os.path.join(source, "**", "*.py")
    paths = sorted(glob.glob(os.path.join(root, pattern), recursive=True))
    if not paths:
        raise SystemExit(f"no Python files for --source {source!r} under {root}")
    train: list[bytes] = []
    heldout: list[bytes] = []
    for index, path in enumerate(paths):
        split, budget = (heldout, heldout_bytes) if index % 5 == 2 else (train, train_bytes)
        if sum(map(len, split)) < budget:
            split.append(Path(path).read_bytes())
    return train, heldout


def documents(texts: Sequence[bytes], block: int) -> list[torch.Tensor]:
    """Every top-level statement (a function, a class, a run of imports) of every text as
    a token sequence, cut into consecutive pieces of at most `block` tokens: from a few
    tokens to `block`, as real documents are."""
    pieces = []
    for text in texts:
        for part in re.split(rb"\n\s*\n(?=\S)", text):  # blank lines, then no indent
            ids = list(part.strip(b"\n")) + [NEWLINE]
            pieces += [torch.tensor(ids[i:i + block]) for i in range(0, len(ids), block)
                       if len(ids) - i >= 2]  # one prediction at least
    return pieces


def collate(pieces: Sequence[torch.Tensor]) -> Batch:
    """What a Hugging Face data collator gives a causal LM: ``input_ids`` padded to the
    longest piece, ``attention_mask`` and ``labels`` (= input_ids, -100 at padding; the
    model shifts them itself)."""
    length = max(len(piece) for piece in pieces)
    input_ids = torch.full((len(pieces), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(pieces), length), dtype=torch.long)
    for row, piece in enumerate(pieces):
        input_ids[row, :len(piece)] = piece
        attention_mask[row, :len(piece)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----------------------------------------------------------------------------- metrics


class BitsPerByte:
    """Held-out negative log-likelihood per predicted byte, summed over every token of the
    evaluation and divided by their number. An evaluator: it reads the batch's labels and
    the eval-mode logits (``HuggingFace(..., predictions="logits")``)."""

    def reset(self) -> None:
        self._nll = torch.zeros((), dtype=torch.float64)
        self._tokens = torch.zeros((), dtype=torch.long)

    def process(self, batch: Batch, logits: torch.Tensor) -> None:
        labels = batch["labels"][:, 1:]  # position t predicts token t + 1
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                              ignore_index=IGNORE, reduction="sum")
        self._nll = self._nll.to(nll.device) + nll.double()
        self._tokens = self._tokens.to(labels.device) + labels.ne(IGNORE).sum()

    def compute(self) -> dict[str, float]:
        nll = float(self._nll) / max(int(self._tokens), 1)
        return {"nll_per_byte": nll, "bits_per_byte": nll / math.log(2)}


# ----------------------------------------------------------------------------- run


def warmup_then_cosine(steps: int):
    """The learning-rate factor of step k: a linear warmup over the first tenth of the
    steps, then a cosine decay to 0, as Hugging Face's ``get_cosine_schedule_with_warmup``."""
    warmup = max(steps // 10, 1)
    return lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * k / steps))


def build_model(init: str | None) -> GPT2LMHeadModel:
    if init is not None:
        return GPT2LMHeadModel.from_pretrained(init)  # a local directory: no download
    config = GPT2Config(vocab_size=256, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=NEWLINE, eos_token_id=NEWLINE, pad_token_id=PAD,
                        loss_type="ForCausalLM")
    return GPT2LMHeadModel(config)


@torch.inference_mode()
def complete(model: GPT2LMHeadModel, prompt: str, tokens: int) -> str:
    """The model's greedy continuation of `prompt`, with Hugging Face's ``generate``."""
    model.eval()
    ids = torch.tensor([list(prompt.encode())], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                         do_sample=False, pad_token_id=PAD)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


def main(fast: bool = False, log_dir: str | None = None, progress: bool = True,
         init: str | None = None, source: str = "stdlib", steps: int | None = None,
         accum: int = 4, batch_size: int = 16, seed: int = 0) -> dict[str, float]:
    """Train, print the held-out figures before and after, a sample and where the logs and
    the saved model are; return the held-out figures after training."""
    train_texts, heldout_texts = python_sources(
        source, train_bytes=60_000 if fast else 600_000, heldout_bytes=15_000 if fast else 60_000)
    block = 128
    train = documents(train_texts, block)
    heldout = documents(heldout_texts, block)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate)
    heldout_loader = DataLoader(heldout, batch_size=32, collate_fn=collate)
    steps = steps if steps is not None else (60 if fast else 400)
    lr = 3e-3 if init is None else 1e-3

    torch.manual_seed(seed)  # the initial weights; Trainer(seed=...) seeds when fit starts
    model = HuggingFace(build_model(init), predictions="logits")
    trainer = Trainer(model, loader, max_steps=steps, grad_accum_steps=accum, log_every=10,
                      seed=seed, log_dir=log_dir, progress=progress,
                      eval_data=heldout_loader, evaluators=[BitsPerByte()],
                      eval_every=max(steps // 5, 1), clip_grad_norm=1.0,
                      optimizer=lambda params: torch.optim.AdamW(params, lr=lr,
                                                                 weight_decay=0.01),
                      lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                          opt, warmup_then_cosine(steps)))
    before = trainer.evaluate()
    trainer.fit()
    after = trainer.last_eval  # the evaluation at the end of fit

    tokens = sum(len(piece) - 1 for piece in heldout)
    print(f"training on {len(train)} documents of {source}, "
          f"{sum(map(len, train))} tokens; {accum} micro-batches per step")
    print(f"held-out bits per byte: {before['bits_per_byte']:.3f} before, "
          f"{after['bits_per_byte']:.3f} after, over {tokens} bytes")
    print("greedy completion:\n" + complete(model.model, "def __init__(self", 60))
    saved = os.path.join(trainer.log_dir, "hf_model")
    model.model.save_pretrained(saved)  # the bare Hugging Face model, for from_pretrained
    print(f"saved with save_pretrained: {saved}")
    print(f"TensorBoard logs: {trainer.log_dir}")
    print(f"view them with:   tensorboard --logdir {trainer.log_dir}")
    return after


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer steps, for tests")
    parser.add_argument("--log-dir", default=None, help="run directory (default: runs/<time>)")
    parser.add_argument("--init", default=None,
                        help="a directory saved with save_pretrained to start from")
    parser.add_argument("--source", default="stdlib",
                        help="'stdlib' (top-level modules) or a package: email, json, ...")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    args = parser.parse_args()
    # The model is tiny: its ops are too small to share across cores, and on a busy
    # machine a second thread waiting for a core makes each op many times slower.
    torch.set_num_threads(1)
    main(fast=args.fast, log_dir=args.log_dir, init=args.init, source=args.source,
         steps=args.steps)
