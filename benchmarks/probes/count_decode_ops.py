"""How many kernels one decode step launches, by layer part, counted on the CPU (no GPU needed).

    PYTHONPATH=src python3 benchmarks/probes/count_decode_ops.py --shape deepseek-v2-lite [--fused]

Builds the shape at tiny widths (benchmarks/family_shapes.py; olmoe-1b-7b from profile_decode),
random weights, and runs one decode step at a device-tensor position (the graph-captured path of
generate). Every aten op that would launch a kernel on a GPU (views, allocations and metadata ops
excluded) and every Triton launch is counted under the part of the layer that issued it. With
--fused the step runs the fused Triton path through the interpreter (TRITON_INTERPRET=1 is set
here), so the counts are those of a CUDA step; without it, those of the PyTorch reference. Counts
are per step; "per MoE layer" divides the MoE layers' total by their number. Not what a GPU
launches in two places: each Linear counts one GEMM (the CPU runs moekit's native matvec), and the
routed experts show the CPU expert path's one call where CUDA runs the slot kernels (2-3 a layer).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: family_shapes

# aten ops that launch no kernel on a GPU: views, allocations, metadata
FREE = {"view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "slice", "select", "split",
        "split_with_sizes", "unsqueeze", "squeeze", "as_strided", "alias", "detach", "empty", "empty_like",
        "empty_strided", "new_empty", "chunk", "narrow", "unbind", "lift_fresh", "_to_copy_noop", "unfold",
        "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_reshape_alias",
        "resolve_conj", "resolve_neg", "view_as_real", "promote_types"}


class _Counts(TorchDispatchMode):
    """Counts kernel-launching aten ops under the part named by `part` (a list used as a stack)."""

    def __init__(self, part: list[str], counts: Counter):
        super().__init__()
        self.part, self.counts = part, counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        noop = name in ("to", "_to_copy") and isinstance(out, torch.Tensor) and out.data_ptr() == args[0].data_ptr()
        if self.part[-1] and name not in FREE and not noop:
            self.counts[(self.part[-1], f"{func.namespace}::{name}")] += 1
        return out


def _label(module: torch.nn.Module, name: str, part: list[str], counts: Counter) -> None:
    from moekit.linear import Linear

    def enter(*_):
        part.append(name)
        if isinstance(module, Linear):  # the CPU's native matvec is no aten op; a GPU runs one GEMM
            counts[(name, "gemm::linear")] += 1
    module.register_forward_pre_hook(enter)
    module.register_forward_hook(lambda *_: part.pop() and None)  # a hook's return replaces the output


def _label_method(obj, method: str, name: str, part: list[str]) -> None:
    real = getattr(obj, method)

    def wrapped(*args, **kwargs):
        part.append(name)
        try:
            return real(*args, **kwargs)
        finally:
            part.pop()
    setattr(obj, method, wrapped)


def _count_triton(part: list[str], counts: Counter) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.run

    def run(self, *args, **kwargs):
        counts[(part[-1], "triton::" + self.fn.__name__)] += 1
        part.append("")  # the interpreter's own tensor copies are no launches
        try:
            return real(self, *args, **kwargs)
        finally:
            part.pop()
    InterpretedFunction.run = run


def build(shape: str, layers: int):
    """Returns a tiny MoEModel of `shape` (bf16, as the GPU runs it: its casts count; random weights)."""
    from moekit.model import MoEModel

    if shape == "olmoe-1b-7b":
        import dataclasses

        from profile_decode import olmoe_config
        cfg = dataclasses.replace(olmoe_config(layers), vocab_size=1000, hidden_size=128, num_heads=4,
                                  num_kv_heads=4, head_dim=32, num_experts=8, expert_ffn=64)
    else:
        from family_shapes import hf_config

        from moekit.families import family_for
        data = hf_config(shape, small=True, layers=layers).to_dict()
        cfg = family_for(data).config(data)
    torch.manual_seed(0)
    model = MoEModel(cfg)
    with torch.no_grad():  # moekit.train.init_weights has no rule for MLA's latent norms
        for name, w in model.named_parameters():
            w.fill_(1.0) if "norm" in name else w.normal_(0.0, 0.05)
    return model.to(torch.bfloat16).eval()


@torch.inference_mode()
def count_step(model, fused_path: bool) -> Counter:
    """Returns Counter {(part, op): launches} of one decode step (batch 1, 8 cached positions)."""
    from moekit import fused
    from moekit.kv_cache import KVCache

    fused.ALLOW_INTERPRETER = fused_path
    os.environ["MOEKIT_FUSED"] = "1" if fused_path else "0"
    cfg = model.config
    cache = KVCache(cfg, 1, 16, "cpu", model.dtype)
    model(torch.randint(0, cfg.vocab_size, (1, 8)), cache=cache, start=0)
    part, counts = ["model"], Counter()
    _label(model.lm_head, "model", part, counts)
    for i, layer in enumerate(model.layers):
        kind = "moe" if layer.is_moe else "dense"
        for name, module in layer.named_modules():
            if name and name != "post_norm":  # a hooked post_norm would not fuse with the residual add
                _label(module, f"{kind}.{name}", part, counts)
        if hasattr(layer.attn, "attend"):  # every attention kind: project's own kernels and attend's apart
            _label_method(layer.attn, "project", f"{kind}.attn.project(rest)", part)
            _label_method(layer.attn, "attend", f"{kind}.attn.attend", part)
        _label_method(layer, "forward", f"{kind}.layer(rest)", part)
    _count_triton(part, counts)
    with _Counts(part, counts):
        model(torch.randint(0, cfg.vocab_size, (1, 1)), cache=cache, start=torch.tensor(8))
    return counts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="deepseek-v2-lite", choices=["olmoe-1b-7b", "deepseek-v2-lite", "gpt-oss-20b"])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--fused", action="store_true", help="the fused Triton path (interpreted), as on CUDA")
    p.add_argument("--ops", action="store_true", help="list each part's ops")
    args = p.parse_args()
    model = build(args.shape, args.layers)
    counts = count_step(model, args.fused)
    layers = Counter("moe" if layer.is_moe else "dense" for layer in model.layers)
    by_part = Counter()
    for (part, _), n in counts.items():
        by_part[part] += n
    print(f"{args.shape} ({'fused' if args.fused else 'reference'} path), {layers['moe']} MoE + "
          f"{layers['dense']} dense layers: {sum(counts.values())} launches/step")
    for kind in ("moe", "dense"):
        if not layers[kind]:
            continue
        parts = {k: v for k, v in by_part.items() if k.startswith(kind + ".")}
        print(f"  per {kind} layer: {sum(parts.values()) / layers[kind]:.0f}")
        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            ops = ", ".join(f"{op.split('::')[1]} {n // layers[kind]}" for (pt, op), n in sorted(counts.items())
                            if pt == k) if args.ops else ""
            print(f"    {v / layers[kind]:5.0f}  {k[len(kind) + 1:]}  {ops}")
    print(f"  outside layers: {by_part['model']}")


if __name__ == "__main__":
    main()
