"""Pre-gates on the bundled model (trained by the project's own code, on the CPython stdlib):
distillation lowers the loss, predicts the next layer's experts better than the untrained
speculative start, and lifts the offload cache's hit rate over fetching on demand."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

import moekit
from moekit.offload import OffloadConfig, load_offloaded
from moekit.offload.pregate import load_pregates, save_pregates, train_pregates

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_tokens(tokenizer, names: tuple[str, ...], limit: int) -> torch.Tensor:
    text = "\n".join((STDLIB / n).read_text(encoding="utf-8") for n in names)
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False)[:limit])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = moekit.load_model()
    tokenizer = moekit.load_tokenizer()
    ids = stdlib_tokens(tokenizer, ("json/decoder.py", "textwrap.py", "shlex.py"), 4096)
    weights, report = train_pregates(model, ids, steps=120, seqlen=256)
    out = save_pregates(weights, model.config, tmp_path_factory.mktemp("pregate"), report)
    return model, tokenizer, weights, report, out


def test_distillation_lowers_the_loss_and_beats_speculative(trained):
    _, _, weights, report, _ = trained
    assert set(weights) == {0, 1, 2}
    for layer in report.layers.values():
        assert layer["loss_end"] < layer["loss_start"]
    assert report.mean("recall_pregate") > report.mean("recall_speculative") + 0.02
    assert report.mean("recall_pregate") > 0.6  # 'none' predicts nothing: recall 0


def test_saved_pregates_round_trip(trained):
    model, _, weights, _, out = trained
    loaded = load_pregates(out / "pregate.safetensors", model.config)
    assert all(torch.equal(loaded[i], weights[i]) for i in weights)


def test_pregate_prefetch_beats_on_demand(trained):
    model, tokenizer, _, _, out = trained
    ids = stdlib_tokens(tokenizer, ("string.py",), 24)[None]  # held-out text
    expected = model.generate(ids, max_new_tokens=24, temperature=0, eos_token_ids=())
    reports = {}
    for predictor in ("none", "pregate"):
        # float32 like the reference: 13.4 MB of non-expert weights, a few of 32 experts cached
        m = load_offloaded(dtype=torch.float32, offload=OffloadConfig(
            device_memory=2 * 10**7, context_tokens=48, predictor=predictor, pregate_path=str(out)))
        got = m.generate(ids, max_new_tokens=24, temperature=0, eos_token_ids=())
        assert torch.equal(got, expected)
        reports[predictor] = m.offload.report()
    assert reports["pregate"]["prefetch_recall"] > 0.6
    assert reports["pregate"]["hit_rate"] > reports["none"]["hit_rate"]
    assert reports["pregate"]["demand_fetches"] < reports["none"]["demand_fetches"]
