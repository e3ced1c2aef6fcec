"""Compression benchmark (QMoE pillar), one script for the GPU machine:

1. kernels: fused decode+matmul (sub-1-bit ternary code) and dequant+matmul (int4, int2) vs torch
   bf16 F.linear vs the HBM floor (stored bytes / 4.2 TB/s), at the mixtral-8x7b and
   qwen3-30b-a3b expert matrices, batch 1..64; L2 is flushed before every timed call.
2. decode tok/s of a model with resident experts (qwen3-30b-a3b layer shape: hidden 2048, 128
   experts top-8, ffn 768, fewer layers; random weights built on the device, experts rounded to
   nearest): bf16 vs int4 (group 128) vs the sub-1-bit ternary code, CUDA graphs on, next to the
   HBM bound (bytes read per step / 4.2 TB/s) and to the compressed model's grouped path (one
   host sync per layer, per-expert launches: what ran before the per-slot kernels) in the same run.
3. compression wall time per billion expert parameters on the olmoe-1b-7b expert shape (hidden
   2048, 64 experts top-8, ffn 1024) with random weights: 2 layers are compressed, and the
   time per layer is extrapolated to 16 layers (stated as such in the JSON).
4. held-out perplexity of examples/tiny-moe at ternary / 2 / 3 / 4 bits, GPTQ vs RTN, bits per
   expert parameter; calibration on the training split of the CPython stdlib (train_tiny's
   split), evaluation on its held-out files, never the other way round.
5. rate of the sub-1-bit code (CPU, seconds): bits/param on synthetic ternary rows (25% nonzeros,
   row densities equal or spread +-30%) at K=512 and 4096, next to the memoryless entropy bound
   and to the version-1 layout (every row padded to the longest row's chunks; computed from the
   same parse at its best chunk width).

    cd repo && PYTHONPATH=src python3 benchmarks/bench_compress.py --out $OUT
    PYTHONPATH=src python3 benchmarks/bench_compress.py --phases decode --out $OUT   (decode rows only, ~2 min)
    PYTHONPATH=src python3 benchmarks/bench_compress.py --device cpu --small --out /tmp/b   (smoke test)

Each phase is wrapped in try/except; the JSON is rewritten after every phase.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from common import HBM_BYTES_PER_S, log, nbytes

sys.path.insert(0, str(common.REPO / "examples"))

import moekit  # noqa: E402
from moekit.quant import ops  # noqa: E402
from moekit.quant.code import (CHUNKS, build_dictionary, choose_dictionary, code_bits, encode, entropy_bits,  # noqa: E402
                               symbol_probabilities)
from moekit.quant.gptq import rtn_quantize  # noqa: E402
from moekit.quant.grids import IntGrid, TernaryGrid, pack_codes  # noqa: E402

SHAPES = {  # (rows R, columns K) of x @ W^T, W [R, K]
    "mixtral-8x7b gate/up (14336x4096)": (14336, 4096),
    "mixtral-8x7b down (4096x14336)": (4096, 14336),
    "qwen3-30b-a3b gate/up (768x2048)": (768, 2048),
    "qwen3-30b-a3b down (2048x768)": (2048, 768),
}
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def phase_kernels(device: torch.device, small: bool) -> dict:
    def timer(fn, reps: int = 25) -> float:  # single calls between CUDA events, L2 flushed before each
        return common.median_s(fn, device, reps=reps, warmup=3, flush_l2=True)

    shapes = {"small 96x256": (96, 256), "small 256x96": (256, 96)} if small else SHAPES
    batches = (1, 4, 64) if small else BATCHES
    use_kernels = device.type == "cuda"
    results = {}
    for name, (rows, cols) in shapes.items():
        log(f"kernels: {name}")
        g = torch.Generator(device="cpu").manual_seed(0)
        w = (torch.randn(rows, cols, generator=g) * 0.02)
        w_bf16 = w.to(device, torch.bfloat16)
        t_enc = time.perf_counter()
        tq = rtn_quantize(w[None].to(device), TernaryGrid())
        probs = symbol_probabilities(tq.codes)
        d = build_dictionary(probs, 8)
        code = encode(tq.codes[0], d)
        t_enc = time.perf_counter() - t_enc
        lo, hi = tq.params[0][0, :, 0].half(), tq.params[1][0, :, 0].half()
        table = d.table.to(device)
        code_parts = (*code, lo, hi, table)
        ints = {}
        for bits in (4, 2):
            q = rtn_quantize(w[None].to(device), IntGrid(bits, 128))
            ints[bits] = (pack_codes(q.codes[0], bits), q.params[0][0].half(), q.params[1][0].to(torch.uint8))
        entry = {"rows": rows, "cols": cols, "p_zero": probs[0], "entropy_bits": entropy_bits(probs),
                 "code_bits_per_param": 8 * nbytes(*code_parts) / (rows * cols), "encode_s": round(t_enc, 2),
                 "bf16_bytes": nbytes(w_bf16), "code_bytes": nbytes(*code_parts),
                 "int4_g128_bytes": nbytes(*ints[4]), "int2_g128_bytes": nbytes(*ints[2]), "batches": {}}
        # correctness on this device: kernel vs reference at batch 4
        x = torch.randn(4, cols, device=device, dtype=torch.bfloat16)
        ref = ops.code_linear_reference(x.float(), *code_parts)
        got = (ops.code_linear_triton(x, *code_parts) if use_kernels else ref).float()
        entry["code_kernel_max_rel_err"] = float((got - ref).abs().max() / ref.abs().max())
        if use_kernels:  # the tiles the kernels use (ops.CODE_TUNED, from tune_quant_kernels.py)
            entry["code_tiles"] = {b: list(ops.code_config(rows, cols, b)) for b in batches}
        for b in batches:
            x = torch.randn(b, cols, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            wx = w_bf16 if device.type == "cuda" else w_bf16.float()
            row = {"bf16_s": timer(lambda: F.linear(x, wx))}
            if use_kernels:
                row["code_s"] = timer(lambda: ops.code_linear_triton(x, *code_parts))
                row["int4_s"] = timer(lambda: ops.int_linear_triton(x, *ints[4], 4))
                row["int2_s"] = timer(lambda: ops.int_linear_triton(x, *ints[2], 2))
            else:
                row["code_s"] = timer(lambda: ops.code_linear_reference(x, *code_parts), reps=3)
                row["int4_s"] = timer(lambda: ops.int_linear_reference(x, *ints[4], 4), reps=3)
            row["code_floor_s"] = entry["code_bytes"] / HBM_BYTES_PER_S
            row["bf16_floor_s"] = entry["bf16_bytes"] / HBM_BYTES_PER_S
            row["int4_floor_s"] = entry["int4_g128_bytes"] / HBM_BYTES_PER_S
            row["code_speedup_vs_bf16"] = row["bf16_s"] / row["code_s"]
            row["bf16_GBps"] = entry["bf16_bytes"] / row["bf16_s"] / 1e9
            row["code_GBps_stored"] = entry["code_bytes"] / row["code_s"] / 1e9
            entry["batches"][b] = row
            log(f"  batch {b}: bf16 {row['bf16_s'] * 1e6:.1f} us, code {row['code_s'] * 1e6:.1f} us "
                f"(floor {row['code_floor_s'] * 1e6:.1f} us), x{row['code_speedup_vs_bf16']:.2f}")
        results[name] = entry
        del w_bf16, code_parts, ints
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"kernel_path": "triton" if use_kernels else "pytorch reference (no CUDA)", "shapes": results}


DECODE_SHAPE = dict(layers=8, hidden=2048, experts=128, top_k=8, ffn=768, heads=32, kv_heads=4, head_dim=128,
                    vocab=151936)  # qwen3-30b-a3b's layer, attention and vocab, 8 of its 48 layers
DECODE_SMALL = dict(layers=2, hidden=64, experts=8, top_k=2, ffn=32, heads=4, kv_heads=2, head_dim=16, vocab=256)
DECODE_FORMS = {"int4-g128": ("4", 128), "ternary-code": ("ternary", None)}


def random_device_model(shape: dict, device: torch.device) -> torch.nn.Module:
    """Returns a bf16 MoEModel of `shape` with normal(0, 0.02) weights drawn on the device (no
    checkpoint: the experts of a real one would be as fast to run, and 8 layers take ~20 GB)."""
    from moekit.config import ModelConfig
    from moekit.model import MoEModel

    cfg = ModelConfig(family="qwen3_moe", vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                      num_layers=shape["layers"], num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
                      head_dim=shape["head_dim"], num_experts=shape["experts"], top_k=shape["top_k"],
                      expert_ffn=shape["ffn"], moe_layers=(True,) * shape["layers"], max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = MoEModel(cfg).to(torch.bfloat16)
    model.inv_freq = model.inv_freq.float()  # rope frequencies stay float32, as load_model keeps them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02 / (2 * shape["layers"]) ** 0.5 if name.endswith(("down", "o_proj.weight")) else 0.02)
    return model.eval()


def decode_step_bytes(model, expert_bytes: int) -> int:
    """Returns the bytes one batch-1 decode step reads: every weight but the experts and the
    embedding (one row), plus top_k experts per layer in their stored form."""
    cfg = model.config
    dense = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                if ".experts." not in name and not name.startswith("embed."))
    return dense + cfg.hidden_size * 2 + cfg.num_layers * cfg.top_k * expert_bytes


def phase_decode(device: torch.device, small: bool, steps: int | None = None) -> dict:
    from moekit.experts import ResidentExperts
    from moekit.generate import GenerationStats
    from moekit.quant import formats
    from moekit.quant.compress import round_layer
    from moekit.quant.config import QuantConfig

    shape = DECODE_SMALL if small else DECODE_SHAPE
    steps = steps or (8 if small else 128)
    use_graph = device.type == "cuda"
    log(f"decode: building a random model {shape} on {device}")
    model = random_device_model(shape, device)
    dense = [layer.mlp.experts for layer in model.layers]
    prompt = torch.randint(0, shape["vocab"], (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    out: dict = {"shape": shape, "new_tokens": steps, "cuda_graph": use_graph,
                 "note": f"{shape['layers']} layers: per-token time = fixed (embedding, lm_head) + layers x per-layer; "
                         "random weights, experts rounded to nearest (GPTQ'd ones decode alike)", "rows": {}}

    def measure(label: str, expert_bytes: int) -> None:
        runs = []
        for _ in range(3):
            stats = GenerationStats()
            model.generate(prompt, max_new_tokens=steps, temperature=0, eos_token_ids=(), cuda_graph=use_graph,
                           stats=stats)
            runs.append(stats)
        tok_s = sorted(s.decode_tok_s for s in runs)[1]
        step_bytes = decode_step_bytes(model, expert_bytes)
        ceiling = HBM_BYTES_PER_S / step_bytes
        graph = ("piecewise" if runs[-1].extra.get("graph") == "piecewise" else "whole step") if runs[-1].cuda_graph \
            else "eager"
        out["rows"][label] = {"tok_s": tok_s, "ms_per_token": 1e3 / tok_s if tok_s else None, "graph": graph,
                              "expert_bytes": expert_bytes, "step_bytes": step_bytes, "hbm_bound_tok_s": ceiling,
                              "weight_GBps": step_bytes * tok_s / 1e9, "runs_tok_s": [s.decode_tok_s for s in runs]}
        log(f"  {label}: {tok_s:.1f} tok/s ({graph}), HBM bound {ceiling:.0f} tok/s ({step_bytes / 1e6:.1f} MB/step)")

    measure("bf16", dense[0].expert_bytes())
    for label, (bits, group) in DECODE_FORMS.items():
        quant = QuantConfig(bits=bits, group_size=group, method="rtn")
        for layer, src in zip(model.layers, dense):
            tensors = {k: v.to(device) for k, v in round_layer(src.gate_up.float(), src.down.float(), quant).items()}
            layer.mlp.experts = formats.build_experts(quant.form, src.num_experts, src.hidden, src.ffn, tensors, bits)
        expert_bytes = model.layers[0].mlp.experts.expert_bytes()
        measure(label, expert_bytes)
        if use_graph:  # the path before the per-slot kernels: grouped, a host sync per layer
            slot_max = formats.SLOT_KERNEL_MAX_SLOTS
            formats.SLOT_KERNEL_MAX_SLOTS = 0
            try:
                measure(f"{label} grouped (before)", expert_bytes)
            finally:
                formats.SLOT_KERNEL_MAX_SLOTS = slot_max
        for layer in model.layers:  # free the compressed layers before the next form
            layer.mlp.experts = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for layer, src in zip(model.layers, dense):
        layer.mlp.experts = src
    assert all(isinstance(src, ResidentExperts) for src in dense)
    return out


def random_moe_checkpoint(path: Path, layers: int, hidden: int, experts: int, top_k: int, ffn: int,
                          heads: int, vocab: int) -> moekit.ModelConfig:
    """Writes a random-weight mixtral-layout checkpoint (bf16) and returns its config."""
    from moekit.config import ModelConfig
    from moekit.model import MoEModel
    from moekit.save import save_model
    from moekit.train import init_weights

    cfg = ModelConfig(family="mixtral", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      num_kv_heads=heads, head_dim=hidden // heads, num_experts=experts, top_k=top_k,
                      expert_ffn=ffn, moe_layers=(True,) * layers, max_position_embeddings=4096)
    model = init_weights(MoEModel(cfg))
    save_model(model, path, dtype=torch.bfloat16)
    return cfg


def phase_compress_time(device: torch.device, small: bool, tmp: Path) -> dict:
    from moekit.quant.compress import compress
    from moekit.quant.config import QuantConfig

    shape = dict(layers=2, hidden=128, experts=8, top_k=2, ffn=64, heads=4, vocab=512) if small else \
        dict(layers=2, hidden=2048, experts=64, top_k=8, ffn=1024, heads=16, vocab=4096)
    full_layers = 16
    log(f"compress time: writing a random checkpoint {shape}")
    src = tmp / "olmoe-shape"
    cfg = random_moe_checkpoint(src, **shape)
    samples, seqlen = (8, 64) if small else (128, 512)
    calib = torch.randint(0, shape["vocab"], (samples, seqlen), generator=torch.Generator().manual_seed(0))
    out: dict = {"shape": shape, "calibration_tokens": samples * seqlen, "expert_params": cfg.expert_params,
                 "note": f"{shape['layers']} of olmoe-1b-7b's {full_layers} layers compressed (random weights, vocab "
                         f"{shape['vocab']}); per-layer time extrapolated linearly to {full_layers} layers",
                 "runs": {}}
    for bits, method in (("ternary", "gptq"), ("4", "gptq"), ("4", "rtn")):
        log(f"compress time: {method} {bits}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = compress(src, tmp / f"olmoe-{bits}-{method}", QuantConfig(bits=bits, method=method,
                     group_size=None if bits == "ternary" else 128), calib if method == "gptq" else None,
                     device=device, progress=False)
        seconds = time.perf_counter() - t
        per_b = seconds / (cfg.expert_params / 1e9)
        out["runs"][f"{method}-{bits}"] = {
            "seconds": round(seconds, 2), "seconds_per_billion_expert_params": round(per_b, 2),
            "extrapolated_full_model_s": round(seconds / shape["layers"] * full_layers, 1),
            "bits_per_expert_param": r.bits_per_expert_param, "failed_factorisations": r.failed_factorisations,
            "layer_seconds": [l.seconds for l in r.layers], "entropy_bits": r.entropy_bits}
        log(f"  {seconds:.1f} s, {per_b:.1f} s per billion expert params, {r.bits_per_expert_param:.3f} bits/param")
    return out


def stdlib_split(small: bool) -> tuple[list[str], list[str]]:
    from train_tiny import is_held_out, stdlib_files

    _, files = stdlib_files(60 if small else None)
    train = [t for p, t in files if not is_held_out(p)]
    held = [t for p, t in files if is_held_out(p)]
    if small and not held:
        held = [t for _, t in files[-3:]]
        train = [t for _, t in files[:-3]]
    return train, held


def phase_perplexity(device: torch.device, small: bool, tmp: Path) -> dict:
    from moekit.calibrate import calibration_tokens
    from moekit.data import text_tokens
    from moekit.quant.compress import compress
    from moekit.quant.config import QuantConfig
    from moekit.train import evaluate_perplexity

    src = moekit.default_model_path()
    tok = moekit.load_tokenizer(src)
    train, held = stdlib_split(small)
    samples, seqlen = (8, 128) if small else (128, 512)
    calib = calibration_tokens(train, tok, samples, seqlen, seed=0)
    held_ids = text_tokens(held, tok)
    if small:
        held_ids = held_ids[:2048]
    log(f"perplexity: {len(train)} train files, {len(held)} held-out files ({held_ids.numel()} tokens)")

    def ppl(path: Path) -> float:
        model = moekit.load_model(path, device=device, dtype=torch.float32)
        return evaluate_perplexity(model, held_ids, seqlen=512)[0]

    out: dict = {"model": "examples/tiny-moe (7.5M params, trained by examples/train_tiny.py)",
                 "calibration": f"{samples} x {seqlen} tokens from the stdlib training files",
                 "held_out_tokens": int(held_ids.numel()), "dense_bf16": {"perplexity": ppl(src), "bits": 16.0},
                 "runs": {}}
    log(f"  dense: {out['dense_bf16']['perplexity']:.3f}")
    grids = ("ternary", "4") if small else ("ternary", "2", "3", "4")
    for bits in grids:
        for method in ("gptq", "rtn"):
            key = f"{method}-{bits}"
            try:
                dst = tmp / f"tiny-{key}"
                r = compress(src, dst, QuantConfig(bits=bits, method=method), calib if method == "gptq" else None,
                             device=device, progress=False)
                out["runs"][key] = {"perplexity": ppl(dst), "bits_per_expert_param": r.bits_per_expert_param,
                                    "entropy_bits": r.entropy_bits, "failed_factorisations": r.failed_factorisations,
                                    "compress_s": r.seconds}
                log(f"  {key}: ppl {out['runs'][key]['perplexity']:.3f}, {r.bits_per_expert_param:.3f} bits/param")
            except Exception as e:  # one grid failing must not lose the others
                out["runs"][key] = {"error": f"{type(e).__name__}: {e}"}
                log(f"  {key}: FAILED {e}")
    return out


def phase_rate(small: bool) -> dict:
    """Bits/param of the code on synthetic ternary rows vs the entropy bound and the padded layout."""
    rows = 256 if small else 1024
    out = {"rows": rows, "nonzero_share": 0.245, "runs": {}}
    for cols in (512, 4096):
        for spread in (0.0, 0.3):
            g = torch.Generator().manual_seed(0)
            density = 0.245 * (1 + spread * (2 * torch.rand(rows, 1, generator=g) - 1))
            nonzero = torch.rand(rows, cols, generator=g) < density
            codes = torch.where(nonzero, torch.randint(1, 3, (rows, cols), generator=g), 0).to(torch.uint8)
            probs = symbol_probabilities(codes)
            d = choose_dictionary(probs, codes.numel(), rows)
            word_bytes, start_bytes = (1 if d.bits <= 8 else 2), (2 if cols <= 32767 else 4)
            padded = min(8 * rows * int(encode(codes, d, w).row_chunks.max()) * (w * word_bytes + start_bytes)
                         / codes.numel() for w in CHUNKS)  # version 1: rows x the longest row's chunks
            code = encode(codes, d)
            key = f"K={cols}, densities ±{spread:.0%}"
            out["runs"][key] = {"entropy_bits": entropy_bits(probs), "bits_per_param": code_bits(code, cols),
                                "padded_rows_bits_per_param": padded, "codeword_bits": d.bits,
                                "chunk": code.codewords.shape[-1]}
            r = out["runs"][key]
            log(f"  {key}: {r['bits_per_param']:.3f} bits/param (rows padded to the longest: {padded:.3f}; "
                f"entropy {r['entropy_bits']:.3f})")
    return out


def markdown(results: dict) -> str:
    lines = []
    rate = results.get("rate", {}).get("runs", {})
    if rate:
        lines += ["| code rate (synthetic rows) | bits/param | rows padded to the longest (v1) | entropy bound | vs bound |",
                  "|---|---|---|---|---|"]
        for key, r in rate.items():
            lines.append(f"| {key} | {r['bits_per_param']:.3f} | {r['padded_rows_bits_per_param']:.3f} | "
                         f"{r['entropy_bits']:.3f} | {r['bits_per_param'] / r['entropy_bits']:.2f}x |")
        lines.append("")
    k = results.get("kernels", {}).get("shapes", {})
    if k:
        lines += ["| shape | batch | bf16 us | code us | code floor us | code vs bf16 | int4 us | code bits/param |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, e in k.items():
            for b, r in e["batches"].items():
                lines.append(f"| {name} | {b} | {r['bf16_s'] * 1e6:.1f} | {r['code_s'] * 1e6:.1f} | "
                             f"{r['code_floor_s'] * 1e6:.1f} | {r['code_speedup_vs_bf16']:.2f}x | "
                             f"{r.get('int4_s', float('nan')) * 1e6:.1f} | {e['code_bits_per_param']:.3f} |")
    dec = results.get("decode", {}).get("rows", {})
    if dec:
        base = dec.get("bf16", {}).get("tok_s")
        lines += ["", "| decode, batch 1 (resident experts) | tok/s | HBM bound tok/s | % of bound | vs bf16 | graph |",
                  "|---|---|---|---|---|---|"]
        for key, r in dec.items():
            vs = f"{r['tok_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {key} | {r['tok_s']:.1f} | {r['hbm_bound_tok_s']:.0f} | "
                         f"{100 * r['tok_s'] / r['hbm_bound_tok_s']:.0f}% | {vs} | {r['graph']} |")
    c = results.get("compress_time", {}).get("runs", {})
    if c:
        lines += ["", "| compress (olmoe shape) | s | s / B expert params | 16-layer extrapolation s | bits/param |",
                  "|---|---|---|---|---|"]
        for key, r in c.items():
            lines.append(f"| {key} | {r['seconds']} | {r['seconds_per_billion_expert_params']} | "
                         f"{r['extrapolated_full_model_s']} | {r['bits_per_expert_param']:.3f} |")
    p = results.get("perplexity", {})
    if p.get("runs"):
        lines += ["", "| tiny-moe held-out | perplexity | bits / expert param |", "|---|---|---|",
                  f"| bf16 | {p['dense_bf16']['perplexity']:.3f} | 16 |"]
        for key, r in p["runs"].items():
            if "error" in r:
                lines.append(f"| {key} | error | - |")
            else:
                lines.append(f"| {key} | {r['perplexity']:.3f} | {r['bits_per_expert_param']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_output_args(ap, "bench_compress")
    ap.add_argument("--small", action="store_true", help="tiny shapes: a CPU smoke test of the script")
    ap.add_argument("--phases", default="rate,kernels,decode,compress_time,perplexity")
    ap.add_argument("--decode-steps", type=int, default=None, help="new tokens per decode run (default 128)")
    args = ap.parse_args()
    device = torch.device(args.device)
    meta = common.run_meta(args, device)
    results: dict = {"date": meta["date"], "commit": meta["commit"], "dirty": meta["dirty"], "small": args.small,
                     "device": common.device_name(device), "torch": torch.__version__, "command": meta["command"],
                     "hbm_bytes_per_s": HBM_BYTES_PER_S, "meta": meta}
    tmp = Path(tempfile.mkdtemp(prefix="bench_compress-"))
    phases = {"rate": lambda: phase_rate(args.small),
              "kernels": lambda: phase_kernels(device, args.small),
              "decode": lambda: phase_decode(device, args.small, args.decode_steps),
              "compress_time": lambda: phase_compress_time(device, args.small, tmp),
              "perplexity": lambda: phase_perplexity(device, args.small, tmp)}
    json_path = common.write_json(results, args.out, "bench_compress")
    for name in args.phases.split(","):
        t = time.perf_counter()
        log(f"phase {name}")
        try:
            results[name] = phases[name]()
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            log(f"phase {name} FAILED: {e}")
        results.setdefault("phase_seconds", {})[name] = round(time.perf_counter() - t, 1)
        common.write_json(results, args.out, "bench_compress")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    print(markdown(results), flush=True)
    log(f"wrote {json_path}")


if __name__ == "__main__":
    main()
