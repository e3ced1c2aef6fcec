"""gpt-oss experts: biased projections and the clamped SwiGLU, as a stored form and a resident source.

    gate, up = x @ gate_up^T + gate_up_bias          (gate rows first, then up, as every form)
    h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g),   g = clamp(gate, max=limit)
    out = h @ down^T + down_bias

gpt-oss checkpoints store the experts stacked and transposed with gate and up interleaved
(`mlp.experts.gate_up_proj` [E, D, 2I]: gate = [..., 0::2], up = [..., 1::2]; `down_proj`
[E, I, D]; biases `gate_up_proj_bias` [E, 2I], `down_proj_bias` [E, D]); `read` turns one expert
into this form's layout. The form runs in PyTorch only (no fused kernel applies the biases and the
clamp yet): resident and offloaded with fetched misses; CPU and in-place misses are refused.

Shapes: N = tokens, D = hidden, I = expert ffn width, n = tokens of one expert.
One expert: gate_up [2I, D], down [D, I], gate_up_bias [2I], down_bias [D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .forms import KINDS, StoredForm

NAMES = ("gate_up", "down", "gate_up_bias", "down_bias")


class ClampedSwigluForm(StoredForm):
    """gpt-oss's biased, clamped SwiGLU expert as plain tensors in `dtype`."""

    name = "clamped_swiglu"
    gathers = True
    cpu_fast = False
    why_not_cpu = "gpt-oss experts (biases, clamped SwiGLU) have no CPU expert kernel yet"
    why_not_in_place = "gpt-oss experts (biases, clamped SwiGLU) have no in-place kernel yet"

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
        b = ckpt.read_rows(gate_up + "_bias", expert, expert + 1)[0]  # [2I]
        out["gate_up"].copy_(torch.cat((w[0::2], w[1::2])))
        out["gate_up_bias"].copy_(torch.cat((b[0::2], b[1::2])))
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


class ClampedExperts(nn.Module):
    """All experts of one gpt-oss MoE layer, resident on the model's device (trainable parameters)."""

    def __init__(self, num_experts: int, form: ClampedSwigluForm):
        super().__init__()
        self.num_experts, self.hidden, self.ffn, self._form = num_experts, form.hidden, form.ffn, form
        for name, (shape, _) in form.specs().items():
            self.register_parameter(name, nn.Parameter(torch.empty(num_experts, *shape)))

    @property
    def form(self) -> ClampedSwigluForm:
        """The form in the parameters' dtype."""
        f = self._form
        return ClampedSwigluForm(f.hidden, f.ffn, self.gate_up.dtype, f.alpha, f.limit)

    def stacked(self) -> dict[str, torch.Tensor]:
        """Returns {name: [E, ...]} as the form reads them."""
        return {name: getattr(self, name) for name in NAMES}

    def expert_bytes(self) -> int:
        """Returns the bytes of one expert as stored."""
        return self.form.expert_bytes(0)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] for x [N, D]."""
        return self.form.run(x, expert_ids, weights, self.stacked())


def build_resident(ctx, layer: int) -> ClampedExperts:
    """Returns layer `layer`'s experts read from the checkpoint, resident on ctx.device in ctx.dtype."""
    form = ClampedSwigluForm.of(ctx.config, ctx.dtype)
    experts = ClampedExperts(ctx.config.experts_in(layer), form).to(device=ctx.device, dtype=ctx.dtype)
    with torch.no_grad():
        form.read_layer(ctx.ckpt, ctx.family, layer, experts.stacked())
    return experts
