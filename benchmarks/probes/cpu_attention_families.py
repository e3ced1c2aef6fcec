"""CGOPipe's CPU attention kernel (moekit.native.attention) at each family's real attention shape,
in KV GB/s next to the host's read ceiling: is a family's decode attention bandwidth-bound on this
CPU, as the HRM assumes (machine.cpu_attention_bandwidth is measured on Mixtral's shape only)?

    PYTHONPATH=src python3 benchmarks/probes/cpu_attention_families.py --out $OUT            # H200 host, ~30 s
    PYTHONPATH=src nice python3 benchmarks/probes/cpu_attention_families.py --quick --out /tmp/caf  # 2-core VM

Shapes (bf16 pools, N sequences of `--context` cached positions, one decode query each):
  mixtral      GQA 32 q / 8 kv heads x 128
  gpt-oss      GQA 64 q / 8 kv heads x 64, sinks; window 128 (its sliding layers) and full
  deepseek-v2  MLA, 16 heads over one joint row [latent 512 | rope key 64] (moekit.pipeline.latent)
  deepseek-v3  MLA, 128 heads over the same row
An MLA item is one (sequence, all heads): N items only, each reading its row once for every head,
where a GQA step has N x Hkv items; the probe shows whether that still reaches the ceiling. Each
shape's output is checked against the kernel's PyTorch reference on two sequences first.

Each shape runs with each of --items (the kernel's work items, native.attention.ITEMS: by (sequence,
kv head), or by sequence, reading each position's whole row; the same bits either way, checked).
The default step, 1,024 sequences of 144 positions (Mixtral: 603 MB of KV), is past the H200 host's
300 MiB L3, as a pipeline step's KV is (13a0b14: ~19 GB a step); at 64 x 512 (134 MB) the earlier
default read mostly from L3.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from moekit import native
from moekit.native import attention as na
from moekit.native.experts import stream_read_bytes_per_s
from moekit.native.hugepages import advise_huge_pages
from moekit.pipeline.machine import _best

SHAPES = {  # name: (query heads, kv heads, row width, window, sinks)
    "mixtral": (32, 8, 128, None, False),
    "gpt-oss sliding": (64, 8, 64, 128, True),
    "gpt-oss full": (64, 8, 64, None, True),
    "deepseek-v2 mla": (16, 1, 576, None, False),
    "deepseek-v3 mla": (128, 1, 576, None, False),
}


def pool(shape, scale: float, huge: bool) -> torch.Tensor:
    """Returns a bf16 pool of normal values x scale, in 2 MB pages where `huge` (advised before the
    first touch, as prefill.empty_host_cache does for the pipeline's pool), else in whatever pages
    the allocator gives (4 KB under THP "madvise")."""
    t = torch.empty(shape, dtype=torch.bfloat16)
    if huge:
        advise_huge_pages([t])
    return t.copy_(torch.randn(shape) * scale)


def case(heads: int, kv_heads: int, width: int, seqs: int, context: int, huge: bool, block: int = 16):
    """Returns q [N, H, W], one pool [NB, BS, Hkv, W] (keys; MLA reads it as values too), a second
    pool (GQA values), block tables [N, MB] and context lengths [N], bf16 where they hold data."""
    blocks = seqs * (-(-context // block))
    keys = pool((blocks, block, kv_heads, width), 0.5, huge)
    values = keys if kv_heads == 1 else pool(keys.shape, 1.0, huge)
    perm = torch.randperm(blocks).to(torch.int32)
    tables = perm.view(seqs, -1)
    lens = torch.full((seqs,), context, dtype=torch.int32)
    q = torch.randn(seqs, heads, width).to(torch.bfloat16)
    return q, keys, values, tables, lens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/cpu_attention_families"))
    p.add_argument("--seqs", type=int, default=None, help="sequences of a step (default 1024; quick: 8)")
    p.add_argument("--context", type=int, default=None, help="cached positions each (default 144; quick: 256)")
    p.add_argument("--items", default="head,sequence", help="the kernel's work items to time, comma-separated")
    p.add_argument("--pages", default="4k,2m",
                   help="the pools' pages to time, comma-separated: 4k (the allocator's), 2m (advised huge)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: usable cores but two)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if native.library() is None:
        print(f"no native library: {native.unavailable_reason()}")
        return 1
    seqs = args.seqs or (8 if args.quick else 1024)
    context = args.context or (256 if args.quick else 144)
    items_list = [i for i in args.items.split(",") if i]
    for i in items_list:
        na.items_code(i)  # an unknown name stops here, in one line
    pages_list = [x for x in args.pages.split(",") if x]
    if not pages_list or set(pages_list) - {"4k", "2m"}:
        p.error(f"--pages takes 4k and/or 2m, comma-separated; got {args.pages!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or max(1, cores - 2)
    ceiling = stream_read_bytes_per_s((32 if args.quick else 512) << 20, threads=threads, reps=3)
    rows = []
    print(f"{seqs} sequences x {context} positions, {threads} threads; host read ceiling {ceiling / 1e9:.1f} GB/s")
    print(f"{'shape':18} {'pages':>5} {'items':>8} {'ms':>8} {'KV GB/s':>8} {'of ceiling':>10} {'max rel err':>11}")
    for name, (h, hkv, width, window, with_sinks), pages in ((n, s, pg) for n, s in SHAPES.items() for pg in pages_list):
        torch.manual_seed(0)
        q, keys, values, tables, lens = case(h, hkv, width, seqs, context, huge=pages == "2m")
        sinks = torch.randn(h) if with_sinks else None
        got = na.decode_attention(q[:2], keys, values, tables[:2], lens[:2], window, sinks=sinks, threads=threads)
        want = na.reference(q[:2], keys, values, tables[:2], lens[:2], window, sinks=sinks)
        err = float((got.float() - want).abs().max() / want.abs().max())
        attended = min(context, window) if window else context
        # bytes a step must read: MLA's joint row once (keys and values are the same row), GQA's K and V
        kv_bytes = seqs * attended * hkv * width * 2 * (1 if values is keys else 2)
        first = None
        for items in items_list:
            out = torch.empty_like(q)
            seconds = _best(lambda: na.decode_attention(q, keys, values, tables, lens, window, out=out,
                                                        threads=threads, sinks=sinks, items=items),
                            3 if args.quick else 10)
            first = out if first is None else first
            same = bool(torch.equal(out, first))  # work items change memory order only
            rate = kv_bytes / seconds
            rows.append(dict(shape=name, pages=pages, items=items, heads=h, kv_heads=hkv, width=width, window=window,
                             sinks=with_sinks, ms=seconds * 1e3, kv_bytes=kv_bytes, kv_gb_s=rate / 1e9,
                             share_of_ceiling=rate / ceiling, max_rel_err=err, same_bits=same))
            print(f"{name:18} {pages:>5} {items:>8} {seconds * 1e3:8.3f} {rate / 1e9:8.1f} {rate / ceiling:10.2f} {err:11.2e}"
                  + ("" if same else "  BITS DIFFER"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(seqs=seqs, context=context, threads=threads, host_read_gb_s=ceiling / 1e9, rows=rows)
    (out_dir / "cpu_attention_families.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
