"""Times batch-1 decode projections through cuBLAS (F.linear) and moekit's decode matvec
(moekit.linear.decode_linear) at the HBM bound, and names the winner of each shape for DECODE_TUNED.

    PYTHONPATH=src python3 benchmarks/probes/probe_decode_linear.py --out $OUT     # H200, < 90 s

Shapes (N = out_features, K = in_features, the weight [N, K] bf16): the attention, shared-expert,
dense-layer and router projections of OLMoE-1B-7B, DeepSeek-V2-Lite, gpt-oss-20b (with biases) and
Qwen3-30B-A3B (tests/conftest and benchmarks/family_shapes list their widths). Each timing is a
CUDA graph of C calls (as a decode step runs its layers: launch gaps count) over C distinct weight
copies of >= 256 MB together (C <= 512), so the weights stream from HBM, not from the 50 MB L2;
time per call = median replay / C. cuBLAS first, then the kernel's configs (BLOCK_N, BLOCK_K,
num_warps, SPLIT_K, STAGES), in rounds: every shape's first config, then every shape's second, ...,
until --time-budget-s (each new config of a K is a Triton build, ~0.5 s). Each row prints us,
TB/s of weights read, the share of the HBM copy rate measured in the run (the ceiling), and
max |error| against F.linear. The JSON's "winners" (and the printed DECODE_TUNED literal) hold
the shapes where the best config beat cuBLAS by more than --margin: paste them into
moekit/linear.py's DECODE_TUNED. Off CUDA it says so and exits 0.

--int8: the kernel rows read int8 codes with a float32 scale per row (Int8Linear, --quantize-dense int8;
1..8 rows), cuBLAS keeps the bf16 weights: each row's bytes are its own, so TB/s compares how near each
gets to the HBM bound and `us` what a decode step would spend; its error is against the dequantized
product. int8_decode_config's pick is timed first.

    PYTHONPATH=src python3 benchmarks/probes/probe_decode_linear.py --out $OUT --int8 --shapes qwen3 --rows 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common
import common

# (name, N, K, bias); shapes two models share are timed once, under both names
SHAPES = (
    ("olmoe qkv", 6144, 2048, False),  # 16 heads x 128, q k v
    ("olmoe o / dsv2-lite o", 2048, 2048, False),
    ("olmoe router / dsv2-lite router", 64, 2048, False),
    ("olmoe lm_head", 50304, 2048, False),
    ("dsv2-lite q_proj", 3072, 2048, False),  # 16 heads x (128 + 64)
    ("dsv2-lite kv_a", 576, 2048, False),  # latent 512 + rope 64
    ("dsv2-lite shared gate_up", 5632, 2048, False),  # 2 shared experts x 1408, gate and up
    ("dsv2-lite shared down", 2048, 2816, False),
    ("dsv2-lite dense gate_up", 21888, 2048, False),  # layer 0, ffn 10944
    ("dsv2-lite dense down", 2048, 10944, False),
    ("gpt-oss qkv", 5120, 2880, True),  # 64 x 64 q, 8 x 64 k and v
    ("gpt-oss o", 2880, 4096, True),
    ("gpt-oss router", 32, 2880, True),
    ("qwen3-30b-a3b qkv", 5120, 2048, False),  # 32 x 128 q, 4 x 128 k and v
    ("qwen3-30b-a3b o", 2048, 4096, False),
    ("qwen3-30b-a3b router", 128, 2048, False),
)
# (BLOCK_N, BLOCK_K, num_warps, SPLIT_K, STAGES), likeliest first: the per-slot expert kernels' winners
WIDE = ((4, 1024, 4, 1, 1), (8, 1024, 4, 1, 1), (4, 1024, 4, 1, 3), (2, 1024, 4, 1, 1), (8, 512, 4, 1, 1),
        (8, 1024, 4, 1, 2), (16, 512, 8, 1, 1), (4, 2048, 8, 1, 1), (2, 1024, 4, 1, 3), (1, 1024, 4, 1, 1),
        (16, 1024, 8, 1, 1))
# few rows over many columns (routers, kv_a): split K, so more programs than SMs stream it
NARROW = ((1, 1024, 4, 1, 1), (1, 512, 4, 4, 1), (1, 1024, 4, 4, 1), (2, 512, 4, 2, 1), (1, 256, 4, 8, 1),
          (4, 1024, 4, 1, 1), (1, 512, 4, 2, 1), (2, 256, 4, 4, 1), (1, 128, 4, 16, 1), (1, 1024, 4, 1, 2))
# long K over few row blocks (o_proj, down): split K too
LONG = ((4, 1024, 4, 2, 1), (8, 1024, 4, 4, 1))
GRAPH_BYTES = 256 << 20  # weight copies a graph streams: 5x the H200's L2
MAX_CALLS = 512


def configs(n: int, k: int) -> list[tuple[int, int, int, int, int]]:
    """Returns the configs to try at weight [n, k], likeliest first (those the kernel takes at k)."""
    from moekit.errors import MoekitError
    from moekit.linear import check_decode_config

    out = []
    for config in (NARROW if n <= 1024 else WIDE + LONG if k >= 4096 else WIDE):
        try:
            check_decode_config(config, k)
        except MoekitError:
            continue
        out.append(config)
    return out


class Shape:
    """The weight copies, bias copies and input of one shape, and its results so far."""

    def __init__(self, name: str, n: int, k: int, bias: bool, rows: int, device: torch.device, int8: bool = False):
        from moekit.linear import int8_decode_config, quantize_int8_rows

        self.name, self.n, self.k, self.rows = name, n, k, rows
        self.bytes = n * k * 2 + (n * 2 if bias else 0)  # bf16 weight (+ bias) one call reads
        self.calls = max(2, min(MAX_CALLS, -(-GRAPH_BYTES // self.bytes)))
        self.weights = torch.randn(self.calls, n, k, device=device, dtype=torch.bfloat16) / k ** 0.5  # [C, N, K]
        self.biases = torch.randn(self.calls, n, device=device, dtype=torch.bfloat16) if bias else None  # [C, N]
        self.x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)  # [M, K]
        self.codes = self.scales = None
        self.int8_bytes = n * k + 4 * n + (n * 2 if bias else 0)  # int8 codes + float32 scales (+ bias)
        if int8:  # [C, N, K] int8 and [C, N] float32, one copy at a time
            pairs = [quantize_int8_rows(w) for w in self.weights]
            self.codes = torch.stack([c for c, _ in pairs])
            self.scales = torch.stack([s for _, s in pairs])
        w0 = self.weights[0].float() if not int8 else self.codes[0].float() * self.scales[0][:, None]
        self.expected = F.linear(self.x.float(), w0, None if self.biases is None else self.biases[0].float())  # [M, N]
        self.todo = configs(n, k)
        if int8:  # the runtime's pick first
            pick = int8_decode_config(n, k)
            self.todo = [pick] + [c for c in self.todo if c != pick]
        self.results: list[dict] = []

    def bias(self, i: int) -> torch.Tensor | None:
        return None if self.biases is None else self.biases[i]


def time_row(shape: Shape, config: tuple[int, int, int, int, int] | None, ceiling_bytes_per_s: float) -> dict:
    """Returns shape's row for cuBLAS (config None) or the decode matvec at config."""
    from moekit.linear import decode_linear

    nbytes = shape.bytes
    if config is None:
        run = lambda i: F.linear(shape.x, shape.weights[i], shape.bias(i))
    elif shape.codes is not None:
        run = lambda i: decode_linear(shape.x, shape.codes[i], shape.bias(i), config, scale=shape.scales[i])
        nbytes = shape.int8_bytes
    else:
        run = lambda i: decode_linear(shape.x, shape.weights[i], shape.bias(i), config)
    with torch.inference_mode():
        error = float((run(0).float() - shape.expected).abs().max())
        us = common.graph_us_per_call([lambda i=i: run(i) for i in range(shape.calls)])
    rate = nbytes / (us * 1e-6)
    return {"name": shape.name, "n": shape.n, "k": shape.k, "rows": shape.rows, "bias": shape.biases is not None,
            "impl": "cublas" if config is None else "kernel int8" if shape.codes is not None else "kernel",
            "config": config, "us": us, "tb_per_s": rate / 1e12,
            "of_ceiling": rate / ceiling_bytes_per_s, "floor_us": 1e6 * nbytes / ceiling_bytes_per_s,
            "calls_per_graph": shape.calls, "max_abs_error": error}


