"""The lazy checkpoint reader: sharded checkpoints, and one clear line for every kind of damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.checkpoint import INDEX_FILE, Checkpoint, parse_dtype, read_json
from moekit.save import save_model

from conftest import build_hf_model, median_token_error, rel_error, token_ids

EXPERT = "model.layers.1.block_sparse_moe.experts.2.w3.weight"


def _error(path: Path, kind=moekit.CheckpointError) -> str:
    """Returns the message of the error that loading `path` raises (asserting its type)."""
    with pytest.raises(kind) as info:
        moekit.load_model(path)
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    return message


@pytest.fixture(scope="module")
def sharded(tiny, tmp_path_factory) -> Path:
    """The tiny mixtral saved by transformers in several shards (with an index file)."""
    path = tmp_path_factory.mktemp("sharded") / "mixtral"
    tiny("mixtral").hf.save_pretrained(path, max_shard_size="20KB")
    return path


@pytest.fixture
def single(tiny, tmp_path) -> Path:
    """A private copy of the single-file tiny mixtral, free to damage."""
    return Path(shutil.copytree(tiny("mixtral").path, tmp_path / "mixtral"))


@pytest.fixture
def sharded_copy(sharded, tmp_path) -> Path:
    return Path(shutil.copytree(sharded, tmp_path / "sharded"))


def _shard_of(path: Path, tensor: str) -> Path:
    return path / json.loads((path / INDEX_FILE).read_text())["weight_map"][tensor]


def _rewrite(file: Path, edit) -> None:
    """Rewrites a safetensors file with edit(dict of tensors) applied."""
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


# ---- good checkpoints ----------------------------------------------------------------------

def test_sharded_checkpoint_loads_and_matches(tiny, sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    model = moekit.load_model(sharded)
    ids = token_ids(2, 10)
    with torch.no_grad():
        logits = model(ids)
    assert rel_error(logits, tiny("mixtral").hf_logits(ids)) <= 1e-4


def test_reader_is_lazy_and_reports_shapes(sharded):
    ckpt = Checkpoint(sharded)
    assert ckpt._handles == {}  # nothing opened until a tensor is asked for
    assert ckpt.has(EXPERT) and not ckpt.has("model.nope")
    assert ckpt.shape(EXPERT) == (48, 32)
    assert ckpt.file_of(EXPERT).name.endswith(".safetensors")
    assert len(ckpt._handles) == 1
    total = sum(torch.Size(ckpt.shape(n)).numel() * 4 for n in ckpt.names())
    assert ckpt.total_bytes() == total


def test_fused_expert_layout_loads(tiny, tmp_path):
    """Stacked [E, 2I, D] / [E, D, I] expert tensors (transformers' in-memory layout) load too."""
    ref = tiny("qwen3_moe")
    path = tmp_path / "fused"
    path.mkdir()
    tensors = {k: v.contiguous() for k, v in ref.hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(ref.path / "config.json", path / "config.json")
    ids = token_ids(1, 10)
    with torch.no_grad():
        logits = moekit.load_model(path)(ids)
    assert rel_error(logits, ref.hf_logits(ids)) <= 1e-4


def test_read_casts_and_checks_shape(tiny):
    ckpt = Checkpoint(tiny("mixtral").path)
    t = ckpt.read("model.norm.weight", shape=(32,), dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16 and t.shape == (32,)


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("float16", torch.float16),
                                          ("torch.float32", torch.float32), (None, torch.float32)])
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) == dtype


def test_parse_dtype_unknown():
    with pytest.raises(moekit.CheckpointError, match="unknown dtype 'int3'"):
        parse_dtype("int3")


# ---- damaged checkpoints: one line naming the file and the tensor --------------------------

def test_not_a_directory(tmp_path):
    message = _error(tmp_path / "nowhere")
    assert "nowhere" in message and "not a directory" in message


def test_missing_config(single):
    (single / "config.json").unlink()
    message = _error(single)
    assert str(single / "config.json") in message and "not found" in message


def test_no_safetensors(single):
    (single / "model.safetensors").unlink()
    assert "no *.safetensors" in _error(single)


def test_missing_shard_file(sharded_copy):
    shard = _shard_of(sharded_copy, EXPERT)
    shard.unlink()
    message = _error(sharded_copy)
    assert str(shard) in message and "shard missing" in message
    # names a tensor that the shard held
    index = json.loads((sharded_copy / INDEX_FILE).read_text())["weight_map"]
    held = [k for k, v in index.items() if v == shard.name]
    assert any(f"'{name}'" in message for name in held)


def test_missing_tensor_single_file(single):
    _rewrite(single / "model.safetensors", lambda t: t.pop(EXPERT))
    message = _error(single)
    assert f"'{EXPERT}'" in message and "not found" in message and str(single) in message


