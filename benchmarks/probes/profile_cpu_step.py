"""Where a no-GPU batch-1 decode step's time goes, per checkpoint (issue 12): the native one-call step
(moekit.native.decode), its routed experts' calls alone (the same arguments as the step's last token:
bf16 moekit_moe_decode_bf16, or compressed.cpp's moekit_compressed_moe_decode), and the eager step
(model.forward: PyTorch ops with one native expert call per layer). Each figure is the minimum over
--reps repetitions of --steps steps: on shared cores the minimum is the engine's time, a median the
neighbours' too. Bytes per token (experts read + every other weight) and the rate they imply are
printed beside.

    PYTHONPATH=src .venv/bin/python benchmarks/probes/profile_cpu_step.py /tmp/mk4/bf16 /tmp/mk4/int4
"""

from __future__ import annotations

import argparse
import time

import torch

import moekit
from moekit.kv_cache import KVCache
from moekit.native.decode import CpuDecodeStep


def best_ms(fn, steps: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(steps):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best * 1e3


def weight_bytes(model) -> tuple[int, int]:
    """Returns (bytes of the experts one token reads, bytes of every other weight but the embedding)."""
    experts = other = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ".experts." in name:
            layer = model.layers[int(name.split(".")[1])]  # layers.<i>.mlp.experts.<tensor>
            e = layer.mlp.experts.num_experts
            experts += t.numel() * t.element_size() * layer.mlp.top_k // e if t.shape[0] == e else 0
        elif "rope" not in name and not name.startswith("embed"):  # the embedding: one row a token
            other += t.numel() * t.element_size()
    return experts, other


def profile(path: str, steps: int, reps: int, eager_too: bool) -> str:
    """Returns one checkpoint's table row: the native step, its experts' calls, the rest, the eager step (ms)."""
    model = moekit.load_model(path, dtype=torch.bfloat16)
    cfg = model.config
    span = steps * reps
    cache = KVCache(cfg, 1, 64 + span + 8, "cpu", torch.bfloat16)
    with torch.inference_mode():
        model(torch.randint(0, cfg.vocab_size, (1, 64)), cache=cache, start=0)
        step = CpuDecodeStep(model, cache)
        lib = step.lib
        counter = iter(range(10**9))
        whole = best_ms(lambda i: step(5, 64 + next(counter) % span), steps, reps)

        def experts(_):
            for layer in step.layers:
                if layer[-1] is not None:
                    lib.moekit_compressed_moe_decode(*layer[-1])
                else:
                    lib.moekit_moe_decode_bf16(*layer[-2])
        experts_ms = best_ms(experts, steps, reps)
        eager = float("nan")
        if eager_too:
            eager_cache = KVCache(cfg, 1, 64 + span + 8, "cpu", torch.bfloat16)
            model(torch.randint(0, cfg.vocab_size, (1, 64)), cache=eager_cache, start=0)
            tok = torch.tensor([[5]])
            counter = iter(range(10**9))
            eager = best_ms(lambda i: model(tok, cache=eager_cache, start=64 + next(counter) % span), steps,
                            max(3, reps // 3))
    ex_bytes, other = weight_bytes(model)
    total = ex_bytes + other
    return (f"{str(path)[-28:]:<28} {whole:8.2f} {experts_ms:10.2f} {whole - experts_ms:8.2f} {eager:9.2f} "
            f"{total / 1e6:9.0f} {total / whole / 1e6:6.1f}   (experts {ex_bytes / 1e6:.0f} MB/token, other {other / 1e6:.0f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--no-eager", action="store_true")
    args = parser.parse_args()
    print(f"{'checkpoint':<28} {'step ms':>8} {'experts ms':>10} {'rest ms':>8} {'eager ms':>9} "
          f"{'MB/token':>9} {'GB/s':>6}")
    for path in args.checkpoints:
        print(profile(path, args.steps, args.reps, not args.no_eager))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
