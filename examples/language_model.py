"""A character-level language model whose loss is an exact mean over tokens.

A small causal transformer learns to predict the next character of Python source code:
the standard library's own ``*.py`` files, which every machine with Python has (nothing
is downloaded). The pieces of text have random lengths, and batches group pieces of
similar length (less padding), so one micro-batch may hold 100 times the tokens of
another. The loss is the negative log-likelihood *summed* over a micro-batch's real tokens,
returned as ``Mean(nll_sum, n_tokens)``: the trainer divides by the tokens of the whole
optimizer step, over every micro-batch of the accumulation, so each token weighs the
same. Averaging each micro-batch's own mean instead (the mean of means) would give a
token of a short micro-batch many times the weight of one in a long micro-batch.

    python examples/language_model.py              # full run, about 1.5 minutes on a CPU
    python examples/language_model.py --fast       # about 12 seconds, what the test suite runs
    python examples/language_model.py --accum 1    # one micro-batch per step
    python examples/language_model.py --optimizer muon  # Muon on the matrices, AdamW on the rest
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lossless_trainer import Mean, Model, Trainer, summary_scope, write_summary

# Newline and printable ASCII; anything else (a tab, a non-ASCII letter) shares one id.
CHARS = "\n" + "".join(chr(code) for code in range(32, 127))
CHAR_IDS = {char: index for index, char in enumerate(CHARS)}
OTHER = len(CHARS)
VOCAB_SIZE = len(CHARS) + 1
IGNORE = -100  # the label of a padding position: cross_entropy's ignore_index
PAD = 0  # the input id at padding positions; causal attention never reads it for a real one

Batch = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- data


def encode(text: str) -> torch.Tensor:
    return torch.tensor([CHAR_IDS.get(char, OTHER) for char in text], dtype=torch.long)


def decode(ids: Sequence[int]) -> str:
    return "".join(CHARS[i] if i < len(CHARS) else "?" for i in ids)


def stdlib_sources(train_chars: int, heldout_chars: int, chars_per_file: int = 8000
                   ) -> tuple[list[str], list[str]]:
    """Texts of the standard library's top-level modules, split by file.

    Files are taken in sorted order, at most `chars_per_file` characters of each (so
    many modules are seen, not a few long ones); every eighth file is held out. Each
    split stops once it has its number of characters.
    """
    paths = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    train: list[str] = []
    heldout: list[str] = []
    for index, path in enumerate(paths):
        split, budget = (heldout, heldout_chars) if index % 8 == 4 else (train, train_chars)
        if sum(map(len, split)) >= budget:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            split.append(f.read(chars_per_file))
    return train, heldout


def cut_pieces(texts: Sequence[str], min_len: int, max_len: int, seed: int
               ) -> list[torch.Tensor]:
    """Cut every text into consecutive pieces of random length.

    A piece of ``n + 1`` characters gives ``n`` predictions (each character from the ones
    before it), with ``n`` log-uniform in ``[min_len, max_len]``, as lengths of real
    documents are: most pieces are short, most characters are in long ones. A text's
    short tail is dropped. Consecutive pieces share one character: the last target of
    one is the first input of the next.
    """
    rng = random.Random(seed)
    low, high = math.log(min_len), math.log(max_len)
    pieces = []
    for text in texts:
        ids = encode(text)
        start = 0
        while start + min_len < len(ids):
            n = round(math.exp(rng.uniform(low, high)))
            pieces.append(ids[start:start + n + 1])
            start += n
    return pieces


def collate(pieces: Sequence[torch.Tensor]) -> Batch:
    """Pad to the longest piece: ``inputs`` (B, T) and ``labels`` (B, T), -100 at padding."""
    length = max(len(piece) for piece in pieces) - 1
    inputs = torch.full((len(pieces), length), PAD, dtype=torch.long)
    labels = torch.full((len(pieces), length), IGNORE, dtype=torch.long)
    for row, piece in enumerate(pieces):
        inputs[row, :len(piece) - 1] = piece[:-1]
        labels[row, :len(piece) - 1] = piece[1:]
    return {"inputs": inputs, "labels": labels}


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of pieces of similar length, in random order (what ``group_by_length``
    does in other trainers): little padding, but very different token counts per batch.

    Each epoch shuffles the pieces, sorts each run of ``batch_size * group`` of them by
    length, cuts the runs into batches and shuffles the batches. It draws from torch's
    global RNG, which the Trainer seeds.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group: int = 32) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group = group

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths)).tolist()
        run = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), run):
            chunk = sorted(order[start:start + run], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk),
                                                                      self.batch_size)]
        for index in torch.randperm(len(batches)).tolist():
            yield batches[index]


def make_loader(pieces: list[torch.Tensor], batch_size: int, grouped: bool = True
                ) -> DataLoader:
    if not grouped:  # held-out data: a fixed order
        return DataLoader(pieces, batch_size=batch_size, collate_fn=collate)
    sampler = LengthGroupedBatches([len(piece) for piece in pieces], batch_size)
    return DataLoader(pieces, batch_sampler=sampler, collate_fn=collate)


# ----------------------------------------------------------------------------- model


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, width = x.shape
        q, k, v = (self.qkv(self.attention_norm(x))
                   .view(b, t, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, width))
        return x + self.mlp(self.mlp_norm(x))


class CharTransformer(Model):
    """Training mode: ``{"nll": Mean(nll_sum, n_tokens)}``. Eval mode: next-character
    logits (B, T, vocabulary) at every position.

    The batch is ``{"inputs": (B, T), "labels": (B, T)}`` as `collate` makes it; eval
    mode reads only ``"inputs"``.
    """

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4,
                 max_len: int = 256) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(VOCAB_SIZE, width)
        self.position = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB_SIZE)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(inputs.shape[1], device=inputs.device)
        x = self.embed(inputs) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def forward(self, batch: Batch) -> dict[str, Mean] | torch.Tensor:
        logits = self.logits(batch["inputs"])
        if not self.training:
            return logits
        labels = batch["labels"]
        real = labels != IGNORE
        n_tokens = real.sum()
        # A sum, not a mean: only the trainer knows every micro-batch of the step, so
        # only it can divide by the step's tokens.
        nll_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                  ignore_index=IGNORE, reduction="sum")
        correct = ((logits.detach().argmax(-1) == labels) & real).sum()
        write_summary("token_accuracy", Mean(correct, n_tokens))
        with summary_scope("batch"):
            write_summary("tokens", n_tokens.float())
            write_summary("padding_fraction", 1.0 - real.float().mean())
        return {"nll": Mean(nll_sum, n_tokens)}

    def count_items(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The tokens the ``"nll"`` mean is over, for every micro-batch of a step before
        its first forward (the batch as the data yields it, on the CPU)."""
        return {"nll": (batch["labels"] != IGNORE).sum()}

    @torch.inference_mode()
    def generate(self, prompt: str, length: int, temperature: float = 0.7,
                 seed: int = 0) -> str:
        """Continue `prompt` by `length` characters sampled from eval-mode logits."""
        was_training = self.training
        self.eval()
        generator = torch.Generator().manual_seed(seed)
        ids = encode(prompt).tolist()
        try:
            for _ in range(length):
                context = torch.tensor([ids[-self.max_len:]], device=self.device)
                logits = self(  # eval mode: logits of every position; the last is next
                    {"inputs": context})[0, -1].float().cpu()
                probs = F.softmax(logits / temperature, dim=-1)
                ids.append(int(torch.multinomial(probs, 1, generator=generator)))
        finally:
            self.train(was_training)
        return decode(ids)


