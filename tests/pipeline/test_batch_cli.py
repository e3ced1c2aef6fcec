"""`moekit batch`: JSONL prompts through the batch engine on the bundled model (CPU, float32) --
completions equal `moekit generate`'s greedy ones, a crashed run (whole lines and a torn one)
resumes to each id once, and bad input gets one line and leaves the output as it was."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from moekit.cli import main

PROMPTS = [{"id": "fib", "prompt": "def fibonacci(n):"}, {"text": "Once upon a time"},
           {"id": 7, "prompt": "The capital of France is"}]
NEW_TOKENS = 6
POLICY = {"batch": 2, "micro_batch": 1, "resident_share": 0.25}  # two chunks, two micro-batches, paged experts


def batch_args(inp, out, *extra):
    return ["batch", "--input", str(inp), "--output", str(out), "--max-new-tokens", str(NEW_TOKENS),
            "--device", "cpu", "--dtype", "float32", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(input file, output lines, stderr) of one whole run with a given policy."""
    d = tmp_path_factory.mktemp("batch")
    inp, out = d / "prompts.jsonl", d / "out.jsonl"
    inp.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (d / "policy.json").write_text(json.dumps(POLICY))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(batch_args(inp, out, "--policy", str(d / "policy.json"))) == 0
    return inp, out.read_text(encoding="utf-8").splitlines(), err.getvalue()


def test_completions_equal_moekit_generate_greedy(finished, capsys):
    _, lines, err = finished
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == ["fib", 2, 7]  # the id defaults to the line number
    for record, given in zip(records, PROMPTS):
        prompt = given.get("prompt", given.get("text"))
        assert main(["generate", prompt, "--json", "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu",
                     "--dtype", "float32", "--temperature", "0"]) == 0
        expected = json.loads(capsys.readouterr().out)
        assert record["prompt"] == prompt
        assert record["tokens"] == expected["token_ids"] and record["completion"] == expected["text"]
        assert record["new_tokens"] == len(record["tokens"]) and record["prompt_tokens"] == expected["prompt_tokens"]
    summary = err.strip().splitlines()[-1]
    assert "3 prompts (0 done before)" in summary and f"{3 * NEW_TOKENS} tokens" in summary and "tok/s" in summary


def test_rerun_after_a_crash_finishes_the_rest_once(finished, tmp_path, capsys, monkeypatch):
    import moekit.progress

    monkeypatch.setattr(moekit.progress, "EVERY_S", 0.0)  # a progress line at every decode step
    inp, lines, _ = finished
    out = tmp_path / "out.jsonl"
    torn = lines[1][: len(lines[1]) // 2]  # the second record cut mid-write
    out.write_text(lines[0] + "\n" + torn, encoding="utf-8")
    # the HRM plans the rest (for an H200's levels): a different batch, the same greedy tokens
    assert main(batch_args(inp, out, "--machine", "h200", "--device-memory", "16GiB")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "2 prompts (1 done before)" in err[-1] and "predicted by the HRM" in err[-1]
    steps = [line for line in err if line.startswith("moekit: batch: ") and " tok (" in line]
    assert len(steps) >= NEW_TOKENS and f"{2 * NEW_TOKENS}/{2 * NEW_TOKENS} tok (100%)" in steps[-1]
    assert all(" tok/s, " in line for line in steps)
    again = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in again] == [json.loads(x) for x in lines]  # each id once, torn line gone
    assert main(batch_args(inp, out)) == 0  # nothing left: nothing loaded, nothing written
    assert out.read_text(encoding="utf-8").splitlines() == again
    assert "already" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing input", "no such file"),
    ("bad json line", "line 2: not JSON"),
    ("no prompt", 'line 1: no "prompt"'),
    ("repeated id", "repeats line 1"),
    ("policy gpu attention", "not supported by the batch engine"),
    ("policy unknown field", "unknown fields experts"),
    ("policy nonsense", "not 'auto', a JSON object or a .json file"),
    ("not our output", "not a moekit batch record"),
])
def test_bad_input_one_line_output_untouched(tmp_path, capsys, case, message):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    before = json.dumps({"id": "old", "prompt": "x", "completion": "y"}) + "\n"
    extra = []
    if case == "missing input":
        inp = tmp_path / "absent.jsonl"
    elif case == "bad json line":
        inp.write_text(json.dumps(PROMPTS[0]) + "\n{\"prompt\": oops}\n")
    elif case == "no prompt":
        inp.write_text(json.dumps({"id": 1, "completion": "x"}) + "\n")
    elif case == "repeated id":
        inp.write_text(json.dumps({"id": 1, "prompt": "a"}) + "\n" + json.dumps({"id": 1, "prompt": "b"}) + "\n")
    elif case == "policy gpu attention":
        extra = ["--policy", json.dumps({**POLICY, "attention": "gpu"})]
    elif case == "policy unknown field":
        extra = ["--policy", json.dumps({**POLICY, "experts": 3})]
    elif case == "policy nonsense":
        extra = ["--policy", "fastest"]
    elif case == "not our output":
        before = "some notes\n"
    out.write_text(before, encoding="utf-8")
    assert main(batch_args(inp, out, *extra)) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moekit: error:") and message in err
    assert out.read_text(encoding="utf-8") == before
