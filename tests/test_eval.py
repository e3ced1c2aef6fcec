"""moekit eval: perplexity of the bundled model on a text file, table and JSON output."""

from __future__ import annotations

import json
import math

from moekit.cli import main
from moekit.eval import evaluate


def test_eval_scores_every_token_once(tmp_path):
    text = tmp_path / "a.py"
    text.write_text("import os\n\n\ndef main():\n    return os.getcwd()\n" * 6)
    r = evaluate(None, text, seqlen=16)
    assert r.quantization is None and r.tokens_scored > 30
    assert math.isfinite(r.perplexity) and 1 < r.perplexity < 200  # trained on the stdlib: code is easy


def test_eval_cli_table_and_errors(tmp_path, capsys):
    text = tmp_path / "docs.jsonl"
    text.write_text(json.dumps({"text": "for i in range(10):\n    print(i)\n"}) + "\n")
    assert main(["eval", "--data", str(text), "--seqlen", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "tokens scored" in out
    assert main(["eval", "--data", str(tmp_path / "missing.txt"), "--device", "cpu"]) == 2
    assert "not found" in capsys.readouterr().err


def test_eval_with_int8_projections(tmp_path, capsys):
    """`moekit eval --quantize-dense int8` scores the model with Int8Linear projections and says so; on the
    bundled model (its qkv and o in int8) the perplexity moves by under 1%."""
    text = tmp_path / "code.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 4)
    scores = {}
    for dense in ("bf16", "int8"):
        assert main(["eval", "--data", str(text), "--seqlen", "64", "--device", "cpu", "--json",
                     "--quantize-dense", dense]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        scores[dense] = report["perplexity"]
        assert (report["quantization"] or {}).get("dense") == (None if dense == "bf16" else "int8")
    assert scores["int8"] != scores["bf16"] and abs(scores["int8"] / scores["bf16"] - 1) < 0.01
    assert main(["eval", "--data", str(text), "--device", "cpu", "--quantize-dense", "int8"]) == 0
    assert "int8 projections" in capsys.readouterr().out
