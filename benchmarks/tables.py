"""Rewrites the benchmark tables of README.md and benchmarks/results/README.md from the results JSON,
so that no figure is copied by hand.

A table is the text between `<!-- table:NAME -->` and `<!-- /table:NAME -->` (each marker on a line
of its own); NAME is a key of TABLES, whose function renders the table from the JSON files it
names in benchmarks/results/. Text outside the markers is never touched.

    python3 benchmarks/tables.py            # rewrite every marked table
    python3 benchmarks/tables.py --check    # print the differences, exit 1 if a table is stale

A marker whose JSON is missing is left as it is (and named on stderr).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DOCS = (BENCH_DIR.parent / "README.md", RESULTS_DIR / "README.md")


def load(name: str) -> dict:
    return json.loads((RESULTS_DIR / name).read_text())


def num(v: float) -> str:
    """Returns a rate as the tables write it: thousands separated and whole from 1,000 up, one
    decimal below."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Returns a markdown table; an empty cell is written `| |`."""
    def line(cells: list[str]) -> str:
        return re.sub(r"\|  (?=\|)", "| ", "| " + " | ".join(cells) + " |")

    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in rows])


# ---- bench_resident.json ----------------------------------------------------------------------------

RESIDENT_ROWS = [  # (metric, engine in the JSON, label in the table)
    ("decode B=1", "moekit compiled+graphs", "moekit compiled + CUDA graph (`--compile`)"),
    ("decode B=1", "moekit graphs", "moekit CUDA graph (default on GPU)"),
    ("decode B=1", "moekit eager", "moekit eager (`--no-cuda-graph`)"),
    ("decode B=1", "hf default", "transformers `generate` (default cache)"),
    ("decode B=1", "hf static", "transformers static cache"),
    ("decode B=1", "hf static+compile", "transformers static cache + torch.compile"),
    ("decode B=8", "moekit compiled+graphs", "moekit compiled + CUDA graph"),
    ("decode B=8", "moekit graphs", "moekit CUDA graph"),
    ("decode B=8", "hf default", "transformers default"),
    ("decode B=32", "moekit compiled+graphs", "moekit compiled + CUDA graph"),
    ("decode B=32", "moekit graphs", "moekit CUDA graph"),
    ("decode B=32", "hf default", "transformers default"),
    ("prefill T=128 B=1", "moekit", "moekit"),
    ("prefill T=128 B=1", "transformers", "transformers"),
    ("prefill T=1024 B=1", "moekit", "moekit"),
    ("prefill T=1024 B=1", "transformers", "transformers"),
    ("peak GPU memory", "moekit", "moekit"),
    ("peak GPU memory", "transformers", "transformers"),
]


def resident_rows(res: dict) -> dict[tuple[str, str], dict]:
    """Returns bench_resident's table rows keyed by (metric, engine); peak rows under 'peak GPU memory'."""
    out = {}
    for r in res["table"]:
        metric = "peak GPU memory" if r["metric"].startswith("peak GPU memory") else r["metric"]
        out[(metric, r["engine"])] = r
    return out


def resident(files: dict) -> str:
    """The resident engine table of benchmarks/results/README.md: every decode, prefill and peak row,
    the fastest decode of each batch in bold."""
    rows_by = resident_rows(files["bench_resident.json"])
    best = {}
    for (metric, _), r in rows_by.items():
        if metric.startswith("decode"):
            best[metric] = max(best.get(metric, 0), r["measured"])
    rows = []
    for metric, engine, label in RESIDENT_ROWS:
        r = rows_by.get((metric, engine))
        if r is None:
            continue
        if metric == "peak GPU memory":
            rows.append([label, r["metric"], f"{r['measured']:.1f} {r['unit']}", "-", "-"])
            continue
        measured = f"{num(r['measured'])} {r['unit']}"
        if metric.startswith("decode") and r["measured"] == best[metric]:
            measured = f"**{measured}**"
        rows.append([label, metric, measured, f"{num(r['ceiling'])} {r['unit']}", f"{r['pct_of_ceiling']:.1f}%"])
    return table(["engine", "metric", "measured", "ceiling", "% of ceiling"], rows)


