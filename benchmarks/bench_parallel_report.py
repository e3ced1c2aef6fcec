"""bench_parallel's summary: speedup and scaling efficiency over the one-GPU rows, the notes that go
into its JSON, and the markdown tables it prints last (rank 0's figures)."""

from __future__ import annotations

from common import markdown_table

RANKS = 2

NOTES = {
    "ep2tp2": "with 2 ranks, EP+TP means tp=2,ep=tp: both GPUs split the attention heads (all_reduce after "
              "o_proj) and the routed experts by id (all-to-all dispatch); a 2 x 2 grid needs 4 GPUs",
    "weights": "random bf16 N(0, 0.02) drawn on each GPU by tensor name (random_weights.RandomCheckpoint): "
               "routing is near-uniform",
    "collectives": "collective_s_per_layer: GPU time of NCCL kernels in a profiled forward divided by layers "
                   "(includes waiting for the other rank); compare with the same messages alone in the "
                   "bandwidth row",
    "decode_tok_s": "tok_s = B x per-sequence decode tok/s of greedy generate; hbm_ceiling_tok_s from the "
                    "weight bytes rank 0 reads per step (uniform routing) at 4.2 TB/s",
    "fit24": "speedup and scaling efficiency of the fit24 rows are over the offloaded one-GPU row at the same "
             "per-GPU budget",
    "prefill": "prefill_s: a --prefill-tokens prompt through generate (max_new_tokens=1), median of --reps after "
               "one warm-up",
}


def summarize(results: dict) -> None:
    """Adds speedup and scaling efficiency over the same shape's 1gpu row to each model row."""
    base: dict = {}
    for row in results["rows"]:
        r0 = (row.get("ranks") or [{}])[0]
        if row.get("mode") in ("1gpu", "offload") and "prefill_tok_s" in r0:  # the one-GPU baseline
            base[row["shape"]] = r0
        ref = base.get(row.get("shape")) if row.get("mode") not in ("1gpu", "offload", None) else None
        if ref is None or "prefill_tok_s" not in r0:
            continue
        sp = {"prefill": r0["prefill_tok_s"] / ref["prefill_tok_s"]}
        for b, d in r0["decode"].items():
            if b in ref["decode"] and ref["decode"][b]["tok_s"] > 0:
                sp[f"decode_b{b}"] = d["tok_s"] / ref["decode"][b]["tok_s"]
                a, c = d["tokens"], ref["decode"][b]["tokens"]
                d["tokens_equal_1gpu"] = sum(x == y for x, y in zip(a, c)) / max(1, len(c))
        row["speedup"] = sp
        row["scaling_efficiency"] = {k: v / RANKS for k, v in sp.items()}


def table(results: dict) -> str:
    """Returns the markdown table of the model rows (rank 0's figures)."""
    ceil = lambda d: "-" if d["hbm_ceiling_tok_s"] is None else f"{d['hbm_ceiling_tok_s']:.0f}"
    out = []
    for row in results["rows"]:
        if row.get("mode") is None:
            continue
        r0 = (row.get("ranks") or [{}])[0]
        name = row["row"]
        if "skipped" in row or "error" in r0:
            out.append([name, row.get("skipped") or r0["error"][:80], "", "", "", "", ""])
            continue
        dec = r0["decode"]
        b1, b32 = (dec[k] for k in sorted(dec, key=int)[:2]) if len(dec) > 1 else (dec[next(iter(dec))],) * 2
        eff = row.get("scaling_efficiency", {})
        coll = r0["collectives"].get("N=1", {}).get("collective_s_per_layer")
        pct = lambda k, eff=eff: f" ({eff[k]:.0%})" if k in eff else ""
        out.append([name, f"{r0['prefill_tok_s']:.0f}{pct('prefill')}",
                    f"{b1['tok_s']:.1f} / {ceil(b1)}{pct('decode_b' + min(dec, key=int))}",
                    f"{b32['tok_s']:.0f} / {ceil(b32)}{pct('decode_b' + max(dec, key=int))}", b1["graph"],
                    "" if coll is None else f"{coll * 1e6:.1f}", f"{r0.get('peak_gb', r0['held_gb']):.1f}"])
    return markdown_table(["row", "prefill tok/s (eff.)", "decode B=1 tok/s / ceiling (eff.)", "decode B=32 / ceiling",
                           "graph", "coll. us/layer B=1", "GB on rank 0"], out)


def bandwidth_table(results: dict) -> str:
    rows = [r for r in results["rows"] if r["row"] == "bandwidth" and "ranks" in r]
    if not rows or "error" in rows[0]["ranks"][0]:
        return ""
    return markdown_table(["message", "bytes", "all_reduce us", "busbw GB/s", "all_to_all us", "busbw GB/s"],
                          [[k, v["bytes"], f"{v['all_reduce_s'] * 1e6:.1f}", f"{v['all_reduce_busbw_gb_s']:.1f}",
                            f"{v['all_to_all_s'] * 1e6:.1f}", f"{v['all_to_all_busbw_gb_s']:.1f}"]
                           for k, v in rows[0]["ranks"][0].items()])
