"""`compress`: quantize a checkpoint's routed experts (GPTQ or round-to-nearest) and write a
moekit-compressed checkpoint; attention, routers, embeddings and shared experts stay as they are.

GPTQ calibrates block by block (moekit.calibrate): at each MoE layer the gate_up matrices of a
group of experts are quantized together from the Hessians of their routed inputs, then the down
matrices from the inputs the *quantized* gate_up produces, and the layer's stored form replaces
its dense experts before the layer's outputs feed the next block. The output directory appears
only when complete (save.write_checkpoint writes to a temporary sibling and renames it).

Shape legend: E = experts, G = experts in a group, I = expert ffn, D = hidden, R/K = rows/columns
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..calibrate import MoELayerInputs, run_calibration
from ..checkpoint import INDEX_FILE, Checkpoint, parse_device
from ..errors import MoekitError
from ..experts.clamped import BIASES, BiasedCompressedForm, ClampedExperts, dense_matrices, expert_hidden
from ..experts.clamped import build_resident as build_clamped
from ..experts.loader import LoadContext
from ..load import fill_stacked_experts, read_config
from ..outputs import check_replaceable
from ..save import write_checkpoint
from . import code as codec
from .config import INT, QuantConfig
from .formats import CompressedExperts, build_experts
from .gptq import QuantizedGroup, gptq_quantize, hessian, rtn_quantize
from .grids import make_grid, pack_codes
from .loader import experts_prefix


@dataclass
class LayerReport:
    layer: int
    seconds: float
    failed_factorisations: int  # experts rounded because their Hessian would not factorise
    experts_without_tokens: int  # experts no calibration token reached (rounded)
    tokens_min: int = 0  # fewest / most calibration tokens routed to one expert
    tokens_max: int = 0
    p_zero: float | None = None  # ternary: share of zero symbols
    entropy_bits: float | None = None  # ternary: memoryless entropy of the symbols (bits/param)
    codeword_bits: int | None = None  # ternary: the dictionary's codeword width


@dataclass
class CompressReport:
    source: str
    out: str
    quant: dict
    expert_params: int
    expert_bytes: int
    other_bytes: int
    bits_per_expert_param: float
    source_expert_bytes: int
    failed_factorisations: int
    experts_without_tokens: int
    calibration_tokens: int
    seconds: float
    entropy_bits: float | None = None  # ternary: bound of the symbol stream (weighted over layers)
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _store(quant: QuantConfig, codes: dict[str, QuantizedGroup]) -> tuple[dict[str, torch.Tensor], dict]:
    """Returns (stored tensors of one layer, ternary code statistics) for its quantized matrices."""
    out: dict[str, torch.Tensor] = {}
    stats: dict = {}
    if quant.form == INT:
        bits = int(quant.bits)
        for kind, q in codes.items():
            out[f"{kind}.qweight"] = pack_codes(q.codes, bits)
            out[f"{kind}.scale"] = q.params[0].half()
            out[f"{kind}.zero"] = q.params[1].to(torch.uint8)
        return out, stats
    symbols = torch.cat([q.codes.reshape(-1) for q in codes.values()])
    probs = codec.symbol_probabilities(symbols)
    rows = sum(q.codes.shape[0] * q.codes.shape[1] for q in codes.values())
    d = codec.choose_dictionary(probs, symbols.numel(), rows)
    for kind, q in codes.items():
        for name, t in codec.encode(q.codes, d)._asdict().items():
            out[f"{kind}.{name}"] = t
        out[f"{kind}.lo"], out[f"{kind}.hi"] = q.params[0][..., 0].half(), q.params[1][..., 0].half()
    out["code_table"] = d.table
    stats = dict(p_zero=probs[0], entropy_bits=codec.entropy_bits(probs), codeword_bits=d.bits)
    return out, stats


def _quantize_rtn(weights: dict[str, torch.Tensor], quant: QuantConfig) -> dict[str, QuantizedGroup]:
    grid = make_grid(quant.bits, quant.group_size)
    return {kind: rtn_quantize(w, grid) for kind, w in weights.items()}


def round_layer(gate_up: torch.Tensor, down: torch.Tensor, quant: QuantConfig) -> dict[str, torch.Tensor]:
    """Returns one layer's stored tensors (named as quant.formats names them) of dense experts
    gate_up [E, 2I, D] and down [E, D, I] rounded to nearest on `quant`'s grid (no calibration)."""
    return _store(quant, _quantize_rtn({"gate_up": gate_up, "down": down}, quant))[0]


