"""Compressed checkpoints: they load through the expert seam, generate, equal their dequantised
twin, report their size, refuse damage with one line, and an interrupted compress writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.experts import ResidentExperts
from moekit.inspect_model import inspect_checkpoint
from moekit.quant import compress as compress_mod
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig
from moekit.quant.formats import CompressedExperts

from conftest import rel_error, token_ids


@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory):
    """Returns {bits: compressed checkpoint path} of the tiny mixtral, GPTQ on random tokens."""
    root = tmp_path_factory.mktemp("compressed")
    calib = token_ids(8, 32, seed=7)
    out = {}
    for bits, group in (("ternary", None), ("3", 16)):
        path = root / f"mixtral-{bits}"
        compress(tiny("mixtral").path, path, QuantConfig(bits=bits, group_size=group, expert_batch=3), calib,
                 progress=False)
        out[bits] = path
    return out


def dequantised_twin(model):
    """Returns a model whose experts are the dense matrices the compressed ones stand for."""
    for layer in model.layers:
        src = layer.mlp.experts
        assert isinstance(src, CompressedExperts)
        dense = ResidentExperts(src.num_experts, src.hidden, src.ffn)
        gate_up, down = src.dequantize()
        dense.gate_up.data, dense.down.data = gate_up, down
        layer.mlp.experts = dense
    return model


@pytest.mark.parametrize("bits", ["ternary", "3"])
def test_compressed_model_equals_its_dequantised_twin(compressed, bits, tiny):
    path = compressed[bits]
    model = moekit.load_model(path)
    assert all(isinstance(l.mlp.experts, CompressedExperts) for l in model.layers)
    twin = dequantised_twin(moekit.load_model(path))
    ids = token_ids(2, 12)
    with torch.no_grad():
        assert rel_error(model(ids), twin(ids)) < 1e-5
        dense = moekit.load_model(tiny("mixtral").path)(ids)
        assert rel_error(model(ids), dense) < 0.9  # compressed, but still the same model
    assert torch.equal(model.generate(ids[:1], max_new_tokens=6), twin.generate(ids[:1], max_new_tokens=6))


def test_config_and_inspect_report_the_stored_form(compressed):
    cfg = json.loads((compressed["ternary"] / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "moekit" and q["format_version"] == 2 and q["form"] == "ternary_code"
    r3 = inspect_checkpoint(compressed["3"])
    assert r3.params_experts == 2 * 4 * 3 * 32 * 48
    assert 4.0 < r3.bits_per_expert_param < 6.0  # 3-bit codes, 10 per int32 word, + fp16 scale, uint8 zero per 16 columns
    rt = inspect_checkpoint(compressed["ternary"])
    assert rt.bits_per_expert_param < 16


def test_damaged_compressed_file_is_refused_in_one_line(compressed, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(compressed["ternary"], bad)
    shard = next(bad.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(moekit.CheckpointError, match="sha256"):
        moekit.load_model(bad)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    assert main(["eval", str(bad), "--data", str(text), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sha256" in err and str(shard) in err


@pytest.mark.parametrize("version,fix", [(99, "or upgrade moekit"), (1, "re-run moekit compress on the original")])
def test_other_format_versions_are_refused(compressed, tmp_path, version, fix):
    """Version 1 padded every ternary row to the longest row's chunks: its tensors cannot be read now."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(compressed["ternary"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = version
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(moekit.CheckpointError, match=f"format version {version};.*{fix}"):
        moekit.load_model(other)


def test_interrupted_compress_leaves_nothing(tiny, tmp_path, monkeypatch):
    real = compress_mod._tensors

    def interrupted(*args):
        for i, item in enumerate(real(*args)):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(compress_mod, "_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress(tiny("mixtral").path, tmp_path / "out", QuantConfig(bits="4", method="rtn"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_compress_then_eval_on_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "tiny-4bit"
    assert main(["compress", "--out", str(out), "--method", "rtn", "--bits", "4", "--group-size", "16",
                 "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # 4 bits + a float16 scale and a uint8 zero per group of 16 (the largest group dividing 112 and 384)
    assert 5.0 < report["bits_per_expert_param"] < 6.0 and report["failed_factorisations"] == 0
    text = tmp_path / "held.py"
    text.write_text("def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def push(self, x):\n"
                    "        self.items.append(x)\n" * 4)
    assert main(["eval", str(out), "--data", str(text), "--seqlen", "32", "--device", "cpu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens_scored"] > 20 and 1 < r["perplexity"] < 1000 and r["quantization"]["bits"] == "4"
    assert main(["compress", "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "--calib" in capsys.readouterr().err


def test_group_size_that_does_not_divide_the_rows_is_refused(tiny, tmp_path, compressed):
    # the tiny mixtral's rows are 32 (hidden) and 48 (expert ffn) wide: groups of 24 would be unequal
    with pytest.raises(moekit.MoekitError, match="must divide"):
        compress(tiny("mixtral").path, tmp_path / "out", QuantConfig(bits="4", group_size=24, method="rtn"),
                 progress=False)
    assert not (tmp_path / "out").exists()
    # a checkpoint claiming such groups (written elsewhere, or edited) is refused at load
    path = compressed["3"]
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 24
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(moekit.CheckpointError, match="must divide"):
        moekit.load_model(broken)