# ----------------------------------------------------------------------------- metrics


class TokenNLL:
    """Held-out negative log-likelihood per token, exactly: the sum over every real token
    of the evaluation divided by their number (not a mean of per-batch means).

    An `Evaluator`: it reads the labels of the batch and the eval-mode logits.
    """

    def reset(self) -> None:
        self._sum = torch.zeros((), dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.long)

    def process(self, batch: Batch, logits: torch.Tensor) -> None:
        labels = batch["labels"]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                              ignore_index=IGNORE, reduction="sum")
        self._sum = self._sum.to(nll.device) + nll.double()
        self._count = self._count.to(labels.device) + (labels != IGNORE).sum()

    def compute(self) -> dict[str, float]:
        if int(self._count) == 0:
            raise ValueError("TokenNLL.compute() before any token was processed")
        nll = float(self._sum) / int(self._count)
        return {"nll_per_char": nll, "bits_per_char": nll / math.log(2)}


def unigram_entropy(pieces: Sequence[torch.Tensor]) -> float:
    """Entropy (nats) of the target characters' own frequencies: what the best model that
    ignores context could reach on them."""
    counts = Counter()
    for piece in pieces:
        counts.update(piece[1:].tolist())
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values())


# ----------------------------------------------------------------------------- run


def is_matrix(name: str, parameter: nn.Parameter) -> bool:
    """The weights Muon updates: the 2-D matrices inside the transformer blocks. The
    embeddings, the output head, the norms and the biases stay with AdamW."""
    return parameter.ndim == 2 and name.startswith("blocks.")


