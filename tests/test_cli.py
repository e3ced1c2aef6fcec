"""`moekit` command line: generate and inspect on a tiny model built here, and one-line errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

import moekit
from moekit.config import ModelConfig
from moekit.model import MoEModel
from moekit.save import save_model
from moekit.train import init_weights

from conftest import run_cli

CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "


def _tokenizer_files(path: Path) -> int:
    """Writes tokenizer.json / tokenizer_config.json into path; returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "import os\nprint('hi')\n"] * 50, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "chat_template": CHAT_TEMPLATE}))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    staging = root / "staging"
    staging.mkdir()
    vocab = _tokenizer_files(staging)
    cfg = ModelConfig(family="mixtral", vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, num_experts=4, top_k=2, expert_ffn=24,
                      moe_layers=(True, True), max_position_embeddings=256, eos_token_ids=(0,))
    model = init_weights(MoEModel(cfg), std=0.3, seed=0)
    extra = {f: (staging / f).read_text() for f in ("tokenizer.json", "tokenizer_config.json")}
    return save_model(model, root / "model", extra_files=extra)


def test_inspect_table_and_json(model_dir, capsys):
    code, out, _ = run_cli(capsys, "inspect", str(model_dir))
    assert code == 0
    assert "mixtral" in out and "bits per expert param" in out and "32.000" in out
    code, out, _ = run_cli(capsys, "inspect", str(model_dir), "--json")
    report = json.loads(out)
    model = moekit.load_model(model_dir)
    assert report["params_total"] == sum(p.numel() for p in model.parameters())
    assert report["params_experts"] == 2 * 4 * 3 * 32 * 24
    assert report["bytes_total"] == 4 * report["params_total"]
    assert report["bits_per_expert_param"] == 32.0


def test_generate_json_is_greedy_and_consistent(model_dir, capsys):
    args = ("generate", "def f(x):", "--model", str(model_dir), "--max-new-tokens", "12", "--json")
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    first = json.loads(out)
    assert {"text", "token_ids", "tok_s", "decode_tok_s", "time_to_first_token_s"} <= first.keys()
    assert 0 < first["new_tokens"] <= 12 and len(first["token_ids"]) == first["new_tokens"]
    assert first["text"] == moekit.load_tokenizer(model_dir).decode(first["token_ids"])
    _, out, _ = run_cli(capsys, *args)
    assert json.loads(out)["token_ids"] == first["token_ids"]  # greedy by default: deterministic
    # the same ids as the Python API
    tok = moekit.load_tokenizer(model_dir)
    ids = torch.tensor([tok.encode("def f(x):")])
    api = moekit.load_model(model_dir).generate(ids, max_new_tokens=12, temperature=0)[0].tolist()
    assert api[: len(first["token_ids"])] == first["token_ids"]


def test_generate_streams_prompt_then_text(model_dir, capsys):
    code, out, err = run_cli(capsys, "generate", "import os", "--model", str(model_dir), "--max-new-tokens", "6",
                         "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "3")
    assert code == 0 and out.startswith("import os")
    assert "tok/s" in err


def test_generate_reads_stdin(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("print("))
    code, out, _ = run_cli(capsys, "generate", "--model", str(model_dir), "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(out)["prompt"] == "print("


def test_generate_chat_template(model_dir, capsys):
    code, out, _ = run_cli(capsys, "generate", "hi", "--chat", "--model", str(model_dir), "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(out)["prompt"] == "hi"


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--dtype", "int3"], "unknown dtype 'int3'"),
    (["--compile", "--device", "cpu"], "--compile needs a CUDA device"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--max-new-tokens", "5000"], "exceeds the model's context"),
])
def test_generate_bad_flags_are_one_line_errors(model_dir, capsys, flags, message):
    code, out, err = run_cli(capsys, "generate", "x", "--model", str(model_dir), *flags)
    assert code == 2 and out == ""
    assert err.startswith("moekit: error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_gpu_is_a_clear_error(model_dir, capsys):
    code, _, err = run_cli(capsys, "generate", "x", "--model", str(model_dir), "--device", "cuda")
    assert code == 2 and "no CUDA device" in err and err.count("\n") == 1


def test_missing_model_dir_and_tokenizer(model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err and err.count("\n") == 1
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "generate", "x", "--model", str(bare))
    assert code == 2 and "tokenizer.json" in err and err.count("\n") == 1


def test_unsupported_architecture(model_dir, tmp_path, capsys):
    other = tmp_path / "llama"
    shutil.copytree(model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (other / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "inspect", str(other))
    assert code == 2 and "llama" in err and "mixtral" in err and "qwen3_moe" in err and err.count("\n") == 1


def test_no_command_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2 and "generate" in out and "inspect" in out


@pytest.mark.parametrize("env, expected", [("1", "bfloat16"), ("0", "float32")])
def test_cpu_default_dtype_follows_a_bf16_checkpoint(capsys, monkeypatch, env, expected):
    """Without --dtype the bundled (bf16) model runs in bf16 on the CPU where the native decode
    step takes it (8x float32's tok/s there), in float32 where it does not."""
    from moekit.native import library

    if library() is None:
        pytest.skip("no native library on this machine")
    monkeypatch.setenv("MOEKIT_CPU_DECODE", env)
    code, out, _ = run_cli(capsys, "generate", "def f(x):", "--device", "cpu", "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["dtype"] == expected


def test_cpu_default_dtype_keeps_a_float32_checkpoint(model_dir, capsys):
    code, out, _ = run_cli(capsys, "generate", "x", "--model", str(model_dir), "--device", "cpu",
                           "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["dtype"] == "float32"
