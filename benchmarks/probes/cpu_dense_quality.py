"""Quality of the CPU decode step's quantized dense weights (--cpu-quantize-dense int8 / int4) on the bundled
model, against its bf16 step: per position, the logits' relative L2 error and whether the top token agrees
(both steps fed the bf16 step's greedy tokens, 64 positions), and for three code prompts how many greedy
tokens `generate` gives before its continuation parts from bf16's. Why: int4 attention is opt-in because of
this (README, "Compressed experts with no GPU"); the figures in native/dense_q8.py come from here.

    PYTHONPATH=src python3 benchmarks/probes/cpu_dense_quality.py --out benchmarks/results   # ~30 s on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

import moekit
from moekit.kv_cache import KVCache
from moekit.native.decode import CpuDecodeStep
from moekit.tokenizer import load_tokenizer

PROMPTS = ("def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\ndef read_lines(path):")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    path = moekit.default_model_path()
    model = moekit.load_model(path, dtype=torch.bfloat16)
    tok = load_tokenizer(path)
    prompt = torch.tensor([tok.encode(PROMPTS[0])])
    n = prompt.shape[1]
    res: dict = {"steps": {}, "greedy": {}}
    for form in ("int8", "int4"):
        caches = {f: KVCache(model.config, 1, n + args.positions + 1, "cpu", torch.bfloat16) for f in ("bf16", form)}
        with torch.inference_mode():
            for cache in caches.values():
                logits = model(prompt, cache=cache, start=0)
            steps = {f: CpuDecodeStep(model, caches[f], dense=f) for f in caches}
            token, errors, same = int(logits[0, -1].argmax()), [], 0
            for pos in range(n, n + args.positions):
                base, q = steps["bf16"](token, pos).float(), steps[form](token, pos).float()
                errors.append(float((q - base).norm() / base.norm()))
                same += int(q.argmax()) == int(base.argmax())
                token = int(base.argmax())
        res["steps"][form] = {"logits_rel_error_median": statistics.median(errors), "logits_rel_error_max": max(errors),
                              "top_token_same": same, "positions": args.positions}
        common.log(f"{form}: {res['steps'][form]}")
    for text in PROMPTS:
        ids = torch.tensor([tok.encode(text)])
        outs = {}
        for form in ("bf16", "int8", "int4"):
            os.environ["MOEKIT_CPU_DENSE"] = form
            outs[form] = model.generate(ids, max_new_tokens=args.new, temperature=0, eos_token_ids=())[0].tolist()
        res["greedy"][text] = {}
        for form in ("int8", "int4"):
            same = [a == b for a, b in zip(outs["bf16"], outs[form])]
            res["greedy"][text][form] = same.index(False) if False in same else args.new
        common.log(f"{text!r}: tokens before the first difference {res['greedy'][text]} of {args.new}")
    os.environ.pop("MOEKIT_CPU_DENSE", None)
    if args.out:
        common.write_json({"meta": common.run_meta(args), **res}, args.out, "cpu_dense_int4_quality")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
