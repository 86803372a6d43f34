"""Recipe: a Hugging Face sequence classifier (docs/bring-your-model.md)."""

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from lossless_trainer import Trainer
from lossless_trainer.adapters import HuggingFace
from lossless_trainer.evaluation import Accuracy

# BertForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2) works
# the same way; this one is built from a config, on bytes, so nothing is downloaded.
config = BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64, num_labels=2)
model = HuggingFace(BertForSequenceClassification(config), predictions="logits")

# Is a line of Python's own sources a comment (label 1) or code (label 0)?
lines = [line.strip()[:63] for line in Path(os.__file__).read_bytes().splitlines()]
examples = [(torch.tensor(list(line)), int(line.startswith(b"#"))) for line in lines if line]


def collate(rows):
    ids = torch.nn.utils.rnn.pad_sequence([ids for ids, _ in rows], batch_first=True)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(),
            "labels": torch.tensor([label for _, label in rows])}


train = DataLoader(examples[:-200], batch_size=32, shuffle=True, collate_fn=collate)
heldout = DataLoader(examples[-200:], batch_size=100, collate_fn=collate)
trainer = Trainer(model, train, max_steps=40, log_every=10, eval_data=heldout,
                  eval_every=20, evaluators=[Accuracy(targets="labels")],
                  log_dir="runs/hf_sequence_classification",
                  optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
trainer.fit()
print(f"held-out accuracy {trainer.last_eval['accuracy']:.3f}")
