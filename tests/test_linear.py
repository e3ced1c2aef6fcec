"""moekit.linear's decode matvec (moekit.kernels.decode_linear) against F.linear, run under the
Triton interpreter on CPU tensors (on CUDA where there is one), Linear.forward's dispatch to it, and
its sm_90 build (no spills).

Shapes: M = rows of x, N = out_features, K = in_features."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

# (BLOCK_N, BLOCK_K, num_warps, SPLIT_K, STAGES) x (N, K): main loop + every kind of K tail, rows past N, split-K
CASES = [
    ((4, 256, 4, 1, 1), (37, 1000)),  # 3 x 256, then 128 + 64 + 32 unmasked, 8 masked; N % 4 = 1
    ((8, 64, 2, 1, 3), (16, 200)),  # 3 x 64 (pipelined on a GPU), 8 masked columns only
    ((1, 2048, 4, 1, 1), (3, 24)),  # K below one step: one step masked past K
    ((4, 128, 4, 1, 2), (12, 128)),  # K one step exactly, unmasked
    ((2, 64, 4, 4, 1), (19, 1088)),  # 4 splits of 272 = 4 x 64 + 16
    ((16, 128, 4, 2, 1), (5, 96)),  # 2 splits of 48: one masked step each
    ((2, 256, 4, 8, 1), (10, 2048)),  # a router's split: 8 chunks of one unmasked step
]


if __name__ != "__main__":  # the sm_90 build runs this file as a child, where conftest must not load
    from conftest import kernel_device  # marks these tests "kernels" (on CUDA in the GPU run)


def _case(n: int, k: int, rows: int, dtype: torch.dtype, bias: bool, device: str, seed: int = 0):
    """Returns x [M, K], weight [N, K] and bias [N] or None, random normal values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return x, w, b


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Returns x @ w^T + b in float64 (the inputs' values exactly)."""
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("config,shape", CASES, ids=[f"{c}-{s}" for c, s in CASES])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_float32_matches_f_linear(config, shape, rows, bias):
    from moekit.linear import decode_linear

    device = kernel_device()
    x, w, b = _case(*shape, rows, torch.float32, bias, device)
    y = decode_linear(x, w, b, config)
    assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config,shape", [CASES[0], CASES[4]], ids=["tail", "split4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_linear_half_rounds_once(config, shape, dtype):
    """bf16 / fp16: float32 sums rounded once, so as close to the float64 product as F.linear's
    float32 result rounded to the dtype (the bias included); bf16 under the interpreter within an ulp."""
    from moekit.linear import decode_linear

    device = kernel_device()
    x, w, b = _case(*shape, 3, dtype, True, device, seed=1)
    exact = _reference(x.cpu(), w.cpu(), b.cpu())
    y = decode_linear(x, w, b, config)
    assert y.dtype == dtype
    err = (y.cpu().double() - exact).abs()
    if device == "cpu" and dtype == torch.bfloat16:  # the interpreter's bf16 cast truncates: within one ulp
        assert (err <= 2 ** -7 * exact.abs() + 1e-6).all(), err.max().item()
        return
    once = F.linear(x.float().cpu(), w.float().cpu(), b.float().cpu()).to(dtype).double()
    assert err.max().item() <= 1.01 * (once - exact).abs().max().item() + 1e-6, err.max().item()


@pytest.mark.parametrize("config,shape", [CASES[0], CASES[2], CASES[4], CASES[6]],
                         ids=["tail", "one-step", "split4", "split8"])
@pytest.mark.parametrize("rows", [1, 4, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_int8_weights_match_their_dequantized_product(config, shape, rows, bias):
    """int8 codes with a float32 scale per row (moekit.linear.Int8Linear): the kernel's product equals
    F.linear over scale * codes, the scale applied after each row's (or each split's) sum."""
    from moekit.linear import decode_linear, quantize_int8_rows

    device = kernel_device()
    x, w, b = _case(*shape, rows, torch.float32, bias, device, seed=3)
    codes, scale = quantize_int8_rows(w)
    y = decode_linear(x, codes, b, config, scale=scale)
    assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, codes.float() * scale[:, None], b), rtol=1e-5, atol=1e-5)


def test_decode_linear_int8_needs_its_scale():
    from moekit.errors import MoekitError
    from moekit.linear import decode_linear, quantize_int8_rows

    x, w, _ = _case(8, 64, 1, torch.float32, False, "cpu")
    codes, scale = quantize_int8_rows(w)
    for weight, sc in ((codes, None), (w, scale), (codes, scale[:4]), (codes, scale.double())):
        with pytest.raises(MoekitError, match="one dtype"):
            decode_linear(x, weight, None, (4, 64, 4, 1, 1), scale=sc)
    x9, _, _ = _case(8, 64, 9, torch.float32, False, "cpu")
    with pytest.raises(MoekitError, match="1..8 rows"):
        decode_linear(x9, codes, None, (4, 64, 4, 1, 1), scale=scale)


@pytest.mark.parametrize("shape", [(5120, 2048), (151936, 2048), (2048, 4096), (100, 32), (37, 1000), (8, 24),
                                   (64, 2880)])
def test_int8_decode_config_is_one_the_kernel_takes(shape):
    from moekit.linear import check_decode_config, int8_decode_config

    config = int8_decode_config(*shape)
    check_decode_config(config, shape[1])
    assert config[3] == 1 or shape[0] < 256


def test_decode_linear_strided_rows():
    """x rows with a stride past K (a view of a wider buffer) and an output of the right rows."""
    from moekit.linear import decode_linear

    device = kernel_device()
    wide, w, b = _case(24, 160, 2, torch.float32, True, device)
    x = wide[:, :96]
    y = decode_linear(x, w[:, :96].contiguous(), b, (4, 32, 4, 1, 1))
    torch.testing.assert_close(y, F.linear(x, w[:, :96], b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config,k,match", [
    ((3, 256, 4, 1, 1), 256, "powers of two"),
    ((4, 4096, 4, 1, 1), 256, "BLOCK_K in 16..2048"),
    ((4, 256, 4, 1), 256, "BLOCK_N, BLOCK_K"),
    ((4, 256, 4, 1, 5), 256, "STAGES 1..4"),
    ((4, 256, 4, 4, 1), 200, "multiple of 64"),
])
def test_decode_linear_bad_config(config, k, match):
    from moekit.errors import MoekitError
    from moekit.linear import decode_linear

    x, w, _ = _case(8, k, 1, torch.float32, False, "cpu")
    with pytest.raises(MoekitError, match=match):
        decode_linear(x, w, None, config)


def test_decode_linear_bad_inputs():
    from moekit.errors import MoekitError
    from moekit.linear import decode_linear

    x, w, _ = _case(8, 64, 5, torch.float32, False, "cpu")
    with pytest.raises(MoekitError, match="1..4 rows"):
        decode_linear(x, w, None, (4, 64, 4, 1, 1))
    with pytest.raises(MoekitError, match="one dtype"):
        decode_linear(x[:1], w.half(), None, (4, 64, 4, 1, 1))


@pytest.fixture
def tabled(monkeypatch):
    """Returns the list of (N, K) the decode matvec ran at, with DECODE_TUNED listing (24, 64) only and
    CPU tensors counted as the tuned GPU (the interpreter runs the kernel)."""
    from moekit import linear

    kernel_device()
    calls = []
    real = linear.decode_linear

    def spy(x, weight, bias, config):
        calls.append(tuple(weight.shape))
        return real(x, weight, bias, config)

    monkeypatch.setattr(linear, "DECODE_TUNED", {(24, 64): (4, 32, 4, 2, 1)})
    monkeypatch.setattr(linear, "_decode_device_ok", lambda x: True)
    monkeypatch.setattr(linear, "decode_linear", spy)
    return calls


def test_linear_dispatches_tabled_shapes_only(tabled):
    from moekit.linear import Linear

    device = kernel_device()  # CUDA tensors where there is a GPU (Triton takes no CPU tensor there)
    torch.manual_seed(0)
    layer = Linear(64, 24, bias=True).to(device, torch.bfloat16)
    other = Linear(64, 16, bias=False).to(device, torch.bfloat16)
    with torch.no_grad():
        for rows in (1, 4):
            x = torch.randn(rows, 1, 64, dtype=torch.bfloat16).to(device)  # [B, T, K]
            y = layer(x)
            assert y.shape == (rows, 1, 24)
            exact = _reference(x.view(rows, 64), layer.weight, layer.bias)
            assert (y.view(rows, 24).double() - exact).abs().max() < 0.05
        assert tabled == [(24, 64), (24, 64)]
        other(torch.randn(1, 64, dtype=torch.bfloat16).to(device))  # not in the table
        layer(torch.randn(5, 64, dtype=torch.bfloat16).to(device))  # more rows than the kernel takes
        layer.float()(torch.randn(1, 64).to(device))  # float32 is not a dtype it runs
    assert tabled == [(24, 64), (24, 64)]


@pytest.mark.parametrize("variant", ["olmoe_clip", "gpt_oss"])
def test_model_with_every_projection_tabled(tiny, monkeypatch, variant):
    """A bf16 model of 3 tokens (rows 3) with every Linear shape in DECODE_TUNED: the kernel runs each
    projection (qkv, o, router, biases; the lm_head) and the logits stay those of the untabled path
    (measured 1.4-1.6% apart: bf16 rounding, truncated under the interpreter, through every layer)."""
    import moekit
    from moekit import linear

    device = kernel_device()  # CUDA where there is a GPU: Triton takes no CPU tensor there
    model = moekit.load_model(tiny(variant).path, device=device, dtype=torch.bfloat16)
    ids = torch.tensor([[5, 17, 42]], device=device)
    with torch.inference_mode():
        expected = model(ids).float()
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, linear.Linear)}
    calls = []
    real = linear.decode_linear

    def spy(x, weight, bias, config):
        calls.append(tuple(weight.shape))
        return real(x, weight, bias, config)

    monkeypatch.setattr(linear, "DECODE_TUNED", {shape: (4, 32, 4, 1, 1) for shape in shapes})
    monkeypatch.setattr(linear, "_decode_device_ok", lambda x: True)
    monkeypatch.setattr(linear, "decode_linear", spy)
    with torch.inference_mode():
        logits = model(ids).float()
    assert set(calls) == shapes
    assert ((logits - expected).norm() / expected.norm()).item() < 0.03


