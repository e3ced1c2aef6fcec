"""Times gpt-oss's fused sinks decode kernel (tensor-core dots, issues 13/15) against its HBM floor
and the PyTorch reference path, and the same kernel without sinks (issue 12) against torch SDPA.

    PYTHONPATH=src python3 benchmarks/probes/probe_sink_decode.py --out $OUT           # H200, ~1 min
    PYTHONPATH=src python3 benchmarks/probes/probe_sink_decode.py --plain --out $OUT   # the plain rows only

One layer of attention with sinks at gpt-oss-20b's heads (64 query heads, 8 kv heads, Dh 64), bf16,
window None (the full layers) and 128 (the sliding ones):
  dense  moekit.sinks.fused_decode: B = 1, one new token after 128 / 1024 / 4096 cached positions
         (the static-shape KVCache path of generate), the cache write included;
  paged  moekit.sinks.paged_fused_decode: B = 1, 8, 32, 128 sequences, contexts uniform in 32..640,
         their 16-position blocks scattered over a pool (the serving path), the cache write included.
Each row: the kernel's time, the floor of reading the attended keys and values once at the HBM copy
rate, the reference path's time in the same run (moekit.sinks.attend / _decode_rows with
MOEKIT_FUSED=0: the cache write, mask and sink_attention), and the kernel's max |error| against
that reference's output.

  plain  moekit.model.Attention's one-token graph step without sinks at OLMoE-1B-7B's heads (16 / 16,
         Dh 128) and Qwen3-30B-A3B's (32 / 4, Dh 128), B = 1 and 32, 70 / 1024 / 4096 cached positions
         in a cache of 128 more (what generate allocates for 128 new tokens), three ways (issue 12):
         write_kv without a mask, then moekit.sinks.fused_decode one-pass (splits=1: one program per
         (row, kv head) walks the context); the same split into runs (moekit.sinks.dense_splits' count,
         the runs combined by a second launch; where that count is 1, the uncapped
         paged_attention.decode_splits count, up to one run per 64-position tile of the cache, to show
         what the cap avoids); and write_kv building the [1, S] mask, then torch SDPA over all S (cuDNN
         on the H200: the path kept past sinks.PLAIN_DECODE_MAX_POSITIONS). Each captured in one CUDA
         graph of 16 layers (as generate's decode step runs them; distinct caches), time per layer =
         median replay / 16, next to the HBM floor of reading the live keys and values once; max
         |error| of each kernel path against SDPA. ~40 s with builds on the H200.
Off CUDA it says so and exits 0.

Shapes: B = sequences, H = query heads, Hkv = kv heads, Dh = head dim, S = cache capacity,
NB = pool blocks, BS = positions per block, MB = blocks per table.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common
import common

HEADS, KV_HEADS, HEAD_DIM = 64, 8, 64  # gpt-oss-20b
WINDOWS = (None, 128)
DENSE_CONTEXTS = (128, 1024, 4096)
BATCHES = (1, 8, 32, 128)
CONTEXTS = (32, 640)  # paged: uniform in [lo, hi], the new token included
BLOCK_SIZE = 16
# plain decode (no sinks): (name, heads, kv heads, head dim)
PLAIN_MODELS = (("OLMoE-1B-7B", 16, 16, 128), ("Qwen3-30B-A3B", 32, 4, 128))
PLAIN_BATCHES = (1, 32)
PLAIN_CONTEXTS = (70, 1024, 4096)
PLAIN_ROOM = 128  # cache positions past the context (the new tokens generate allocates for)
GRAPH_LAYERS = 16  # OLMoE's layer count: attention calls a captured step holds


def layer(window: int | None, device: torch.device, g: torch.Generator):
    """Returns a gpt-oss SinkAttention (layer 0) at gpt-oss-20b's heads with random sinks, bf16."""
    from moekit.config import ModelConfig
    from moekit.model import SinkAttention

    cfg = ModelConfig(family="gpt_oss", vocab_size=64, hidden_size=64, num_layers=1, num_heads=HEADS,
                      num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_experts=2, top_k=1, expert_ffn=8,
                      moe_layers=(True,), qkv_bias=True, o_bias=True, sliding_window=window, attention_sinks=True)
    attn = SinkAttention(cfg, 0)
    with torch.no_grad():
        attn.sinks.copy_(2 * torch.randn(HEADS, generator=g))
    return attn.to(device, torch.bfloat16).eval()


def reference(fn):
    """Returns fn run on the PyTorch path (MOEKIT_FUSED=0)."""
    def run():
        before = os.environ.get("MOEKIT_FUSED")
        os.environ["MOEKIT_FUSED"] = "0"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["MOEKIT_FUSED"]
            else:
                os.environ["MOEKIT_FUSED"] = before
    return run


def kv_bytes(positions: int) -> int:
    """Returns the bytes of bf16 keys and values of `positions` positions of one layer."""
    return 2 * positions * KV_HEADS * HEAD_DIM * 2


