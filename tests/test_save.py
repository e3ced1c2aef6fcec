"""The atomic HF-layout writer: round trips through moekit and transformers, checksums, interrupted writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import moekit
from moekit.checkpoint import INDEX_FILE
from moekit.save import hf_config, hf_tensors, save_model, sha256_file, write_checkpoint

from conftest import rel_error, token_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("variant", ["mixtral", "mixtral_tied", "mixtral_sliding", "mixtral_linear",
                                     "mixtral_yarn"])
def test_round_trip_through_moekit(tiny, tmp_path, variant):
    model = moekit.load_model(tiny(variant).path)
    out = save_model(model, tmp_path / "saved", max_shard_bytes=30_000)
    again = moekit.load_model(out)
    assert again.config == model.config
    ids = token_ids(2, 10)
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:  # the recorded checksums are those of the files
        assert index["metadata"]["moekit_sha256"][shard] == sha256_file(out / shard)
    assert not list(tmp_path.glob(".saved.partial-*"))


@pytest.mark.parametrize("variant", ["mixtral", "mixtral_tied", "mixtral_sliding", "mixtral_yarn"])
def test_transformers_loads_a_moekit_checkpoint(tiny, tmp_path, variant):
    model = moekit.load_model(tiny(variant).path)
    out = save_model(model, tmp_path / "saved", max_shard_bytes=30_000)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = token_ids(2, 40)  # past the sliding window and yarn's original 32 positions
    with torch.no_grad():
        theirs = hf(ids).logits
    assert rel_error(theirs, _logits(model, ids)) <= 1e-4
    assert rel_error(theirs, tiny(variant).hf_logits(ids)) <= 1e-4


def test_save_in_bfloat16(mixtral_model, tmp_path):
    out = save_model(mixtral_model, tmp_path / "bf16", dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    shard = next(out.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    again = moekit.load_model(out)
    assert again.config.dtype == "bfloat16" and again.dtype == torch.float32
    ids = token_ids(1, 8)
    per_token = (_logits(again, ids) - _logits(mixtral_model, ids)).norm(dim=-1) / _logits(mixtral_model, ids).norm(dim=-1)
    assert per_token.median() < 2e-2


def test_generation_config_and_extra_files(mixtral_model, tmp_path):
    out = save_model(mixtral_model, tmp_path / "g", generation_config={"eos_token_id": 7, "do_sample": False},
                     extra_files={"notes.txt": "hello", "blob.bin": b"\x00\x01"})
    assert (out / "notes.txt").read_text() == "hello"
    assert (out / "blob.bin").read_bytes() == b"\x00\x01"
    assert moekit.load_model(out).generation_defaults["eos_token_ids"] == (7,)


def test_refuses_to_overwrite_unless_asked(mixtral_model, tmp_path):
    out = save_model(mixtral_model, tmp_path / "x")
    (out / "marker").write_text("old")
    with pytest.raises(moekit.MoekitError, match="already exists"):
        save_model(mixtral_model, out)
    assert (out / "marker").exists()
    save_model(mixtral_model, out, overwrite=True)
    assert not (out / "marker").exists() and (out / "config.json").exists()


def test_interrupted_write_leaves_nothing(mixtral_model, tmp_path):
    def tensors():
        for i, item in enumerate(hf_tensors(mixtral_model)):
            if i == 20:
                raise KeyboardInterrupt  # e.g. Ctrl-C halfway through
            yield item

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        # small shards: some were already flushed to the temporary directory
        write_checkpoint(tensors(), out, hf_config(mixtral_model.config), max_shard_bytes=10_000)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_checkpoint(mixtral_model, tmp_path):
    out = save_model(mixtral_model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def tensors():
        yield "a", torch.zeros(3)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(tensors(), out, {}, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_hf_tensors_cover_the_checkpoint(tiny, mixtral_model):
    """moekit writes exactly the tensor names (and shapes) that transformers saved."""
    from safetensors import safe_open as open_

    with open_(str(tiny("mixtral").path / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    ours = {k: tuple(v.shape) for k, v in hf_tensors(mixtral_model)}
    assert ours == saved


def test_hf_tensors_of_other_families(tiny):
    """The tensor iterator names every weight of every family the way transformers saved them."""
    from safetensors import safe_open as open_

    for variant in ("qwen2_moe", "qwen3_moe", "olmoe"):
        with open_(str(tiny(variant).path / "model.safetensors"), "pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        model = moekit.load_model(tiny(variant).path)
        assert {k: tuple(v.shape) for k, v in hf_tensors(model)} == saved


def test_fresh_config_is_mixtral_only(tiny):
    model = moekit.load_model(tiny("qwen3_moe").path)
    with pytest.raises(moekit.MoekitError, match="mixtral only"):
        hf_config(model.config)


def test_saved_checkpoint_has_ordinary_permissions(tmp_path):
    import os
    import stat

    from moekit.save import write_checkpoint

    umask = os.umask(0o022)
    try:
        out = write_checkpoint(iter([("a.weight", torch.ones(2, 2))]), tmp_path / "ckpt", {"model_type": "x"})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