def test_linear_reference_switch_takes_f_linear(tabled, monkeypatch):
    from moekit.linear import Linear

    layer = Linear(64, 24, bias=False).to(torch.bfloat16)
    monkeypatch.setenv("MOEKIT_FUSED", "0")
    with torch.no_grad():
        layer(torch.randn(1, 64, dtype=torch.bfloat16))
    assert tabled == []


def test_linear_autograd_takes_f_linear(tabled):
    from moekit.linear import Linear

    device = kernel_device()
    layer = Linear(64, 24, bias=True).to(device, torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad is not None and tabled == []
    with torch.inference_mode():
        layer(x.detach())
    assert tabled == [(24, 64)]


def test_decode_tuned_entries_are_configs_the_kernel_takes():
    """Every DECODE_TUNED and INT8_DECODE_TUNED entry (pasted from probe_decode_linear's winners) is a valid
    config at its K, and int8 weights take their own entry before bf16's."""
    from moekit.linear import DECODE_TUNED, INT8_DECODE_TUNED, check_decode_config, int8_decode_config

    for (n, k), config in [*DECODE_TUNED.items(), *INT8_DECODE_TUNED.items()]:
        assert n > 0 and k > 0, (n, k)
        check_decode_config(config, k)
    for shape, config in INT8_DECODE_TUNED.items():
        assert int8_decode_config(*shape) == config
    assert int8_decode_config(6144, 2048) == DECODE_TUNED[(6144, 2048)]  # no int8 entry: bf16's


def test_linear_default_table_off_gpu_is_f_linear():
    """Off a tuned GPU nothing is dispatched, whatever the table says."""
    from moekit import linear

    x = torch.randn(1, 64)
    w = torch.randn(24, 64)
    assert linear.decode_config(x.bfloat16(), w.bfloat16(), None) is None


# ---- the sm_90 build: no register spills ----------------------------------------------------

# (N, K, M, BLOCK_N, BLOCK_K, num_warps, SPLIT_K, STAGES, HAS_BIAS): the probe's widest tiles at its shapes
BUILDS = {
    "olmoe_qkv": (6144, 2048, 1, 8, 1024, 4, 1, 1, False),
    "gpt_oss_qkv_bias": (5120, 2880, 1, 8, 1024, 4, 1, 1, True),  # 2880 = 2 x 1024 + 512 + 256 + 64
    "rows4": (2048, 2816, 4, 8, 1024, 4, 1, 1, False),
    "o_pipelined": (2048, 4096, 1, 4, 1024, 4, 1, 3, False),  # cp.async, 2 steps ahead
    "dense_down_pipelined": (2048, 10944, 1, 8, 1024, 4, 1, 2, False),
    "router_split": (64, 2048, 1, 1, 256, 4, 8, 1, False),  # chunks of one step
    "gpt_oss_router_split": (32, 2880, 1, 1, 512, 4, 4, 1, True),  # chunks of 720 = 512 + 128 + 64 + 16
    "gpt_oss_router_masked": (32, 2880, 1, 1, 1024, 4, 4, 1, True),  # 720 in one step masked past it
}
# int8 weights with a scale per row (Int8Linear, --quantize-dense int8): (N, K, M, HAS_BIAS), each built with
# the config int8_decode_config picks at runtime (DECODE_TUNED's where the shape is tabled)
INT8_BUILDS = {
    "int8_qwen3_lm_head": (151936, 2048, 1, False),  # untabled: the default tile
    "int8_rows4_bias": (5120, 2048, 4, True),  # Qwen3's qkv, tabled
    "int8_untabled_split": (96, 2048, 1, False),  # N < 256: split-K
    "int8_rows8": (2048, 4096, 8, False),  # Qwen3's o (tabled: BLOCK_K 2048, 8 warps) in a serve step of 8
    "int8_rows8_split": (100, 2048, 8, True),  # split-K at 8 rows, bias
}


def _int8_build(n: int, k: int, m: int, bias: bool) -> tuple:
    from moekit.linear import int8_decode_config

    bn, bk, warps, split_k, stages = int8_decode_config(n, k)
    return (n, k, m, bn, bk, warps, split_k, stages, bias, True)


def build(name: str) -> int:
    """Compiles build `name` (and the reduce kernel when split) for sm_90; returns its stack bytes."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moekit.kernels.decode_linear import decode_linear_kernel, decode_linear_reduce_kernel

    spec = BUILDS[name] + (False,) if name in BUILDS else _int8_build(*INT8_BUILDS[name])
    _n, k, m, bn, bk, warps, split_k, stages, bias, int8 = spec  # N is a runtime argument
    launches = [(decode_linear_kernel, {"M": m, "M_PAD": triton.next_power_of_2(m), "CHUNK": k // split_k,
                                        "SPLIT_K": split_k, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": stages,
                                        "HAS_BIAS": bias, "HAS_SCALE": int8}, warps)]
    pointer = {"part_ptr": "*fp32", "scale_ptr": "*fp32", "w_ptr": "*i8" if int8 else "*bf16"}
    if split_k > 1:
        launches.append((decode_linear_reduce_kernel, {"M": m, "SPLIT_K": split_k, "BLOCK": 1024, "HAS_BIAS": bias}, 4))
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    stack = 0
    for kernel, constexprs, w in launches:
        signature = {a: pointer.get(a, "*bf16") if a.endswith("_ptr") else "i32"
                     for a in kernel.arg_names if a not in constexprs}
        signature |= {a: "constexpr" for a in constexprs}
        # as a launch specializes: tensors 16-byte aligned, N and the strides multiples of 16
        aligned = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in signature if a not in constexprs}
        source = ASTSource(fn=kernel, signature=signature, attrs=aligned,
                           constexprs={(kernel.arg_names.index(a),): v for a, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": w})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage, sass = (subprocess.run([str(cuobjdump), flag, cubin.name], capture_output=True, text=True,
                                          check=True).stdout for flag in ("--dump-resource-usage", "-sass"))
        print(name, kernel.__name__, usage.strip().splitlines()[-1].strip(), "shared bytes", compiled.metadata.shared)
        stack += int(re.search(r"STACK:(\d+)", usage).group(1))
        if kernel is decode_linear_kernel and bn * bk // (32 * w) * (1 if int8 else 2) >= 16:  # 16+ bytes a thread
            # the weights stream 16 bytes a load (unaligned row pointers would compile to 2-byte loads)
            assert re.search(r"LDG(STS)?\.E(\.BYPASS)?\.128", sass), f"{name}: no 16-byte loads"
        if kernel is decode_linear_kernel and stages > 1:  # the BLOCK_K loop pipelined through cp.async
            assert "LDGSTS" in sass, f"{name}: STAGES {stages} but no cp.async"
    return stack


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILDS) + list(INT8_BUILDS))
def test_decode_linear_compiles_for_sm90_without_spills(name):
    from conftest import build_without_interpreter  # here: this file runs as the child too

    build_without_interpreter([__file__, name])


if __name__ == "__main__":
    assert build(sys.argv[1]) == 0, f"{sys.argv[1]}: the sm_90 build spills registers (stack bytes > 0)"
