"""Building the native library: every source compiled side by side and linked into one library in
a fresh cache, and a compiler that fails leaves a reason and no file behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moekit import native

_CHECK = """
from moekit import native
lib = native.library()
print("loaded" if lib is not None else "none", native.unavailable_reason())
if lib is not None:
    print(lib.moekit_matvec_native_bf16() in (0, 1))
"""


def _run(tmp_path: Path, cxx: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CXX": cxx, "MOEKIT_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(native.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.slow
def test_fresh_build_links_every_source(tmp_path):
    if native.compiler() is None:
        pytest.skip("no C++ compiler")
    done = _run(tmp_path, native.compiler())
    assert done.returncode == 0 and done.stdout.split()[0] == "loaded", done.stderr[-2000:]
    assert done.stdout.split()[-1] == "True"
    files = sorted(p.name for p in (tmp_path / "cache" / "native").iterdir())
    assert len(files) == 1 and files[0].endswith(".so")  # no objects or temporaries left


def test_failing_compiler_leaves_a_reason_and_no_file(tmp_path):
    wrapper = tmp_path / "cxx"
    wrapper.write_text('#!/bin/sh\ncase "$*" in *--version*) echo fake 1.0; exit 0;; esac\n'
                       'echo "attention.cpp:1: error: broken on purpose" >&2\nexit 1\n')
    wrapper.chmod(0o755)
    done = _run(tmp_path, str(wrapper))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("none the CPU kernels could not be built") and "broken on purpose" in done.stdout
    assert list((tmp_path / "cache" / "native").iterdir()) == []