def _gptq_group(w: torch.Tensor, inputs: list[torch.Tensor], quant: QuantConfig) -> QuantizedGroup:
    grid = make_grid(quant.bits, quant.group_size)
    h = torch.stack([hessian(x) for x in inputs])
    return gptq_quantize(w, h, grid, damp=quant.damp)


def _cat_groups(parts: list[QuantizedGroup]) -> QuantizedGroup:
    return QuantizedGroup(torch.cat([p.codes for p in parts]),
                          tuple(torch.cat([p.params[j] for p in parts]) for j in range(2)),  # type: ignore[arg-type]
                          torch.cat([p.failed for p in parts]), torch.cat([p.no_tokens for p in parts]))


def _quantize_gptq(layer: MoELayerInputs, quant: QuantConfig, device: torch.device) -> tuple[dict, CompressedExperts | None]:
    """Returns the layer's quantized matrices: gate_up from the routed inputs, then down from the
    inputs the quantized gate_up gives (so down corrects gate_up's error)."""
    dense = layer.block.experts
    num_experts, ffn = dense.num_experts, dense.ffn
    cap, batch = quant.max_tokens_per_expert, quant.expert_batch
    clamped = isinstance(dense, ClampedExperts)  # gpt-oss: biases, clamped SwiGLU, maybe MXFP4
    gate_up_w, down_w = dense_matrices(dense) if clamped else (dense.gate_up, dense.down)
    xs = [layer.expert_inputs(e, cap).to(device) for e in range(num_experts)]  # [n_e, D] each
    gate_up = _cat_groups([_gptq_group(gate_up_w[g:g + batch].float(), xs[g:g + batch], quant)
                           for g in range(0, num_experts, batch)])
    gate_up_q = gate_up.dequantize(make_grid(quant.bits, quant.group_size))  # [E, 2I, D]
    hs = []
    for e in range(num_experts):
        if clamped:
            hs.append(expert_hidden(dense, e, xs[e], gate_up_q[e]))
            continue
        g, u = F.linear(xs[e], gate_up_q[e]).split(ffn, dim=-1)
        hs.append(F.silu(g) * u)  # [n_e, I]
    down = _cat_groups([_gptq_group(down_w[g:g + batch].float(), hs[g:g + batch], quant)
                        for g in range(0, num_experts, batch)])
    return {"gate_up": gate_up, "down": down}, None


class _Compressor:
    """Quantizes layer after layer and keeps each layer's stored tensors (host memory) until the write."""

    def __init__(self, quant: QuantConfig, cfg, device: torch.device):
        self.quant, self.cfg, self.device = quant, cfg, device
        self.stored: dict[int, dict[str, torch.Tensor]] = {}
        self.layers: list[LayerReport] = []

    def finish_layer(self, layer: int, codes: dict[str, QuantizedGroup], start: float,
                     tokens: list[int] | None, biases: dict[str, torch.Tensor] | None = None) -> CompressedExperts:
        """Keeps the layer's stored tensors (and gpt-oss's expert `biases`, stored beside them) and
        returns them as an expert source for the layers calibrated after it."""
        tensors, stats = _store(self.quant, codes)
        if biases:
            tensors.update({k: v.detach().float() for k, v in biases.items()})
        self.stored[layer] = {k: v.cpu() for k, v in tensors.items()}
        failed = int(sum(q.failed.sum().item() for q in codes.values()))
        empty = int(codes["gate_up"].no_tokens.sum().item())
        self.layers.append(LayerReport(layer, round(time.perf_counter() - start, 3), failed, empty,
                                       min(tokens) if tokens else 0, max(tokens) if tokens else 0, **stats))
        cfg = self.cfg
        on_device = {k: v.to(self.device) for k, v in tensors.items()}
        experts = build_experts(self.quant.form, cfg.experts_in(layer), cfg.hidden_size, cfg.expert_ffn,
                                {k: v for k, v in on_device.items() if k not in BIASES}, self.quant.bits)
        if not biases:
            return experts
        form = BiasedCompressedForm.of(experts.form, cfg, torch.float32)
        return CompressedExperts(form, layer, cfg.experts_in(layer), on_device)

    def on_moe_layer(self, layer: MoELayerInputs) -> CompressedExperts:
        start = time.perf_counter()
        codes, _ = _quantize_gptq(layer, self.quant, self.device)
        tokens = layer.tokens_per_expert()
        if self.quant.max_tokens_per_expert:
            tokens = [min(t, self.quant.max_tokens_per_expert) for t in tokens]
        return self.finish_layer(layer.layer, codes, start, tokens, _biases(layer.block.experts))


