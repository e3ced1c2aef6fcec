"""`moekit serve` flag checks: each mistake is one line, before any loading."""

from __future__ import annotations

import pytest

from conftest import run_cli


@pytest.mark.parametrize("argv, match", [
    (["--port", "0"], "--port must be in 1..65535"),
    (["--max-seqs", "0"], "--max-seqs must be >= 1"),
    (["--kv-tokens", "0"], "--kv-tokens must be >= 1"),
    (["--prefill-interval", "0"], "--prefill-interval must be >= 1"),
    (["--device-memory", "1GB"], "--device-memory needs --offload"),
    (["--device", "tpu"], "tpu"),
    (["/no/such/model"], "no such directory"),
])
def test_bad_flags_are_one_line(capsys, argv, match):
    code, _, err = run_cli(capsys, "serve", *argv)
    assert code == 2 and match in err and "Traceback" not in err
