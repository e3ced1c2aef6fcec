"""Issue 12's bars, and the table that sets each moekit figure of a bench_llamacpp run next to llama.cpp's
figure and the ceiling of the same run, with its ratio against the bar it must clear.

A bar is (what moekit is compared with, the least ratio); a row meets it when moekit / llama.cpp
(or moekit / ceiling for the kernel and the host-memory share of the combined ceiling) reaches it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common

# moekit setting -> (llama.cpp row of the same setting, label); the llama.cpp row of a compressed form
# is suffixed with its GGUF type (decode_cpu_experts_Q4_K_M)
SETTINGS = {
    "decode_gpu": "decode, all on the GPU (B=1)",
    "prefill_gpu": "prefill 512, all on the GPU",
    "decode_cpu_experts": "decode, all experts in host memory",
    "decode_half_experts": "decode, half the layers' experts on the GPU",
    "decode_cpu_only": "decode, no GPU",
}
BARS = {  # (setting, moekit form) -> least moekit / llama.cpp
    ("decode_gpu", "bf16"): 1.2,
    ("prefill_gpu", "bf16"): 1.0,
    ("decode_cpu_experts", "bf16"): 1.3,
    ("decode_half_experts", "bf16"): 1.2,
    ("decode_cpu_only", "bf16"): 1.0,
    ("decode_cpu_only", "float32"): 1.0,
}
COMPRESSED_BAR = 1.3  # int4 vs Q4_K_M, int2 vs Q2_K, at the same footprint
TERNARY_BAR = 3.0  # ternary experts vs llama.cpp's bf16 figure at the same footprint
CEILING_SHARE = 0.85  # all experts in host memory: of the combined (CPU read + H2D) ceiling
KERNEL_SHARE = 0.80  # the CPU kernel: of the host's measured read rate


def llama_row_name(setting: str, form: str) -> str:
    """Returns the llama.cpp row a moekit row of `form` is set against (ternary: the bf16 one)."""
    from lcpp import QUANT_TYPES

    return f"{setting}_{QUANT_TYPES[form]}" if form in QUANT_TYPES else setting


def bar_of(setting: str, form: str) -> float | None:
    """Returns the least moekit / llama.cpp ratio issue 12 asks of a row, or None (no bar)."""
    if form == "ternary":
        return TERNARY_BAR
    if form in ("int4", "int2"):
        return COMPRESSED_BAR
    return BARS.get((setting, form))


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return format(v, spec) if v else "-"


def traffic_ceiling(row: dict, results: dict) -> float | None:
    """Returns the tok/s an offloaded row could reach with the bytes it actually moved a token (its
    report's CPU-read and PCIe bytes, copies and auto's in-place reads, so the cache's real hit rate counts, where the uniform ceiling
    assumes none), each link at its own measured rate and both within their concurrent sum, and the
    device part no slower than everything resident (decode_gpu of the same run, where it ran: a run of
    offloaded rows only leaves that term out); None without the bytes or the rates, and None where
    that term is out and the bytes allow over 10x the row's figure (OLMoE's ternary experts, cached
    whole at llama.cpp's footprint, moved 1.75 MB a token: 563,487 tok/s "at its traffic", 2ef1e0c):
    there the device's own work binds, and this run did not measure it."""
    rep, rates = row.get("report") or {}, results.get("rates") or {}
    if rep.get("misses_used") == "mapped":  # its in-place reads over PCIe are not counted in its report
        return None
    cpu_b, link_b = rep.get("cpu_bytes_per_token"), rep.get("bytes_per_token")
    if link_b is not None and (rep.get("in_place_share") or rep.get("gathered_experts")):
        link_b += rep.get("mapped_bytes_per_token") or 0  # auto's in-place share and the partner's gather cross the link too
    cpu_r, link_r = rates.get("cpu_read_alone_bytes_per_s"), rates.get("h2d_alone_bytes_per_s")
    both = (rates.get("cpu_read_concurrent_bytes_per_s") or 0) + (rates.get("h2d_concurrent_bytes_per_s") or 0)
    gpu = next((r.get("decode_tok_s") for r in results.get("moekit", []) if r.get("setting") == "decode_gpu"), None)
    if cpu_b is None or link_b is None or not (cpu_r and link_r and both):
        return None
    seconds = max(cpu_b / cpu_r, link_b / link_r, (cpu_b + link_b) / both, 1 / gpu if gpu else 0.0)
    if not gpu and row.get("decode_tok_s") and 1 / seconds > 10 * row["decode_tok_s"]:
        return None
    return 1 / seconds


