"""Where an offloaded model's device memory goes, stage by stage (allocator peak vs the plan).

    PYTHONPATH=src python3 benchmarks/probes/diag_offload_memory.py

Tiny test model (tests' mixtral variant shape) and the bundled model at small budgets: prints the
planner's split, then torch.cuda.max_memory_allocated after loading, after a prefill, after decode,
and the largest live allocations at the end.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common
import common  # noqa: E402

import moekit  # noqa: E402
from moekit.offload import OffloadConfig  # noqa: E402
from moekit.offload.loader import load_offloaded  # noqa: E402


def mib(n):
    return f"{n / 2**20:8.2f} MiB"


def stage(name, base):
    torch.cuda.synchronize()
    print(f"  {name:28s} peak {mib(torch.cuda.max_memory_allocated() - base)}  live {mib(torch.cuda.memory_allocated() - base)}",
          flush=True)


def main():
    path = moekit.default_model_path()
    tok = moekit.load_tokenizer(path)
    ids = torch.tensor([tok.encode("def fibonacci(n):\n    ")], device="cuda")
    for budget_mb in (80, 120):  # the planner's floor for this model is ~76 MiB (64 MiB of it CUDA reserve)
        common.free_memory("cuda", reset_peak=True)
        base = torch.cuda.memory_allocated()
        budget = budget_mb * 2**20
        print(f"budget {budget_mb} MiB (base {mib(base)})", flush=True)
        try:
            model = load_offloaded(path, device="cuda", dtype=torch.bfloat16,
                                   offload=OffloadConfig(device_memory=budget, context_tokens=64, predictor="none"))
        except moekit.MoekitError as e:
            print("  refused:", e)
            continue
        print("  plan:", json.dumps(model.offload.report()["plan"]))
        stage("after load", base)
        with torch.inference_mode():
            model(ids, last_only=True)
        stage("after one prefill forward", base)
        model.generate(ids, max_new_tokens=1)
        stage("after generate(1) (KV cache + prefill)", base)
        model.generate(ids, max_new_tokens=2)
        stage("after generate(2) (one decode step)", base)
        model.generate(ids, max_new_tokens=16)
        stage("after generate(16)", base)
        rep = model.offload.report()
        print(f"  runtime peak_device_bytes {mib(rep['peak_device_bytes'])} vs budget {mib(budget)}")
        snap = torch.cuda.memory_snapshot()
        blocks = sorted(((b["size"], b["state"]) for seg in snap for b in seg["blocks"] if b["state"] == "active_allocated"),
                        reverse=True)[:12]
        print("  largest live blocks:", [mib(sz).strip() for sz, _ in blocks])
        print("  cuda reserved", mib(torch.cuda.memory_reserved()))
        del model
    print(torch.cuda.memory_summary(abbreviated=True)[:3000])


if __name__ == "__main__":
    main()
