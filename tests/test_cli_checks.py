"""Every command checks its flags and paths before any work, and a refusal is one line on stderr,
exit code 2, nothing written and nothing deleted: --overwrite of inputs or foreign folders,
compressed checkpoints given to commands that need dense weights, bad values, missing folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import moekit
from moekit.cli import main

from conftest import run_cli


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a copy of the bundled model (model/), its 4-bit RTN compression (compressed/),
    a text file (text.txt) and a foreign folder that moekit did not write (home/)."""
    root = tmp_path_factory.mktemp("checks")
    shutil.copytree(moekit.default_model_path(), root / "model")
    assert main(["compress", str(root / "model"), "--method", "rtn", "--bits", "4", "--device", "cpu",
                 "--out", str(root / "compressed")]) == 0
    (root / "text.txt").write_text("def f(x):\n    return x * 2\n\nimport os\nprint(os.getcwd())\n" * 50)
    (root / "home").mkdir()
    (root / "home" / "notes.txt").write_text("keep me")
    return root


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else -1 for p in sorted(root.rglob("*"))}


@pytest.fixture
def no_work(monkeypatch):
    """Makes every expensive step (tokenising calibration text, loading, calibrating) fail the test."""
    def expensive(*_args, **_kwargs):
        raise AssertionError("expensive work ran before the flags were checked")

    import moekit.calibrate
    import moekit.eval
    import moekit.load
    import moekit.prune.usage

    for module, name in [(moekit.calibrate, "calibration_tokens"), (moekit.load, "load_model"),
                         (moekit.prune.usage, "usage_from_calibration"), (moekit.eval, "load_model")]:
        monkeypatch.setattr(module, name, expensive)


