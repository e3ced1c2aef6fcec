"""Can a kernel read a missed expert straight from page-locked host memory, and how fast?

    PYTHONPATH=src python3 benchmarks/probes/probe_zero_copy.py --out $OUT      # H200, ~20 s (--sweep: tiles)
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/probes/probe_zero_copy.py --device cpu --out /tmp/z

The question behind the offload plan: if the slot kernel takes each slot's weights as an element
offset from one device base pointer, an offset can point into registered host memory (unified
addressing), and an offloaded decode step needs no host decision: cached experts are read from the
slab, missed ones over PCIe, inside one captured graph. This probe runs a matvec y = W x whose W is
either on the device or in registered host memory, addressed both ways through the same kernel
(`w_ptr + offset`), checks the result against torch, and reports GB/s next to the pinned
host-to-device copy rate. Shapes: a qwen3-30b-a3b expert's gate/up (1536 x 2048) and mixtral's
(28672 x 4096), bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common
import common  # noqa: E402

from moekit.offload.layout import pinned_empty  # noqa: E402


@triton.jit
def offset_matvec_kernel(x_ptr, base_ptr, offset_ptr, out_ptr, N, K: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n] = sum_k W[n, k] x[k], W's first element at base_ptr + offset (elements)."""
    nb = tl.program_id(0)
    w = base_ptr + tl.load(offset_ptr)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xk = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        wt = tl.load(w + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < K), other=0.0)
        acc += tl.sum(wt.to(tl.float32) * xk[None, :], axis=1)
    tl.store(out_ptr + rows, acc, mask=row_ok)


def matvec(x, base, offset, n, k, block_n=16, block_k=256, warps=4):
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    offset_matvec_kernel[(triton.cdiv(n, block_n),)](x, base, offset, out, n, K=k, BLOCK_N=block_n,
                                                      BLOCK_K=block_k, num_warps=warps)
    return out


# --sweep: (BLOCK_N, BLOCK_K, warps) of the in-place read, the first the default above: is the read
# of page-locked host memory (45 GB/s at the default, 55 for the copy engine) a tile's limit or the link's?
SWEEP = ((16, 256, 4), (8, 512, 4), (4, 1024, 4), (2, 2048, 4), (32, 128, 4), (32, 256, 8), (64, 128, 8),
         (16, 512, 8), (128, 64, 8), (8, 256, 2), (1, 4096, 4), (4, 512, 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sweep", action="store_true", help="tile configs of the host read (SWEEP), last shape only")
    args = p.parse_args()
    device = torch.device(args.device)
    shapes = {"qwen3 gate_up": (1536, 2048), "mixtral gate_up": (28672, 4096)}
    if device.type == "cpu":
        shapes = {"tiny": (40, 96)}
    reps = 20 if device.type == "cuda" else 1
    res: dict = {"meta": common.run_meta(args, device), "device": common.device_name(device),
                 "torch": torch.__version__, "triton": triton.__version__, "rows": {}}
    for name, (n, k) in shapes.items():
        host = pinned_empty((n, k), torch.bfloat16) if device.type == "cuda" else torch.empty(n, k, dtype=torch.bfloat16)
        host.copy_(torch.randn(n, k) * 0.02)
        dev = host.to(device)
        x = (torch.randn(k) * 0.1).to(device, torch.bfloat16)
        want = (dev.float() @ x.float())
        base = torch.empty(1, dtype=torch.bfloat16, device=device)  # any device tensor: the base pointer
        size = dev.element_size()
        off_dev = torch.tensor([(dev.data_ptr() - base.data_ptr()) // size], dtype=torch.int64, device=device)
        off_host = torch.tensor([(host.data_ptr() - base.data_ptr()) // size], dtype=torch.int64, device=device)
        row = {"shape": [n, k], "bytes": n * k * size}
        for where, off in (("device", off_dev), ("host", off_host)):
            got = matvec(x, base, off, n, k)
            if device.type == "cuda":
                torch.cuda.synchronize()
            err = float((got - want).abs().max() / want.abs().max())
            sec = common.median_s(lambda: matvec(x, base, off, n, k), device, reps, warmup=1)
            row[where] = {"us": sec * 1e6, "GBps": row["bytes"] / sec / 1e9, "rel_err": err}
        if device.type == "cuda":
            dst = torch.empty_like(dev)
            sec = common.median_s(lambda: dst.copy_(host, non_blocking=True), device, reps, warmup=1)
            row["copy_h2d"] = {"us": sec * 1e6, "GBps": row["bytes"] / sec / 1e9}
        if args.sweep and name == list(shapes)[-1]:
            row["sweep"] = []
            for bn, bk, warps in SWEEP:
                if bk > k:
                    continue
                err = float((matvec(x, base, off_host, n, k, bn, bk, warps) - want).abs().max() / want.abs().max())
                sec = common.median_s(lambda: matvec(x, base, off_host, n, k, bn, bk, warps), device, reps, warmup=1)
                row["sweep"].append({"block_n": bn, "block_k": bk, "warps": warps, "us": sec * 1e6,
                                     "GBps": row["bytes"] / sec / 1e9, "rel_err": err})
                print("  sweep", json.dumps(row["sweep"][-1]), flush=True)
        res["rows"][name] = row
        print(name, json.dumps(row), flush=True)
    common.write_json(res, args.out, "probe_zero_copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
