"""`moekit batch`: JSONL prompts through the batch engine on the bundled model (CPU, float32) --
completions equal `moekit generate`'s greedy ones, a crashed run (whole lines and a torn one)
resumes to each id once, sampling is seeded, a line's max_tokens and stop strings cut its
completion (with its finish reason), and bad input gets one line and leaves the output as it was."""

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


def run_batch(tmp_path, lines, name, *extra):
    """Returns the records of a batch run over `lines` (JSON objects) with the test policy."""
    inp, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(batch_args(inp, out, "--policy", json.dumps(POLICY), *extra)) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_sampling_flags_are_seeded(finished, tmp_path, capsys):
    """One sampler for the batch: the same --seed gives the same records, another seed others;
    --top-k 1 leaves one token to draw, so it writes the greedy records."""
    greedy = [json.loads(line) for line in finished[1]]
    sampled = ["--temperature", "1.0", "--top-p", "0.95"]
    a = run_batch(tmp_path, PROMPTS, "a", *sampled, "--seed", "0")
    assert "sampled at temperature 1, top-k 0, top-p 0.95, seed 0" in capsys.readouterr().err
    b = run_batch(tmp_path, PROMPTS, "b", *sampled, "--seed", "0")
    c = run_batch(tmp_path, PROMPTS, "c", *sampled, "--seed", "1")
    assert a == b and [r["tokens"] for r in a] != [r["tokens"] for r in c]
    assert [r["tokens"] for r in a] != [r["tokens"] for r in greedy]
    assert run_batch(tmp_path, PROMPTS, "top1", "--temperature", "1.0", "--top-k", "1", "--seed", "3") == greedy


def test_per_line_max_tokens_and_stop_strings_cut_the_completion(finished, tmp_path):
    """The engine generates --max-new-tokens for every line; a line's max_tokens keeps that many
    tokens (finish "length"), its stop strings keep the text before the earliest one (finish
    "stop", the tokens up to the one that completes it), a stop string never met changes nothing."""
    from moekit.load import default_model_path
    from moekit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    full = [json.loads(line) for line in finished[1]]
    texts = [r["completion"] for r in full]
    stops = [texts[0].strip()[:4], [texts[2].strip()[-3:], texts[2].strip()[:2]]]
    lines = [{**PROMPTS[0], "stop": stops[0]}, {**PROMPTS[1], "max_tokens": 2},
             {**PROMPTS[2], "stop": stops[1], "max_tokens": NEW_TOKENS},
             {"id": "never", "prompt": PROMPTS[0]["prompt"], "stop": ["no such text \u2603", ""]}]
    got = run_batch(tmp_path, lines, "limits")
    assert [r["finish"] for r in got] == ["stop", "length", "stop", "length"]
    assert got[1]["tokens"] == full[1]["tokens"][:2] and got[1]["new_tokens"] == 2
    assert got[1]["completion"] == tokenizer.decode(full[1]["tokens"][:2])
    for record, whole, stop in ((got[0], full[0], [stops[0]]), (got[2], full[2], stops[1])):
        cut = min(at for at in (whole["completion"].find(s) for s in stop) if at >= 0)
        assert record["completion"] == whole["completion"][:cut]
        k = record["new_tokens"]  # the fewest tokens whose text holds a stop string
        assert record["tokens"] == whole["tokens"][:k] and 0 < k < NEW_TOKENS
        assert any(s in tokenizer.decode(record["tokens"]) for s in stop)
        assert not any(s in tokenizer.decode(record["tokens"][:-1]) for s in stop)
    assert {k: got[3][k] for k in ("tokens", "completion", "finish")} == \
        {k: full[0][k] for k in ("tokens", "completion", "finish")}


def test_finish_takes_the_first_limit_reached():
    """eos before max_tokens: "eos"; an eos just past max_tokens is never reached: "length"; a
    stop string in the text left after both: "stop"."""
    from types import SimpleNamespace

    from moekit.pipeline.batch_cli import Request, finish

    letters = SimpleNamespace(decode=lambda ids: "".join(chr(ord("a") + t) for t in ids))
    new, eos = [1, 2, 3, 0, 4], {0}  # "bcd", eos, "e"
    assert finish(new, Request("x", "p", 1), eos, letters) == ([1, 2, 3], "bcd", "eos")
    assert finish(new, Request("x", "p", 1, max_tokens=3), eos, letters) == ([1, 2, 3], "bcd", "length")
    assert finish(new, Request("x", "p", 1, max_tokens=2), eos, letters) == ([1, 2], "bc", "length")
    assert finish(new, Request("x", "p", 1, stop=("zz", "cd")), eos, letters) == ([1, 2, 3], "b", "stop")
    assert finish(new, Request("x", "p", 1, max_tokens=2, stop=("cd",)), eos, letters) == ([1, 2], "bc", "length")


@pytest.mark.parametrize("case, message", [
    ("missing input", "no such file"),
    ("max_tokens over the engine's", 'line 2: "max_tokens" 7 is over --max-new-tokens 6'),
    ("max_tokens not an integer", 'line 1: "max_tokens" must be a positive integer, got \'5\''),
    ("stop not strings", 'line 1: "stop" must be a string or a list of strings, got [1]'),
    ("per-line temperature", 'line 1: per-line "temperature" is not supported'),
    ("top-p flag", "--top-p must be in (0, 1]"),
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
    elif case == "max_tokens over the engine's":
        inp.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps({**PROMPTS[1], "max_tokens": NEW_TOKENS + 1}) + "\n")
    elif case == "max_tokens not an integer":
        inp.write_text(json.dumps({**PROMPTS[0], "max_tokens": "5"}) + "\n")
    elif case == "stop not strings":
        inp.write_text(json.dumps({**PROMPTS[0], "stop": [1]}) + "\n")
    elif case == "per-line temperature":
        inp.write_text(json.dumps({**PROMPTS[0], "temperature": 0.7}) + "\n")
    elif case == "top-p flag":
        extra = ["--top-p", "0"]
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


def test_attention_rate_is_kept_after_a_gpu_run_planned_for_this_machine(monkeypatch, capsys):
    """keep_attention_rate: after a GPU run with no --machine, the rate the pipeline's CPU attention
    read at goes into this machine's profile and the run says so; a CPU run, a --machine plan, a
    run with no kernel calls or one that read too little to judge by keep nothing."""
    from argparse import Namespace

    from moekit.pipeline import batch_cli
    from moekit.pipeline import machine as mm

    kept = []
    monkeypatch.setattr(mm, "record_pipeline_attention", lambda rate: (kept.append(rate), "/tmp/m.json")[1])
    measured = {"seconds": 2.0, "kv_bytes": 8e10}
    batch_cli.keep_attention_rate(Namespace(machine=None), measured, "cpu")
    batch_cli.keep_attention_rate(Namespace(machine="h200"), measured, "cuda")
    batch_cli.keep_attention_rate(Namespace(machine=None), {"seconds": 0.0, "kv_bytes": 0}, "cuda")
    batch_cli.keep_attention_rate(Namespace(machine=None), {"seconds": 0.01, "kv_bytes": 2**20}, "cuda")  # too little
    assert kept == [] and capsys.readouterr().err == ""
    batch_cli.keep_attention_rate(Namespace(machine=None), measured, "cuda")
    assert kept == [4e10]
    assert "40.0 GB/s inside the pipeline; kept in /tmp/m.json" in capsys.readouterr().err
