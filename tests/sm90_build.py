"""Builds a Triton kernel for sm_90 (an H100/H200) without a GPU and reads its resource use: the
compile-only tests' shared step (tests/experts/test_compile_slot_kernels.py,
tests/quant/test_compile_slot_down.py). Those files run themselves as children without
TRITON_INTERPRET (conftest.build_without_interpreter), where conftest must not load: so this is a
plain module of the tests folder, not a fixture."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path


def resource_usage(kernel, args: dict[str, str], constexprs: dict, warps: int, aligned=None) -> str:
    """Returns cuobjdump's resource line of `kernel` built for sm_90 (raises where the compiler rejects
    it). args: {name: Triton type} of the non-constexpr arguments (strides default to i32);
    aligned(name, type): which of them a launch specializes as multiples of 16 (default: pointers and
    strides)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = aligned or (lambda name, kind: kind.startswith("*") or name.startswith("stride"))
    args = {name: "i32" for name in kernel.arg_names if name.startswith("stride")} | args
    signature = args | {name: "constexpr" for name in constexprs}
    assert set(signature) == set(kernel.arg_names), set(signature) ^ set(kernel.arg_names)
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in args.items()
             if aligned(name, kind)}
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(kernel.arg_names.index(name),): v for name, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(compiled.asm["cubin"])
        return subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout


def assert_no_spills(case, usage: str) -> None:
    """Fails unless the resource line shows no stack (no spilled registers); prints the registers."""
    stack = re.search(r"STACK:(\d+)", usage)
    assert stack and stack.group(1) == "0", f"{case}: spills or no resource line: {usage.strip()}"
    print(case, re.search(r"REG:\d+", usage).group(0))