def dense_row(ctx: int, window: int | None, device: torch.device, g: torch.Generator) -> dict:
    """Returns the dense row: one token at position ctx over a KVCache of capacity ctx + 1."""
    from moekit import sinks
    from moekit.kv_cache import KVCache

    attn = layer(window, device, g)
    cache = KVCache(attn.cfg, 1, ctx + 1, device, torch.bfloat16)
    cache.keys[0].normal_()
    cache.values[0].normal_()
    q = torch.randn(1, HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16)  # [B, H, T, Dh]
    k, v = (torch.randn(1, KV_HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(2))
    start = torch.tensor(ctx, device=device)
    kernel = partial(sinks.fused_decode, q, k, v, attn.sinks, cache.keys[0], cache.values[0], start, window)
    plain = reference(partial(sinks.attend, attn, q, k, v, cache, start))
    with torch.inference_mode():
        error = float((kernel().view(1, -1).float() - plain().view(1, -1).float()).abs().max())
        kernel_s, plain_s = common.do_bench_s(kernel), common.do_bench_s(plain)
    attended = ctx + 1 if window is None else min(ctx + 1, window)
    return {"path": "dense", "batch": 1, "context": ctx, "window": window, "kernel_us": 1e6 * kernel_s,
            "reference_us": 1e6 * plain_s, "floor_us": 1e6 * kv_bytes(attended) / common.HBM_BYTES_PER_S,
            "max_abs_error": error}


def paged_row(b: int, window: int | None, device: torch.device, g: torch.Generator) -> dict:
    """Returns the paged row: one token for each of b sequences over a scattered block pool."""
    from moekit import sinks
    from moekit.kv_cache import PagedKVCache

    attn = layer(window, device, g)
    lo, hi = CONTEXTS
    ctx = torch.randint(lo, hi + 1, (b,), generator=g)  # [B], the new token included
    width = -(-hi // BLOCK_SIZE)
    cache = PagedKVCache(attn.cfg, b * width, BLOCK_SIZE, device, torch.bfloat16)
    keys, values = cache.keys[0], cache.values[0]  # [NB, BS, Hkv, Dh]
    keys.normal_()
    values.normal_()
    tables = torch.randperm(b * width, generator=g).view(b, width).to(device, torch.int32)  # [B, MB]
    last = ctx.to(device).long() - 1
    slots = tables.long().gather(1, (last // BLOCK_SIZE)[:, None])[:, 0] * BLOCK_SIZE + last % BLOCK_SIZE  # [B]
    ctx = ctx.to(device, torch.int32)
    qs = torch.randn(b, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)  # [B, H, Dh]
    ks, vs = (torch.randn(b, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(2))
    kernel = partial(sinks.paged_fused_decode, qs, ks, vs, attn.sinks, keys, values, tables, ctx, window, slots)

    def plain_step():  # what _attend_ragged does for a decode step without the kernel
        cache.write(0, ks, vs, slots)
        return sinks._decode_rows(attn, qs, ks, vs, cache, tables, ctx)
    plain = reference(plain_step)
    with torch.inference_mode():
        error = float((kernel().view(b, -1).float() - plain().float()).abs().max())
        kernel_s, plain_s = common.do_bench_s(kernel), common.do_bench_s(plain)
    attended = int(ctx.sum()) if window is None else int(ctx.clamp(max=window).sum())
    return {"path": "paged", "batch": b, "context": float(ctx.float().mean()), "window": window,
            "kernel_us": 1e6 * kernel_s, "reference_us": 1e6 * plain_s,
            "floor_us": 1e6 * kv_bytes(attended) / common.HBM_BYTES_PER_S, "max_abs_error": error}


def plain_row(model: tuple, b: int, ctx: int, device: torch.device, g: torch.Generator) -> dict:
    """Returns the plain row: one new token for each of b sequences at position ctx, GRAPH_LAYERS
    layers of attention without sinks through the one-pass kernel, the split kernel and mask + SDPA."""
    import torch.nn.functional as F

    from moekit import fused, sinks
    from moekit.config import ModelConfig
    from moekit.kv_cache import KVCache
    from moekit.paged_attention import decode_splits

    name, heads, kv_heads, head_dim = model
    cfg = ModelConfig(family="probe", vocab_size=64, hidden_size=64, num_layers=GRAPH_LAYERS, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, num_experts=2, top_k=1, expert_ffn=8,
                      moe_layers=(True,) * GRAPH_LAYERS)
    capacity = ctx + PLAIN_ROOM
    cache = KVCache(cfg, b, capacity, device, torch.bfloat16)
    for z in cache.keys + cache.values:
        z.normal_()
    # q [B, H, 1, Dh], k, v [B, Hkv, 1, Dh]: views of token rows, as the fused projection leaves them
    q = torch.randn(b, 1, heads, head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(b, 1, kv_heads, head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
            for _ in range(2))
    start = torch.tensor(ctx, dtype=torch.long, device=device)
    sinks.DENSE_SPLITS_ON = True  # the rule as it would run once the split kernel is checked (off by default)
    rule = sinks.dense_splits(b, kv_heads, capacity, device)
    splits = rule if rule > 1 else min(decode_splits(b, kv_heads, device), -(-capacity // 64))

    def kernel(i: int, n: int) -> torch.Tensor:  # Attention.attend's graph step through the kernel
        fused.write_kv(cache.keys[i], cache.values[i], k, v, start, mask=False)
        return sinks.fused_decode(q, k, v, None, cache.keys[i], cache.values[i], start, None, store=False, splits=n)

    def sdpa(i: int) -> torch.Tensor:  # Attention.attend's graph step past the kernel's positions
        mask = fused.write_kv(cache.keys[i], cache.values[i], k, v, start, mask=True)  # [1, S]
        out = F.scaled_dot_product_attention(q, cache.keys[i], cache.values[i], attn_mask=mask,
                                             enable_gqa=kv_heads != heads)
        return out.transpose(1, 2)

    with torch.inference_mode():
        expected = sdpa(0).float().reshape(b, heads, head_dim)
        one_error = float((kernel(0, 1).float() - expected).abs().max())
        one_us = common.graph_us_per_call([partial(kernel, i, 1) for i in range(GRAPH_LAYERS)])
        split_error = split_us = None
        if splits > 1:
            split_error = float((kernel(0, splits).float() - expected).abs().max())
            split_us = common.graph_us_per_call([partial(kernel, i, splits) for i in range(GRAPH_LAYERS)])
        sdpa_us = common.graph_us_per_call([partial(sdpa, i) for i in range(GRAPH_LAYERS)])
    kv_positions = b * (ctx + 1)
    return {"path": "plain", "model": name, "heads": [heads, kv_heads, head_dim], "batch": b, "context": ctx,
            "capacity": capacity, "splits_rule": rule, "splits_timed": splits if splits > 1 else None,
            "one_pass_us": one_us, "split_us": split_us, "sdpa_us": sdpa_us,
            "floor_us": 1e6 * 2 * kv_positions * kv_heads * head_dim * 2 / common.HBM_BYTES_PER_S,
            "one_pass_max_abs_error": one_error, "split_max_abs_error": split_error,
            "kernel_path": "split" if rule > 1 else "one-pass",
            "kernel_taken": sinks.plain_decode_supported(q, k, v, cache.keys[0], cache.values[0])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_output_args(p, "probe_sink_decode")
    p.add_argument("--plain", action="store_true", help="only the rows without sinks (issue 12)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        print("probe_sink_decode: the Triton sinks decode kernel is timed on CUDA only; nothing to do here")
        return 0
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    res: dict = {"meta": common.run_meta(args, device), "hbm_bytes_per_s": common.HBM_BYTES_PER_S,
                 "heads": [HEADS, KV_HEADS, HEAD_DIM], "rows": []}
    plain = []
    for model in PLAIN_MODELS:
        for b in PLAIN_BATCHES:
            for ctx in PLAIN_CONTEXTS:
                row = plain_row(model, b, ctx, device, g)
                res["rows"].append(row)
                split = row["split_us"]
                plain.append([row["model"], row["batch"], row["context"], row["capacity"], f"{row['one_pass_us']:.1f}",
                              "-" if split is None else f"{split:.1f} ({row['splits_timed']})",
                              row["splits_rule"], f"{row['sdpa_us']:.1f}", f"{row['floor_us']:.1f}",
                              "kernel" if row["kernel_taken"] else "SDPA",
                              f"{max(row['one_pass_max_abs_error'], row['split_max_abs_error'] or 0):.1e}"])
                print(row, flush=True)
                del row
                common.free_memory(device)
    print(common.markdown_table(["plain (no sinks)", "B", "context", "cache S", "one-pass us/layer",
                                 "split us/layer (runs)", "runs (rule)", "mask + SDPA us/layer", "HBM floor us",
                                 "Attention takes", "max |err|"], plain))
    work = [] if args.plain else ([partial(dense_row, c, w) for w in WINDOWS for c in DENSE_CONTEXTS]
                                  + [partial(paged_row, b, w) for w in WINDOWS for b in BATCHES])
    table = []
    for make in work:
        row = make(device, g)
        res["rows"].append(row)
        table.append([row["path"], row["batch"], f"{row['context']:.0f}", row["window"], f"{row['kernel_us']:.1f}",
                      f"{row['floor_us']:.1f}", f"{row['floor_us'] / row['kernel_us']:.0%}",
                      f"{row['reference_us']:.1f}", f"{row['max_abs_error']:.1e}"])
        print(row, flush=True)
        common.free_memory(device)
    if table:
        print(common.markdown_table(["path", "B", "context (mean)", "window", "kernel us", "HBM floor us",
                                     "floor / kernel", "reference us", "max |err|"], table))
    print("wrote", common.write_json(res, args.out, "probe_sink_decode"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