def compress(src: str | Path, out: str | Path, quant: QuantConfig, calib_tokens: torch.Tensor | None = None,
             device: str | torch.device = "cpu", progress: bool | None = None, overwrite: bool = False,
             batch: int = 8) -> CompressReport:
    """Returns the report of compressing the checkpoint at `src` into `out` (see the module docstring).

    calib_tokens [S, T] are required for GPTQ, unused by RTN."""
    t0 = time.perf_counter()
    device = parse_device(device)
    out = Path(out)
    check_replaceable(out, overwrite)  # the writer's own rule, checked before the work
    ckpt, family, cfg = read_config(src)
    if cfg.num_moe_layers == 0:
        raise MoekitError(f"{ckpt.path}: the model has no MoE layers: nothing to compress")
    quant.check_shapes(cfg.hidden_size, cfg.expert_ffn)
    comp = _Compressor(quant, cfg, device)
    disable = not sys.stderr.isatty() if progress is None else not progress
    tokens = 0
    if quant.method == "gptq":
        if calib_tokens is None:
            raise MoekitError("GPTQ needs calibration text: give --calib PATH (text, JSONL or a folder), "
                              "or use --method rtn")
        tokens = calib_tokens.numel()
        run_calibration(src, calib_tokens, comp.on_moe_layer, device=device, batch=batch, progress=progress)
    else:
        d, i = cfg.hidden_size, cfg.expert_ffn
        for layer in tqdm([l for l, m in enumerate(cfg.moe_layers) if m], desc="rounding", unit="layer",
                          disable=disable):
            start = time.perf_counter()
            e = cfg.experts_in(layer)  # after global pruning, layers keep different counts
            biases = None
            if cfg.plain_experts:
                gate_up, down = torch.empty(e, 2 * i, d), torch.empty(e, d, i)
                fill_stacked_experts(gate_up, down, ckpt, family, cfg, layer)
            else:  # gpt-oss: dense or MXFP4 experts read in their own form, biases kept beside the codes
                source = build_clamped(LoadContext(ckpt, family, cfg, torch.device("cpu"), torch.float32), layer)
                (gate_up, down), biases = dense_matrices(source), _biases(source)
            codes = _quantize_rtn({"gate_up": gate_up.to(device), "down": down.to(device)}, quant)
            comp.finish_layer(layer, codes, start, None, biases)
    config = dict(ckpt.config)
    config["quantization_config"] = {**quant.to_dict(), "calibration_tokens": tokens}
    expert_bytes = sum(t.numel() * t.element_size() for s in comp.stored.values() for t in s.values())
    expert_names = _dense_expert_names(ckpt, family, cfg)
    source_expert_bytes = sum(_nbytes(ckpt, n) for n in expert_names)
    # FP8 sources: every weight is read dequantized, so its block scales are not copied
    other = [n for n in ckpt.names() if n not in expert_names and not ckpt.is_fp8_scale(n)]
    other_bytes = sum(_nbytes(ckpt, n) for n in other)
    write_checkpoint(_tensors(ckpt, other, comp.stored, family), out, config, _extra_files(ckpt.path),
                     overwrite=overwrite)
    ternary = [l for l in comp.layers if l.entropy_bits is not None]
    entropy = (sum(l.entropy_bits for l in ternary) / len(ternary)) if ternary else None
    return CompressReport(
        source=str(ckpt.path), out=str(out), quant=config["quantization_config"],
        expert_params=cfg.expert_params, expert_bytes=expert_bytes, other_bytes=other_bytes,
        bits_per_expert_param=8 * expert_bytes / cfg.expert_params, source_expert_bytes=source_expert_bytes,
        failed_factorisations=sum(l.failed_factorisations for l in comp.layers),
        experts_without_tokens=sum(l.experts_without_tokens for l in comp.layers),
        calibration_tokens=tokens, seconds=round(time.perf_counter() - t0, 2), entropy_bits=entropy,
        layers=sorted(comp.layers, key=lambda l: l.layer))