def headline(files: dict) -> str:
    """The project README's headline table: moekit next to transformers and the ceiling."""
    rows_by = resident_rows(files["bench_resident.json"])

    def cell(metric: str, engine: str, bold: bool = False) -> str:
        r = rows_by[(metric, engine)]
        v = f"{r['measured']:,.0f} {r['unit']}"
        return f"{f'**{v}**' if bold else v} ({r['pct_of_ceiling']:.0f}%)"

    def value(metric: str, engine: str) -> str:
        return f"{rows_by[(metric, engine)]['measured']:,.0f}"

    def ceiling(metric: str) -> str:
        return f"{rows_by[(metric, 'moekit' if metric.startswith('prefill') else 'moekit graphs')]['ceiling']:,.0f}"

    peak_m, peak_t = rows_by[("peak GPU memory", "moekit")], rows_by[("peak GPU memory", "transformers")]
    weights = re.search(r"weights ([0-9.]+) GiB", peak_m["metric"])
    weights_label = f" ({float(weights.group(1)):.1f} GiB of weights)" if weights else ""
    return table(["", "moekit", "transformers", "ceiling"], [
        ["decode B=1, `--compile`", cell("decode B=1", "moekit compiled+graphs", True),
         f"{value('decode B=1', 'hf default')} default, {value('decode B=1', 'hf static+compile')} static cache + compile",
         ceiling("decode B=1")],
        ["decode B=1, default CUDA graph", cell("decode B=1", "moekit graphs"), "", ceiling("decode B=1")],
        ["decode B=32, `--compile`", cell("decode B=32", "moekit compiled+graphs", True),
         value("decode B=32", "hf default"), ceiling("decode B=32")],
        ["prefill 1024 tokens", cell("prefill T=1024 B=1", "moekit"), value("prefill T=1024 B=1", "transformers"),
         f"{ceiling('prefill T=1024 B=1')} (roofline)"],
        [f"peak GPU memory{weights_label}", f"{peak_m['measured']:.1f} GiB", f"{peak_t['measured']:.1f} GiB", ""],
    ])


# ---- tune_slot_kernels.json ---------------------------------------------------------------------------

SLOT_FIRST_GUESS = [32, 128, 4]  # the tile before tuning (rows, columns, warps)


def slot_tiles(files: dict) -> str:
    """The per-slot kernel tiles: tuned tile and its GB/s against the first guess, per shape."""
    res = files["tune_slot_kernels.json"]
    rows = []
    for shape, kernels in res["results"].items():
        for kernel, label in (("gate_up", "gate_up+SwiGLU"), ("down", "down")):
            runs = [r for r in kernels.get(kernel, []) if "us" in r]
            if not runs:
                continue
            best = min(runs, key=lambda r: r["us"])
            first = next((r for r in runs if r["cfg"] == SLOT_FIRST_GUESS), None)
            bn, bk, warps = best["cfg"]
            rows.append([shape, label, f"{bn} x {bk}, {warps} warps", f"{best['GB/s']:,.0f}",
                         f"{first['GB/s']:,.0f}" if first else "-"])
    return table(["shape", "kernel", "tuned", "GB/s", "first guess GB/s"], rows)


# ---- the registry ---------------------------------------------------------------------------------------

TABLES: dict[str, tuple[tuple[str, ...], Callable[[dict], str]]] = {
    "headline": (("bench_resident.json",), headline),
    "resident": (("bench_resident.json",), resident),
    "slot_tiles": (("tune_slot_kernels.json",), slot_tiles),
}
MARKER = re.compile(r"^<!-- table:(?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- /table:(?P=name) -->$", re.S | re.M)


def rewrite(text: str, where: str) -> str:
    """Returns `text` with every marked table rendered from its JSON."""
    def render(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            print(f"{where}: no table named {name!r} (known: {', '.join(TABLES)}); left as it is", file=sys.stderr)
            return m.group(0)
        names, fn = TABLES[name]
        missing = [n for n in names if not (RESULTS_DIR / n).exists()]
        if missing:
            print(f"{where}: table {name}: {', '.join(missing)} not in {RESULTS_DIR}; left as it is", file=sys.stderr)
            return m.group(0)
        return f"<!-- table:{name} -->\n{fn({n: load(n) for n in names})}\n<!-- /table:{name} -->"

    return MARKER.sub(render, text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="print what would change; exit 1 if anything would")
    args = p.parse_args()
    stale = False
    for doc in DOCS:
        old = doc.read_text()
        new = rewrite(old, str(doc))
        if new == old:
            continue
        stale = True
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(doc), str(doc)))
        else:
            doc.write_text(new)
            print(f"rewrote the tables of {doc}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