def hbm_copy_bytes_per_s() -> float:
    """Returns the device-to-device copy rate of 1 GiB (read + write counted): the ceiling."""
    src = torch.empty(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * 2**30 / common.do_bench_s(lambda: dst.copy_(src), warmup=10, rep=50)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_output_args(p, "probe_decode_linear")
    p.add_argument("--rows", type=int, default=1, help="rows of x (tokens), 1..4, --int8 1..8 (default 1: batch-1 decode)")
    p.add_argument("--int8", action="store_true", help="the kernel reads int8 weights with row scales (Int8Linear)")
    p.add_argument("--time-budget-s", type=float, default=50.0,
                   help="seconds for the kernel configs after cuBLAS's rows (0: every config)")
    p.add_argument("--margin", type=float, default=0.03,
                   help="a winner must beat cuBLAS by this fraction of cuBLAS's time (default 0.03)")
    p.add_argument("--shapes", default="", help="comma-separated substrings of shape names to keep (default: all)")
    args = p.parse_args()
    most = 8 if args.int8 else 4
    if not 1 <= args.rows <= most:
        p.error(f"--rows {args.rows}: the decode matvec takes 1..{most} rows{' of int8 weights' if args.int8 else ''}")
    device = torch.device(args.device)
    if device.type != "cuda":
        print("probe_decode_linear: the decode matvec is timed against cuBLAS on CUDA only; nothing to do here")
        return 0
    run(args, device, hbm_copy_bytes_per_s())
    return 0


def run(args: argparse.Namespace, device: torch.device, ceiling: float) -> dict:
    """Returns the probe's results (also printed and written to args.out) at HBM rate `ceiling` (bytes/s)."""
    torch.manual_seed(0)
    print(f"HBM copy rate {ceiling / 1e12:.2f} TB/s (the ceiling; read + write counted)", flush=True)
    keep = [s for s in args.shapes.split(",") if s]
    shapes = [Shape(name, n, k, bias, args.rows, device, args.int8) for name, n, k, bias in SHAPES
              if not keep or any(s in name for s in keep)]
    res: dict = {"meta": common.run_meta(args, device), "hbm_copy_bytes_per_s": ceiling, "rows": []}
    for shape in shapes:
        row = time_row(shape, None, ceiling)
        shape.results.append(row)
        print(f"{shape.name} [{shape.n}, {shape.k}] cublas {row['us']:.2f} us {row['tb_per_s']:.2f} TB/s", flush=True)
    start = time.perf_counter()
    out_of_time = False
    while not out_of_time and any(s.todo for s in shapes):
        for shape in shapes:
            if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
                out_of_time = True
                break
            if shape.todo:
                row = time_row(shape, shape.todo.pop(0), ceiling)
                shape.results.append(row)
                print(f"{shape.name} {tuple(row['config'])} {row['us']:.2f} us {row['tb_per_s']:.2f} TB/s "
                      f"err {row['max_abs_error']:.1e}", flush=True)
    if out_of_time:
        print(f"time budget {args.time_budget_s:.0f} s spent: configs left untried at "
              + ", ".join(f"{s.name} ({len(s.todo)})" for s in shapes if s.todo))
    table, winners = [], {}
    for shape in shapes:
        cublas = shape.results[0]
        kernels = [r for r in shape.results[1:] if r["max_abs_error"] < 0.05]
        best = min(kernels, key=lambda r: r["us"]) if kernels else None
        wins = best is not None and best["us"] < (1 - args.margin) * cublas["us"]
        if wins:
            winners[f"{shape.n}x{shape.k}"] = list(best["config"])
        res["rows"].extend(shape.results)
        table.append([shape.name, f"[{shape.n}, {shape.k}]", f"{shape.bytes / 1e6:.1f}", f"{cublas['floor_us']:.2f}",
                      f"{cublas['us']:.2f}", f"{cublas['tb_per_s']:.2f}",
                      "" if best is None else f"{best['us']:.2f}", "" if best is None else f"{best['tb_per_s']:.2f}",
                      "" if best is None else str(tuple(best["config"])),
                      "" if best is None else f"{cublas['us'] / best['us']:.2f}x", "kernel" if wins else "cublas"])
    print(common.markdown_table(["shape", "[N, K]", "MB", "HBM floor us", "cuBLAS us", "cuBLAS TB/s", "kernel us",
                                 "kernel TB/s", "best config", "speedup", "winner"], table))
    res["winners"] = winners
    print(("int8 winners over bf16 cuBLAS (not DECODE_TUNED entries): " if args.int8 else "DECODE_TUNED = ") + "{" + ", ".join(f"({k.replace('x', ', ')}): {tuple(v)}" for k, v in winners.items()) + "}")
    print("wrote", common.write_json(res, args.out, "probe_decode_linear"))
    return res


if __name__ == "__main__":
    sys.exit(main())
