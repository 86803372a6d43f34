"""Recipe: a Hugging Face causal LM, trained on its own loss (docs/bring-your-model.md)."""

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from lossless_trainer import Trainer
from lossless_trainer.adapters import HuggingFace

# Any causal LM: GPT2LMHeadModel.from_pretrained("gpt2") works the same way. This one is
# built from a config, on bytes (256 tokens), so nothing is downloaded.
config = GPT2Config(vocab_size=256, n_positions=128, n_embd=32, n_layer=2, n_head=2)
model = HuggingFace(GPT2LMHeadModel(config), predictions="logits")

# Lines of Python's own sources, as byte tokens: sequences of different lengths.
text = Path(os.__file__).read_bytes()[:20_000]
lines = [torch.tensor(list(line[:127] + b"\n")) for line in text.splitlines() if line.strip()]


def collate(rows):  # what a data collator gives: padded input_ids, attention_mask, labels
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


loader = DataLoader(lines, batch_size=16, shuffle=True, collate_fn=collate)
trainer = Trainer(model, loader, max_steps=30, grad_accum_steps=2, log_every=10,
                  log_dir="runs/hf_causal_lm",
                  optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
trainer.fit()

logits = model.predict(collate(lines[:2]))  # eval mode: the labels are not passed
print(f"loss {float(trainer.total_loss):.3f}, logits of shape {tuple(logits.shape)}")