def _nbytes(ckpt: Checkpoint, name: str) -> int:
    n = ckpt.itemsize(name)
    for dim in ckpt.shape(name):
        n *= dim
    return n


def _dense_expert_names(ckpt: Checkpoint, family, cfg) -> set[str]:
    names: set[str] = set()
    for layer, is_moe in enumerate(cfg.moe_layers):
        if is_moe:
            stacked = (*family.stacked_expert_names(layer), *family.stacked_expert_extras(layer))
            names.update(n for n in stacked if ckpt.has(n))
            for e in range(cfg.experts_in(layer)):
                names.update(n for n in family.expert_names(layer, e) if ckpt.has(n))
    return names


def _biases(experts) -> dict[str, torch.Tensor] | None:
    """Returns gpt-oss experts' biases {gate_up_bias [E, 2I], down_bias [E, D]}, or None for plain experts."""
    if not isinstance(experts, ClampedExperts):
        return None
    return {name: getattr(experts, name) for name in BIASES}


def _tensors(ckpt: Checkpoint, other: list[str], stored: dict[int, dict[str, torch.Tensor]],
             family) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields the output's tensors: everything that is not a routed expert as it was, then the experts."""
    for name in other:
        yield name, ckpt.read(name)
    for layer in sorted(stored):
        prefix = experts_prefix(family, layer)
        for name, t in stored[layer].items():
            yield f"{prefix}.{name}", t


def _extra_files(src: Path) -> dict[str, bytes]:
    """Returns the small files to carry over (tokenizer, generation config), not weights or cards."""
    skip = {"config.json", INDEX_FILE, "README.md"}
    files = {}
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in skip and p.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            if p.stat().st_size <= 64 << 20:
                files[p.name] = p.read_bytes()
    return files


def report_rows(r: CompressReport) -> list[tuple[str, str]]:
    """Returns the summary table rows of a compress report."""
    q = r.quant
    grid = q["bits"] + ("" if q["bits"] == "ternary" else "-bit") + (f", groups of {q['group_size']}" if q.get("group_size") else "")
    rows = [
        ("method", f"{q['method']} ({grid}, stored as {q['form']})"),
        ("expert params", f"{r.expert_params:,}"),
        ("expert bytes", f"{r.source_expert_bytes:,} -> {r.expert_bytes:,} ({r.source_expert_bytes / max(r.expert_bytes, 1):.1f}x)"),
        ("bits per expert param", f"{r.bits_per_expert_param:.3f}"),
    ]
    if r.entropy_bits is not None:
        rows.append(("ternary entropy bound", f"{r.entropy_bits:.3f} bits/param (memoryless; p(0) mean "
                                              f"{sum(l.p_zero for l in r.layers) / len(r.layers):.3f})"))
    rows += [
        ("other bytes", f"{r.other_bytes:,} (attention, routers, embeddings: unchanged)"),
        ("failed factorisations", f"{r.failed_factorisations} (rounded instead)"),
        ("experts without tokens", f"{r.experts_without_tokens} (rounded)"),
        ("calibration tokens", f"{r.calibration_tokens:,}"),
        ("time", f"{r.seconds:.1f} s"),
        ("written", r.out),
    ]
    return rows