def test_missing_tensor_in_a_shard_named_by_the_index(sharded_copy):
    """The index promises the tensor, the shard it names does not hold it."""
    shard = _shard_of(sharded_copy, EXPERT)
    _rewrite(shard, lambda t: t.pop(EXPERT))
    message = _error(sharded_copy)
    assert str(shard) in message and f"'{EXPERT}'" in message


def test_missing_tensor_absent_from_index(sharded_copy):
    index_path = sharded_copy / INDEX_FILE
    index = json.loads(index_path.read_text())
    del index["weight_map"][EXPERT]
    index_path.write_text(json.dumps(index))
    message = _error(sharded_copy)
    assert f"'{EXPERT}'" in message and INDEX_FILE in message


def test_wrong_shape(single):
    _rewrite(single / "model.safetensors", lambda t: t.update({EXPERT: torch.zeros(40, 32)}))
    message = _error(single)
    assert str(single / "model.safetensors") in message
    assert f"'{EXPERT}'" in message and "[40, 32]" in message and "[48, 32]" in message


def test_unknown_architecture_lists_supported_families(single):
    config = json.loads((single / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (single / "config.json").write_text(json.dumps(config))
    message = _error(single, moekit.UnsupportedModelError)
    assert "'llama'" in message and str(single / "config.json") in message
    for family in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe"):
        assert family in message


def test_architectures_name_the_family_when_model_type_is_absent(single):
    config = json.loads((single / "config.json").read_text())
    del config["model_type"]
    (single / "config.json").write_text(json.dumps(config))
    _, family, cfg = moekit.read_config(single)
    assert family.name == "mixtral" and cfg.num_experts == 4


@pytest.mark.parametrize("keep_bytes", [50, -100])
def test_truncated_safetensors(single, keep_bytes):
    file = single / "model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(keep_bytes if keep_bytes > 0 else size + keep_bytes)
    message = _error(single)
    assert str(file) in message and "damaged" in message


def test_truncated_shard_names_the_shard(sharded_copy):
    shard = _shard_of(sharded_copy, EXPERT)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 64)
    message = _error(sharded_copy)
    assert str(shard) in message


@pytest.mark.parametrize("file", ["config.json", INDEX_FILE])
def test_corrupted_json(sharded_copy, file):
    path = sharded_copy / file
    path.write_text(path.read_text()[:-40] + "}}}")
    message = _error(sharded_copy)
    assert str(path) in message and "not valid JSON" in message


def test_json_that_is_not_an_object(single):
    (single / "config.json").write_text("[1, 2]")
    assert "expected a JSON object" in _error(single)


def test_index_without_weight_map(sharded_copy):
    (sharded_copy / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    assert "has no 'weight_map'" in _error(sharded_copy)


def test_flipped_header_byte_in_a_moekit_checkpoint_names_the_shard(mixtral_model, tmp_path):
    out = save_model(mixtral_model, tmp_path / "saved", max_shard_bytes=20_000)
    shard = out / json.loads((out / INDEX_FILE).read_text())["weight_map"][EXPERT]
    data = bytearray(shard.read_bytes())
    assert data[8:10] == b'{"'
    data[9] = ord("#")  # the header is no longer JSON
    shard.write_bytes(bytes(data))
    assert str(shard) in _error(out)


def test_flipped_byte_in_a_moekit_checkpoint_fails_sha256(mixtral_model, tmp_path):
    out = save_model(mixtral_model, tmp_path / "saved", max_shard_bytes=20_000)
    index = json.loads((out / INDEX_FILE).read_text())
    shard = out / index["weight_map"][EXPERT]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01  # inside the tensor data: the safetensors header stays valid
    shard.write_bytes(bytes(data))
    message = _error(out)
    assert str(shard) in message and "sha256" in message


def test_read_json_reports_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(moekit.CheckpointError, match="x.json: not valid JSON"):
        read_json(bad)


def test_checkpoint_saved_in_bfloat16_loads_in_float32(tmp_path, tiny):
    model = build_hf_model("mixtral").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert Checkpoint(tmp_path / "bf16").read("model.norm.weight").dtype == torch.bfloat16
    loaded = moekit.load_model(tmp_path / "bf16")
    assert loaded.dtype == torch.float32
    assert loaded.config.dtype == "bfloat16"
    ids = token_ids(1, 8)
    with torch.no_grad():
        expected = tiny("mixtral").hf_logits(ids)
        # only bf16 rounding of the weights
        assert median_token_error(loaded(ids), expected) < 2e-2


def test_read_rows_reads_one_expert_and_refuses_bad_ranges(tiny):
    from moekit.checkpoint import Checkpoint

    ckpt = Checkpoint(tiny("mixtral").path)
    name = "model.embed_tokens.weight"
    full = ckpt.read(name)
    assert torch.equal(ckpt.read_rows(name, 3, 5), full[3:5])
    assert ckpt.dtype(name) == full.dtype
    with pytest.raises(moekit.CheckpointError, match=r"has 100 rows, asked for 99\.\.100") as err:
        ckpt.read_rows(name, 99, 101)
    assert name in str(err.value) and "\n" not in str(err.value)
