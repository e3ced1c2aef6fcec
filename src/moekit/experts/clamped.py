"""gpt-oss experts: biased projections and the clamped SwiGLU, as a stored form and a resident source.

    gate, up = x @ gate_up^T + gate_up_bias          (gate rows first, then up, as every form)
    h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g),   g = clamp(gate, max=limit)
    out = h @ down^T + down_bias

gpt-oss checkpoints store the experts stacked and transposed with gate and up interleaved
(`mlp.experts.gate_up_proj` [E, D, 2I]: gate = [..., 0::2], up = [..., 1::2]; `down_proj`
[E, I, D]; biases `gate_up_proj_bias` [E, 2I], `down_proj_bias` [E, D]); `read` turns one expert
into this form's layout. The released checkpoints store the two matrices in MXFP4 instead
(`<name>_blocks` [E, R, K/32, 16] uint8: two e2m1 values a byte, low nibble first; `<name>_scales`
[E, R, K/32] uint8: an E8M0 power of two 2^(s-127) per 32 values; rows R in the Linear layout,
gate/up interleaved): Mxfp4ClampedForm keeps those bytes everywhere (resident, host store, GPU
cache) and decodes a matrix when it multiplies. `moekit compress` turns either into a compressed
form (int-N or the ternary code) wrapped by BiasedCompressedForm, which keeps the biases and the
clamped SwiGLU around the compressed matrices. On a GPU the MXFP4 and dense forms run through
Triton kernels (experts.clamped_ops: per-slot for a few slots, grouped above; MXFP4 decoded in
registers), resident, from an offload cache's slab, and in place through an offsets table (offload
misses "mapped": each expert's tensors wherever the table points, a slot or a page-locked host row);
the CPU, autograd and BiasedCompressedForm run in PyTorch. CPU misses are refused.

Shapes: N = tokens, D = hidden, I = expert ffn width, n = tokens of one expert.
One expert, dense:  gate_up [2I, D], down [D, I], gate_up_bias [2I], down_bias [D].
One expert, MXFP4:  gate_up_blocks [2I, D/32, 16], gate_up_scales [2I, D/32], down_blocks [D, I/32, 16],
                    down_scales [D, I/32] (uint8), gate_up_bias [2I], down_bias [D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .forms import KINDS, StoredForm, experts_prefix

try:
    from . import clamped_ops
except ImportError:  # CPU machines without triton run every call in PyTorch
    clamped_ops = None

NAMES = ("gate_up", "down", "gate_up_bias", "down_bias")
BIASES = ("gate_up_bias", "down_bias")
MXFP4_NAMES = ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales", "gate_up_bias", "down_bias")
# e2m1 code -> value (sign bit 3, then exponent and mantissa), as the OCP MX spec and gpt-oss define it
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def gate_first(t: torch.Tensor) -> torch.Tensor:
    """Returns t [2I, ...] with gpt-oss's interleaved gate/up rows reordered: gate rows, then up."""
    return torch.cat((t[0::2], t[1::2]))