def optimizers(kind: str, lr: float = 1e-2) -> Any:
    """``Trainer(optimizer=...)`` for `kind`: ``"adamw"``, one AdamW over everything, or
    ``"muon"``, a list of two that step together: Muon over the blocks' matrices and
    AdamW over the rest. Each factory of the list gets the model and picks its part."""
    if kind == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return [
        lambda model: torch.optim.Muon(
            [p for name, p in model.named_parameters() if is_matrix(name, p)],
            lr=lr, weight_decay=0.01, adjust_lr_fn="match_rms_adamw"),
        lambda model: torch.optim.AdamW(
            [p for name, p in model.named_parameters() if not is_matrix(name, p)],
            lr=lr, weight_decay=0.01),
    ]


def main(fast: bool = False, log_dir: str | None = None, progress: bool = True,
         accum: int = 4, steps: int | None = None, min_len: int = 2, max_len: int = 256,
         batch_size: int = 16, eval_every: int | None = None,
         model_class: type[CharTransformer] = CharTransformer, seed: int = 0,
         optimizer: str = "adamw") -> float:
    """Train, print held-out numbers, a sample and where the logs are; return the held-out
    negative log-likelihood per character (nats)."""
    train_texts, heldout_texts = stdlib_sources(
        train_chars=40_000 if fast else 400_000, heldout_chars=10_000 if fast else 40_000)
    train_pieces = cut_pieces(train_texts, min_len, max_len, seed=seed)
    heldout_pieces = cut_pieces(heldout_texts, min_len, max_len, seed=seed + 1)
    loader = make_loader(train_pieces, batch_size)
    heldout = make_loader(heldout_pieces, 32, grouped=False)
    steps = steps if steps is not None else (60 if fast else 600)

    torch.manual_seed(seed)  # the initial weights; Trainer(seed=...) seeds when fit starts
    model = model_class(max_len=max_len)
    trainer = Trainer(model, loader, max_steps=steps, grad_accum_steps=accum,
                      log_every=10, seed=seed, log_dir=log_dir, progress=progress,
                      eval_data=heldout, evaluators=[TokenNLL()],
                      eval_every=eval_every or max(steps // 6, 1),
                      clip_grad_norm=1.0, optimizer=optimizers(optimizer),
                      # One factory, called with each optimizer: each peaks at its own lr.
                      lr_scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(
                          opt, max_lr=[group["lr"] for group in opt.param_groups],
                          total_steps=steps, pct_start=0.1))
    trainer.fit()

    nll = trainer.last_eval["nll_per_char"]  # the evaluation at the end of fit
    tokens = sum(len(piece) - 1 for piece in heldout_pieces)
    print(f"held-out nll per character: {nll:.3f} nats ({nll / math.log(2):.3f} bits) "
          f"over {tokens} characters")
    print(f"baselines: uniform {math.log(VOCAB_SIZE):.3f}, "
          f"unigram entropy {unigram_entropy(heldout_pieces):.3f} nats")
    prompt = "def __init__(self"
    print("sample:\n" + model.generate(prompt, 80 if fast else 200))
    print(f"TensorBoard logs: {trainer.log_dir}")
    print(f"view them with:   tensorboard --logdir {trainer.log_dir}")
    return nll


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer steps, for tests")
    parser.add_argument("--log-dir", default=None, help="run directory (default: runs/<time>)")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                        help="AdamW alone, or Muon on the matrices and AdamW on the rest")
    args = parser.parse_args()
    # The model is tiny: its ops are too small to share across cores, and on a busy
    # machine a second thread waiting for a core makes each op many times slower.
    torch.set_num_threads(1)
    main(fast=args.fast, log_dir=args.log_dir, accum=args.accum, steps=args.steps,
         optimizer=args.optimizer)
