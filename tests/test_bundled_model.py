"""The bundled tiny MoE (examples/tiny-moe): the default model of every command."""

from __future__ import annotations

import json

import torch

import moekit
from moekit.train import evaluate_perplexity

# Written for this test (not from the standard library): ordinary Python the model should find
# predictable. A model that learned nothing scores near its vocabulary size (4096).
SNIPPET = '''import os
import sys


def read_lines(path):
    """Return the lines of the file at path, without their newlines."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value
'''


def test_bundled_model_is_small_and_complete():
    path = moekit.default_model_path()
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= files.keys()
    assert sum(files.values()) <= 16 * 2**20
    assert json.loads((path / "config.json").read_text())["model_type"] == "mixtral"


def test_bundled_model_predicts_python():
    model, tok = moekit.load_model(), moekit.load_tokenizer()
    ids = torch.tensor(tok.encode(SNIPPET))
    ppl, scored = evaluate_perplexity(model, ids, seqlen=256)
    assert scored == ids.numel() - 1
    assert ppl < 20, ppl  # measured 7.7 on the CPU in float32; an untrained model gives ~4000


def test_bundled_model_writes_python():
    model, tok = moekit.load_model(), moekit.load_tokenizer()
    ids = torch.tensor([tok.encode("def fibonacci(n):\n")])
    text = tok.decode(model.generate(ids, max_new_tokens=48, temperature=0)[0].tolist())
    assert any(word in text for word in ("return", "if ", "def ", "self", "=")), text