def comparisons(results: dict) -> list[dict]:
    """Returns one dict per moekit figure: what, moekit, llama.cpp (its row), ratio, bar, ceiling,
    share of the ceiling, and whether the bar is met (None when a figure is missing)."""
    lc = (results.get("llamacpp") or {}).get("rows", {})
    mixed = results.get("cpu_interleaved") or {}
    out = []
    for r in results.get("moekit", []):
        setting = r["setting"].removesuffix("_at_least")
        form = {"bfloat16": "bf16"}.get(r.get("form") or r.get("dtype"), r.get("form") or r.get("dtype") or "bf16")
        figures = [("decode_gpu" if setting == "decode_gpu" else setting, r.get("decode_tok_s"))]
        if r.get("prefill_512_tok_s"):
            figures.append(("prefill_gpu", r["prefill_512_tok_s"]))
        for what, ours in figures:
            ref_name = llama_row_name(what, form)
            theirs = (lc.get(ref_name) or {}).get("tok_s")
            if what == "decode_cpu_only" and form in ("bf16", "float32") and mixed.get("llamacpp_median"):
                theirs = mixed["llamacpp_median"]  # the interleaved rounds' median (bf16's own figure is its median too)
            ratio = ours / theirs if ours and theirs else None
            bar = bar_of(what, form)
            ceiling = r.get("ceiling_tok_s") if what != "prefill_gpu" else None
            share = ours / ceiling if ours and ceiling else None
            met = None
            if ratio is not None and bar is not None:
                met = ratio >= bar and (what != "decode_cpu_experts" or form != "bf16" or (share or 0) >= CEILING_SHARE)
            out.append(dict(what=f"{SETTINGS.get(what, what)}{', least budget' if r['setting'].endswith('_at_least') else ''}",
                            form=form + (" + int8 dense" if r.get("dense") == "int8" else ""),
                            misses=r.get("misses") or "-", budget_bytes=r.get("budget_bytes"),
                            moekit=ours, status=r["status"], llamacpp=theirs, llamacpp_row=ref_name, ratio=ratio, bar=bar,
                            ceiling=ceiling, of_ceiling=share, met=met,
                            traffic=traffic_ceiling(r, results) if what != "prefill_gpu" else None))
    rates = results.get("rates") or {}
    read = rates.get("cpu_read_alone_bytes_per_s")
    # the kernel alone (its arguments built before the clock: cpu_rates' kernel_*) carries the bar; the
    # same calls through expert_ffn (native_*: + its Python) stand beside it without one. Results from
    # before kernel_* (2026-12-02) have only native_*, which then carries the bar as it did.
    for what, label in (("one_expert", "CPU kernel, one bf16 expert"),
                        ("layer_top_k", "CPU kernel, a layer's top-k bf16 experts")):
        alone, python = rates.get(f"kernel_{what}_bytes_per_s"), rates.get(f"native_{what}_bytes_per_s")
        for rate, name, judged in ((alone, label, True),
                                   (python, label + (" through expert_ffn (Python)" if alone else ""), not alone)):
            if rate and read:
                share = rate / read
                out.append(dict(what=name, form="bf16", misses="-", budget_bytes=None, moekit=rate / 1e9,
                                status="ok", llamacpp=None, llamacpp_row="-", ratio=None,
                                bar=KERNEL_SHARE if judged else None, ceiling=read / 1e9, of_ceiling=share,
                                met=share >= KERNEL_SHARE if judged else None, traffic=None))
    return out


def table(results: dict) -> str:
    """Returns the markdown table of comparisons(results) (kernel rows in GB/s, the others in tok/s)."""
    settings = list(SETTINGS.values())
    forms = ["bf16", "int4", "int2", "ternary", "float32"]

    def order(c: dict) -> tuple:  # by setting, then form, then misses (kernel rows last)
        what = next((i for i, s in enumerate(settings) if c["what"].startswith(s)), len(settings))
        return what, forms.index(c["form"]) if c["form"] in forms else len(forms), c["misses"]

    rows = []
    for c in sorted(comparisons(results), key=order):
        kernel = c["what"].startswith("CPU kernel")
        bar = (f"{c['bar']:.0%} of ceiling" if c["bar"] else "-") if kernel else (f">= {c['bar']:.2g}x" if c["bar"] else "-")
        if c["form"] == "bf16" and c["what"] == SETTINGS["decode_cpu_experts"]:
            bar += f", >= {CEILING_SHARE:.0%} of ceiling"
        rows.append([c["what"], c["form"], c["misses"], f"{c['budget_bytes'] / 1e9:.2f}" if c["budget_bytes"] else "-",
                     _fmt(c["moekit"]) if c["moekit"] else c["status"],
                     _fmt(c["llamacpp"]) + (f" ({c['llamacpp_row']})" if c["llamacpp"] else ""),
                     f"{c['ratio']:.2f}x" if c["ratio"] else "-", bar, _fmt(c["ceiling"]),
                     f"{c['of_ceiling']:.0%}" if c["of_ceiling"] else "-",
                     f"{c['traffic']:.1f} ({c['moekit'] / c['traffic']:.0%})" if c["traffic"] and c["moekit"] else "-",
                     {True: "yes", False: "no", None: "-"}[c["met"]]])
    return common.markdown_table(["setting", "moekit experts", "misses", "budget GB", "moekit", "llama.cpp",
                                  "ratio", "bar", "ceiling", "of ceiling", "ceiling at its traffic (share)", "met"],
                                 rows)


def main() -> int:
    """Prints the table of each bench_llamacpp JSON given (one per call), under its shape and command."""
    parser = argparse.ArgumentParser(description="issue 12's table of bench_llamacpp runs (one JSON per call)")
    parser.add_argument("files", nargs="+", help="bench_llamacpp JSONs, e.g. benchmarks/results/bench_llamacpp_*.json")
    for path in parser.parse_args().files:
        res = json.loads(Path(path).read_text())
        meta = res.get("meta", {})
        print(f"\n### {res.get('shape')}: rows {', '.join(res.get('rows') or [])} ({Path(path).name}, "
              f"commit {meta.get('commit')}, {meta.get('date')})\n\n    {meta.get('command')}\n")
        print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