def _refused(capsys, work: Path, argv: list[str], message: str) -> str:
    before = _snapshot(work)
    code, out, err = run_cli(capsys, *[a.format(w=work) for a in argv])
    assert code == 2 and out == "", err
    assert err.startswith("moekit: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert _snapshot(work) == before  # nothing written, nothing deleted
    return err


COMMON = ["--samples", "4", "--seqlen", "32", "--device", "cpu"]

OVERWRITE = [  # item 4: --overwrite never replaces an input, a folder holding one, or a foreign folder
    (["compress", "{w}/model", "--method", "rtn", "--out", "{w}/model", "--overwrite"], "is the input"),
    (["compress", "{w}/model", "--method", "rtn", "--out", "{w}", "--overwrite"], "holds the input"),
    (["compress", "{w}/model", "--method", "rtn", "--out", "{w}/model/sub"], "is inside the input"),
    (["compress", "{w}/model", "--calib", "{w}/text.txt", "--out", "{w}", "--overwrite"], "holds the input"),
    (["compress", "{w}/model", "--method", "rtn", "--out", "{w}/home", "--overwrite"], "not a folder moekit wrote"),
    (["compress", "{w}/model", "--method", "rtn", "--out", "{w}/compressed"], "already exists"),
    (["compress", "{w}/model", "--method", "rtn", "--out", "{w}/text.txt", "--overwrite"], "is not a folder"),
    (["prune", "{w}/model", "--calib", "{w}/text.txt", "--keep", "0.5", "--out", "{w}/home", "--overwrite", *COMMON],
     "not a folder moekit wrote"),
    (["prune", "{w}/model", "--calib", "{w}/text.txt", "--keep", "0.5", "--out", "{w}/model", "--overwrite", *COMMON],
     "is the input"),
    (["finetune", "{w}/model", "--data", "{w}/text.txt", "--top-k", "1", "--out", "{w}/home", "--overwrite", *COMMON],
     "not a folder moekit wrote"),
    (["pregate", "{w}/model", "--data", "{w}/text.txt", "--out", "{w}/home", "--overwrite"], "not a folder moekit wrote"),
    (["pregate", "{w}/model", "--data", "{w}/text.txt", "--out", "{w}/model", "--overwrite"], "is the input"),
]

COMPRESSED = [  # item 5: commands that need dense weights name the compressed checkpoint and the fix
    ["usage", "{w}/compressed", "--calib", "{w}/text.txt", *COMMON],
    ["prune", "{w}/compressed", "--calib", "{w}/text.txt", "--keep", "0.5", "--out", "{w}/p", *COMMON],
    ["finetune", "{w}/compressed", "--data", "{w}/text.txt", "--top-k", "1", "--out", "{w}/f", *COMMON],
    ["compress", "{w}/compressed", "--method", "rtn", "--out", "{w}/c"],
]

CHEAP_FIRST = [  # items 6 and 9: refused before any tokenising, loading or calibrating
    (["prune", "{w}/model", "--calib", "{w}/text.txt", "--keep", "1.5", "--out", "{w}/p", *COMMON], "--keep must be in (0, 1]"),
    (["prune", "{w}/model", "--calib", "{w}/text.txt", "--keep", "0", "--out", "{w}/p", *COMMON], "--keep must be in (0, 1]"),
    (["prune", "{w}/model", "--calib", "{w}/text.txt", "--keep", "0.5", "--out", "{w}/compressed", *COMMON],
     "already exists"),
    (["prune", "{w}/model", "--calib", "{w}/missing.txt", "--keep", "0.5", "--out", "{w}/p", *COMMON], "not found"),
    (["usage", "{w}/model", "--calib", "{w}/text.txt", "--samples", "4", "--seqlen", "4096"], "exceeds the model's context"),
    (["usage", "{w}/model", "--calib", "{w}/text.txt", "--batch", "0"], "--batch must be >= 1"),
    (["finetune", "{w}/model", "--data", "{w}/text.txt", "--top-k", "1", "--out", "{w}/compressed", *COMMON],
     "already exists"),
    (["finetune", "{w}/model", "--data", "{w}/text.txt", "--top-k", "9", "--out", "{w}/f", *COMMON],
     "--top-k 9 is not possible"),
    (["finetune", "{w}/model", "--data", "{w}/text.txt", "--top-k", "1", "--steps", "0", "--out", "{w}/f", *COMMON],
     "--steps must be > 0"),
    (["finetune", "{w}/model", "--data", "{w}/text.txt", "--top-k", "1", "--train-top-k", "1", "--entropy-weight", "0",
      "--out", "{w}/f", *COMMON], "gives the router no gradient"),
    (["finetune", "{w}/model", "--data", "{w}/text.txt", "--top-k", "1", "--samples", "1", "--out", "{w}/f"],
     "--samples must be >= 2"),
    (["compress", "{w}/model", "--calib", "{w}/text.txt", "--seqlen", "0", "--out", "{w}/c"], "--seqlen must be >= 2"),
    (["compress", "{w}/model", "--out", "{w}/c"], "GPTQ needs calibration text"),
    (["pregate", "{w}/model", "--data", "{w}/text.txt", "--out", "{w}/compressed"], "already exists"),
    (["pregate", "{w}/model", "--data", "{w}/text.txt", "--out", "{w}/g", "--seqlen", "2048"], "exceeds the model's context"),
    (["eval", "{w}/model", "--data", "{w}/text.txt", "--seqlen", "4096"], "--seqlen 4096 must be in 1..512"),
    (["eval", "{w}/model", "--data", "{w}/text.txt", "--max-tokens", "-5"], "--max-tokens must be >= 2"),
    (["eval", "{w}/nope", "--data", "{w}/text.txt"], "no such directory"),
    (["generate", "x", "--top-k", "-3"], "--top-k must be >= 0"),
    (["generate", "x", "--model", "{w}/nope"], "no such directory"),
    (["generate", "x", "--threads", "0"], "--threads must be >= 1"),
    (["inspect", "{w}/model", "--model", "{w}/compressed"], "the model is given twice"),
    (["usage", "{w}/text.txt", "--calib", "{w}/text.txt"], "not a directory"),
]


@pytest.mark.parametrize("argv, message", OVERWRITE)
def test_overwrite_never_destroys_inputs_or_foreign_folders(work, capsys, no_work, argv, message):
    _refused(capsys, work, argv, message)
    assert (work / "home" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("argv", COMPRESSED)
def test_commands_that_need_dense_weights_refuse_a_compressed_checkpoint(work, capsys, no_work, argv):
    err = _refused(capsys, work, argv, "is a compressed checkpoint")
    assert "quantization_config" in err and "original" in err and "incomplete" not in err


@pytest.mark.parametrize("argv, message", CHEAP_FIRST)
def test_flags_are_checked_before_any_work(work, capsys, no_work, argv, message):
    _refused(capsys, work, argv, message)


def test_missing_model_dir_is_named_not_its_tokenizer(work, capsys):
    err = _refused(capsys, work, ["generate", "x", "--model", "{w}/nope"], "no such directory")
    assert "tokenizer.json" not in err


def test_prompt_beyond_the_context_is_refused_before_offload_planning(work, capsys, monkeypatch):
    import moekit.offload.cli as offload_cli

    monkeypatch.setattr(offload_cli, "load_for_generate", lambda *a: pytest.fail("planned an offload"))
    prompt = "def f(x):\n    return x\n" * 300
    err = _refused(capsys, work, ["generate", prompt, "--model", "{w}/model", "--device", "cpu", "--offload",
                                  "--device-memory", "10MB"], "exceeds the model's context of 512")
    assert "GB" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_compile_on_the_cpu_says_it_needs_cuda(work, capsys):
    err = _refused(capsys, work, ["generate", "x", "--compile"], "--compile needs a CUDA device")
    assert "--no-cuda-graph" not in err


def test_finetune_refuses_an_existing_out_before_training(work, capsys, no_work, tmp_path):
    out = tmp_path / "tuned"
    out.mkdir()
    (out / "file").write_text("x")
    code, _, err = run_cli(capsys, "finetune", str(work / "model"), "--data", str(work / "text.txt"), "--top-k", "1",
                           "--out", str(out), *COMMON)
    assert code == 2 and "already exists" in err and (out / "file").read_text() == "x"


def test_overwrite_replaces_a_moekit_output(work, capsys, tmp_path):
    out = tmp_path / "c"
    out.mkdir()  # an empty folder holds nothing to lose: it is written without --overwrite
    args = ["compress", str(work / "model"), "--method", "rtn", "--bits", "4", "--device", "cpu", "--out", str(out)]
    assert run_cli(capsys, *args)[0] == 0
    (out / "stale.txt").write_text("from before")
    assert run_cli(capsys, *args, "--overwrite")[0] == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_model_flag_is_an_alias_of_the_positional_dir(work, capsys):
    code, out, _ = run_cli(capsys, "inspect", "--model", str(work / "compressed"), "--json")
    assert code == 0 and json.loads(out)["path"] == str(work / "compressed")
    code, out, _ = run_cli(capsys, "eval", "--model", str(work / "model"), "--data", str(work / "text.txt"),
                           "--max-tokens", "40", "--seqlen", "16", "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["model"] == str(work / "model")


def test_eval_reports_the_seqlen_it_scored_with(work, capsys):
    code, out, _ = run_cli(capsys, "eval", str(work / "model"), "--data", str(work / "text.txt"), "--max-tokens", "40",
                           "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["seqlen"] == 512  # the default: the whole 512-token context


def test_generate_stats_without_offload(capsys):
    code, out, err = run_cli(capsys, "generate", "def f(x):", "--device", "cpu", "--max-new-tokens", "4", "--stats")
    assert code == 0 and out.startswith("def f(x):")
    assert "time to first token" in err and "decode" in err and "CPU threads" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"moekit {moekit.__version__}"