# byte -> its two e2m1 values (low nibble first), per (device, dtype); made on first use (eager),
# so captured decode steps copy nothing
_BYTE_LUTS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Returns the matrices [..., R, K] in `dtype` of MXFP4 blocks [..., R, K/32, 16] and scales [..., R, K/32].

    bf16 and fp32 hold every e2m1 value times every E8M0 power exactly, so they decode directly;
    fp16 (whose exponent range is narrower) decodes through fp32."""
    compute = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    key = (blocks.device, compute)
    lut = _BYTE_LUTS.get(key)
    if lut is None:
        values = torch.tensor(FP4_VALUES, dtype=torch.float32)
        byte = torch.arange(256)
        lut = _BYTE_LUTS[key] = torch.stack((values[byte & 0x0F], values[byte >> 4]), dim=-1).to(blocks.device, compute)
    pairs = lut[blocks.int()]  # [..., R, K/32, 16, 2]
    power = torch.exp2(scales.to(compute) - 127.0) if compute == torch.float32 else \
        torch.exp2(scales.float() - 127.0).to(compute)  # 2^(s-127): exact in bf16's exponent range
    return (pairs.flatten(-2) * power[..., None]).flatten(-2).to(dtype)


class ClampedSwigluForm(StoredForm):
    """gpt-oss's biased, clamped SwiGLU expert as plain tensors in `dtype`."""

    name = "clamped_swiglu"
    gathers = True
    cpu_fast = False
    why_not_cpu = "gpt-oss experts (biases, clamped SwiGLU) have no CPU expert kernel yet"
    reads_in_place = True  # the per-slot kernels take an offsets table with a column per stored tensor

    @property
    def in_place_tensors(self) -> tuple[str, ...]:
        """Returns the stored tensors an offsets table places, in its column order (offload.mapped)."""
        return tuple(self.specs_names())

    def __init__(self, hidden: int, ffn: int, dtype: torch.dtype, alpha: float, limit: float):
        super().__init__(hidden, ffn)
        self.dtype, self.alpha, self.limit = dtype, alpha, limit

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: torch.dtype) -> ClampedSwigluForm:
        """Returns the form of a model's experts in `dtype`."""
        return cls(cfg.hidden_size, cfg.expert_ffn, dtype, cfg.swiglu_alpha, cfg.swiglu_limit)

    def specs(self, layer=None):
        d, i, t = self.hidden, self.ffn, self.dtype
        return {"gate_up": ((2 * i, d), t), "down": ((d, i), t), "gate_up_bias": ((2 * i,), t), "down_bias": ((d,), t)}

    def specs_names(self):
        return NAMES

    def read(self, ckpt, family, layer, expert, out):
        from ..errors import CheckpointError

        gate_up, down = family.stacked_expert_names(layer)
        shapes = {gate_up: (self.hidden, 2 * self.ffn), down: (self.ffn, self.hidden),
                  gate_up + "_bias": (2 * self.ffn,), down + "_bias": (self.hidden,)}
        for name, shape in shapes.items():
            if tuple(ckpt.shape(name)[1:]) != shape:
                raise CheckpointError(
                    f"{ckpt.file_of(name)}: tensor '{name}' has shape {list(ckpt.shape(name))}, config.json "
                    f"implies [E, {', '.join(map(str, shape))}]; the weights do not match the config")
        w = ckpt.read_rows(gate_up, expert, expert + 1)[0].t()  # [2I, D], gate and up rows interleaved
        out["gate_up"].copy_(gate_first(w))
        out["gate_up_bias"].copy_(gate_first(ckpt.read_rows(gate_up + "_bias", expert, expert + 1)[0]))
        out["down"].copy_(ckpt.read_rows(down, expert, expert + 1)[0].t())
        out["down_bias"].copy_(ckpt.read_rows(down + "_bias", expert, expert + 1)[0])

    def weight(self, kind, one, dtype=torch.float32):
        return one[kind].to(dtype)

    def linear(self, kind, one, x):
        return F.linear(x, one[kind], one[kind + "_bias"])

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Returns the clamped SwiGLU [n, I] of gate_up projections [n, 2I] (biases added)."""
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def apply(self, xs, stacked, row):
        if isinstance(row, torch.Tensor):  # one batched matmul, each token through its own row
            gate_up = torch.bmm(stacked["gate_up"][row], xs[:, :, None]).squeeze(-1) + stacked["gate_up_bias"][row]
            h = self.activation(gate_up)
            return torch.bmm(stacked["down"][row], h[:, :, None]).squeeze(-1) + stacked["down_bias"][row]
        one = self.one(stacked, row)
        return self.linear("down", one, self.activation(self.linear("gate_up", one, xs)))

    def dequantize(self, stacked, dtype=torch.float32):
        """Returns the (gate_up, down) matrices; the biases are not part of them."""
        return tuple(stacked[kind].to(dtype) for kind in KINDS)  # type: ignore[return-value]

    def fused(self, x, rows, weights, stacked, offsets=None):
        # GPUs: the kernels read each weight once in its stored format (MXFP4 decoded in registers), no host
        # sync; with offsets ([E, >= C], a column per in_place_tensors name) wherever the table places it
        if offsets is None and not slot_kernels_run(x):
            return None
        columns = None if offsets is None else {name: c for c, name in enumerate(self.in_place_tensors)}
        return clamped_ops.clamped_expert_ffn(x, rows, weights, stacked, self.alpha, self.limit, offsets=offsets,
                                              columns=columns)


class Mxfp4ClampedForm(ClampedSwigluForm):
    """gpt-oss's experts with both matrices kept in MXFP4 (biases in `dtype`), decoded as they multiply."""

    name = "mxfp4_clamped_swiglu"

    def specs(self, layer=None):
        d, i, u8 = self.hidden, self.ffn, torch.uint8
        return {"gate_up_blocks": ((2 * i, d // 32, 16), u8), "gate_up_scales": ((2 * i, d // 32), u8),
                "down_blocks": ((d, i // 32, 16), u8), "down_scales": ((d, i // 32), u8),
                "gate_up_bias": ((2 * i,), self.dtype), "down_bias": ((d,), self.dtype)}

    def specs_names(self):
        return MXFP4_NAMES

    def read(self, ckpt, family, layer, expert, out):
        from ..errors import CheckpointError

        gate_up, down = family.stacked_expert_names(layer)
        names = {f"{kind}_{part}": f"{stored}_{part}" for kind, stored in (("gate_up", gate_up), ("down", down))
                 for part in ("blocks", "scales", "bias")}  # gate_up_blocks -> ...experts.gate_up_proj_blocks
        for name, (shape, _) in self.specs().items():
            stored = names[name]
            if not ckpt.has(stored) or tuple(ckpt.shape(stored)[1:]) != shape:
                got = list(ckpt.shape(stored)) if ckpt.has(stored) else "no such tensor"
                raise CheckpointError(f"{ckpt.path}: MXFP4 expert tensor '{stored}': {got}, config.json implies "
                                      f"[E, {', '.join(map(str, shape))}]; the weights do not match the config")
            t = ckpt.read_rows(stored, expert, expert + 1)[0]
            out[name].copy_(gate_first(t) if name.startswith("gate_up") else t)

    def weight(self, kind, one, dtype=torch.float32):
        return decode_mxfp4(one[kind + "_blocks"], one[kind + "_scales"], dtype)

    def linear(self, kind, one, x):
        return F.linear(x, self.weight(kind, one, x.dtype), one[kind + "_bias"])

    def apply(self, xs, stacked, row):
        if isinstance(row, torch.Tensor):  # each token through its own row: decode the rows it uses
            gate_up = decode_mxfp4(stacked["gate_up_blocks"][row], stacked["gate_up_scales"][row], xs.dtype)
            h = self.activation(torch.bmm(gate_up, xs[:, :, None]).squeeze(-1) + stacked["gate_up_bias"][row])
            down = decode_mxfp4(stacked["down_blocks"][row], stacked["down_scales"][row], xs.dtype)  # [n, D, I]
            return torch.bmm(down, h[:, :, None]).squeeze(-1) + stacked["down_bias"][row]
        return super().apply(xs, stacked, row)

    def dequantize(self, stacked, dtype=torch.float32):
        """Returns the decoded (gate_up, down) matrices; the biases are not part of them."""
        return tuple(decode_mxfp4(stacked[k + "_blocks"], stacked[k + "_scales"], dtype) for k in KINDS)  # type: ignore[return-value]


def slot_kernels_run(x: torch.Tensor) -> bool:
    """Returns whether calls on x take the kernels: CUDA tensors only (the CPU runs PyTorch; tests
    patch this to run the GPU's branch under the Triton interpreter)."""
    return clamped_ops is not None and x.is_cuda


def mxfp4_slot_ffn(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, stacked: dict,
                   alpha: float, limit: float) -> torch.Tensor:
    """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] through the per-slot kernels
    (any slot count) for a stack of either form (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    mats = clamped_ops.matrices(stacked)
    assert mats is not None, "the kernels read each row's bytes contiguous"
    return clamped_ops.slot_ffn(x, expert_ids, weights, mats, alpha, limit)


def form_for(ctx) -> ClampedSwigluForm:
    """Returns the form a gpt-oss checkpoint's experts load in: MXFP4 when it stores them so, else dense."""
    if (ctx.ckpt.config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        return Mxfp4ClampedForm.of(ctx.config, ctx.dtype)
    return ClampedSwigluForm.of(ctx.config, ctx.dtype)


class ClampedExperts(nn.Module):
    """All experts of one gpt-oss MoE layer, resident on the model's device, in their stored form."""

    def __init__(self, num_experts: int, form: ClampedSwigluForm):
        super().__init__()
        self.num_experts, self.hidden, self.ffn, self.form = num_experts, form.hidden, form.ffn, form
        for name, (shape, dtype) in form.specs().items():
            self.register_parameter(name, nn.Parameter(torch.empty(num_experts, *shape, dtype=dtype),
                                                       requires_grad=dtype.is_floating_point))

    def stacked(self) -> dict[str, torch.Tensor]:
        """Returns {name: [E, ...]} as the form reads them."""
        return {name: getattr(self, name) for name in self.form.specs_names()}

    def expert_bytes(self) -> int:
        """Returns the bytes of one expert as stored."""
        return self.form.expert_bytes(0)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] for x [N, D]."""
        return self.form.run(x, expert_ids, weights, self.stacked())


def build_resident(ctx, layer: int) -> ClampedExperts:
    """Returns layer `layer`'s experts read from the checkpoint, resident on ctx.device in their form."""
    form = form_for(ctx)
    experts = ClampedExperts(ctx.config.experts_in(layer), form).to(device=ctx.device)
    with torch.no_grad():
        form.read_layer(ctx.ckpt, ctx.family, layer, experts.stacked())
    return experts


class BiasedCompressedForm(StoredForm):
    """A compressed form's matrices (quant.formats: int-N or the ternary code) with gpt-oss's biases
    and clamped SwiGLU around them; the biases are stored beside the codes as
    `<experts prefix>.gate_up_bias` [E, 2I] and `.down_bias` [E, D] (gate rows first)."""

    gathers = False
    cpu_fast = False
    why_not_in_place = "compressed gpt-oss experts have no in-place kernel"

    def __init__(self, inner: StoredForm, alpha: float, limit: float, bias_dtype: torch.dtype):
        super().__init__(inner.hidden, inner.ffn)
        self.inner, self.alpha, self.limit, self.bias_dtype = inner, alpha, limit, bias_dtype
        self.name = f"{inner.name}_clamped_swiglu"
        self.bits = getattr(inner, "bits", None)
        self.why_not_cpu = "gpt-oss experts (biases, clamped SwiGLU) have no CPU expert kernel yet"

    @classmethod
    def of(cls, inner: StoredForm, cfg: ModelConfig, bias_dtype: torch.dtype) -> BiasedCompressedForm:
        """Returns `inner` wrapped with the model's clamp and biases in `bias_dtype`."""
        return cls(inner, cfg.swiglu_alpha, cfg.swiglu_limit, bias_dtype)

    activation = ClampedSwigluForm.activation

    def tensor_names(self) -> list[str]:
        """Returns the stored tensors' names relative to the experts prefix (the codes', then the biases)."""
        return [*self.inner.tensor_names(), *BIASES]

    def specs_names(self):
        return (*self.inner.specs_names(), *BIASES)

    def specs(self, layer):
        return {**self.inner.specs(layer), "gate_up_bias": ((2 * self.ffn,), self.bias_dtype),
                "down_bias": ((self.hidden,), self.bias_dtype)}

    def tables(self, layer):
        return self.inner.tables(layer)

    def table_bytes(self):
        return self.inner.table_bytes()

    def read(self, ckpt, family, layer, expert, out):
        self.inner.read(ckpt, family, layer, expert, {k: v for k, v in out.items() if k not in BIASES})
        prefix = experts_prefix(family, layer)
        for name in BIASES:
            out[name].copy_(ckpt.read_rows(f"{prefix}.{name}", expert, expert + 1)[0])

    def read_layer(self, ckpt, family, layer, out):
        self.inner.read_layer(ckpt, family, layer, {k: v for k, v in out.items() if k not in BIASES})
        prefix = experts_prefix(family, layer)
        for name in BIASES:
            out[name].copy_(ckpt.read(f"{prefix}.{name}", shape=tuple(out[name].shape)))

    def weight(self, kind, one, dtype=torch.float32):
        return self.inner.weight(kind, one, dtype)

    def linear(self, kind, one, x):
        return self.inner.linear(kind, one, x) + one[kind + "_bias"].to(x.dtype)

    def apply(self, xs, stacked, row):
        one = self.one(stacked, row)
        return self.linear("down", one, self.activation(self.linear("gate_up", one, xs)))

    def dequantize(self, stacked, dtype=torch.float32):
        """Returns the decoded (gate_up, down) matrices; the biases are not part of them."""
        return self.inner.dequantize(stacked, dtype)


def dense_matrices(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns float32 (gate_up [E, 2I, D], down [E, D, I]) of a layer's uncompressed gpt-oss experts
    (dense or MXFP4), as compress quantizes them."""
    return experts.form.dequantize(experts.stacked(), torch.float32)


def expert_hidden(experts: nn.Module, expert: int, x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """Returns the clamped-SwiGLU hidden [n, I] of gpt-oss expert `expert` for inputs x [n, D] with
    the gate_up matrix [2I, D] given (compress passes the quantized one) and the expert's bias."""
    return experts.form.activation(F.linear(x, gate_up, experts.gate_up_bias[expert].to(x.dtype)))
