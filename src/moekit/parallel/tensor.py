"""Tensor parallelism, and its combination with expert parallelism: ep x tp ranks on one model.

Ranks form a grid, global rank g = e * tp + t (e < ep, t < tp): the `tp` ranks of one row (adjacent
ranks: on GPUs, one NVLink island) split every layer's attention heads and dense MLPs; the `ep`
ranks of one column split the routed experts (parallel.expert). Every row holds the whole
residual stream and runs the same tokens.

Or the same ranks do both (`ep_over_tp`, `--parallel tp=N,ep=tp`; vLLM's `--tensor-parallel-size N
--enable-expert-parallel`): N ranks split the attention heads and dense MLPs as a row does and the
routed experts by id as a column does (whole experts, dispatched by all-to-all), so 2 GPUs can run
EP and TP together.

    attention  q/k/v rows and o_proj columns of this rank's heads; all_reduce after o_proj (o bias
               added once, after it); kv heads split when tp divides them, else replicated when
               they divide tp (each rank keeps the one its q heads read, as vLLM does); the KV
               cache holds local heads only; a "full" q/k RMSNorm all-reduces its sum of squares
    latent     (MLA, DeepSeek V2/V3) q_proj or q_b_proj rows, kv_b_proj rows and o_proj columns of
               this rank's heads; the latent path (q_a, kv_a, their norms) and the cached latent
               and rope key are replicated (one latent serves every head), as in vLLM
    dense MLP  gate/up rows and down columns of this rank's ffn slice; all_reduce after down
               (dense layers and shared experts alike; the shared expert's sigmoid gate is whole)
    experts    dense (plain SwiGLU) experts: each expert's ffn split over the row like a dense
               MLP (vLLM's TP MoE), this rank's experts picked by its column (vLLM, SGLang: with
               EP the experts are distributed), then all_reduce over the row; so a rank holds
               1/(ep*tp) of the expert bytes. Compressed or clamped (gpt-oss) experts are not
               split by ffn (their codes and biases are laid out per whole expert): the row
               replicates them and needs no all_reduce.
    replicated embeddings, norms, routers, LM head
    refused    a tp that does not divide the query heads, that divides the kv heads neither
               way, or that does not divide an ffn width it must split

Loading: the non-expert weights are read whole, then sliced (the attention and MLP slices are
views copied once; peak memory holds one full copy of them per rank); routed experts are read
one expert at a time, only this column's (lazy reads stay lazy at expert granularity); of an
ffn-split expert stored as separate tensors, gate and up rows lo..hi are read alone and down
(whose columns are not contiguous) whole; a fused [E, 2I, D] or FP8 layout is read whole and sliced.

Shapes: H, Hkv = query, key/value heads; Dh = head dim; D = hidden; I = ffn width; R = tp ranks;
h0..h1, k0..k1 = this rank's query and key/value heads; f = I / R.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..errors import MoekitError
from ..experts.forms import DenseForm, StoredForm
from ..linear import Linear
from ..model import Attention, DenseMLP, MoEBlock, RMSNorm
from .comm import ExpertComm
from .expert import ExpertParallelLoader, ExpertParallelRuntime, checkpoint_digest

# ---- the plan and the groups -----------------------------------------------------------------------


@dataclasses.dataclass
class ParallelGroups:
    """This rank's three views of the grid: every rank, its tp row, its ep column."""

    world: ExpertComm  # every rank; global rank g = e * tp + t
    tp: ExpertComm  # the row: ranks e * tp .. e * tp + tp - 1, rank t within it
    ep: ExpertComm  # the column: ranks t, tp + t, ..., rank e within it (ep_over_tp: the row again)
    ep_over_tp: bool = False  # the routed experts split by id over the tp row (no ffn split)

    @staticmethod
    def create(world: ExpertComm, ep: int, tp: int, ep_over_tp: bool = False) -> ParallelGroups:
        """Returns the groups of an ep x tp grid over `world` (every rank must call it alike), or
        with `ep_over_tp` one group of tp = ep = world ranks doing both; raises MoekitError when
        the sizes do not match the number of ranks."""
        if ep < 1 or tp < 1:
            raise MoekitError(f"--parallel ep and tp must be >= 1, got ep={ep}, tp={tp}")
        if ep_over_tp:
            if not ep == tp == world.world:
                raise MoekitError(f"--parallel tp={tp},ep=tp splits heads and experts over the same ranks and needs "
                                  f"tp = {world.world} processes: give torchrun --nproc-per-node {tp}")
            return ParallelGroups(world, world, world, ep_over_tp=True)
        if ep * tp != world.world:
            raise MoekitError(f"--parallel ep={ep},tp={tp} needs ep x tp = {ep * tp} processes, but there are "
                              f"{world.world}: give torchrun --nproc-per-node {ep * tp}")
        e, t = divmod(world.rank, tp)

        def sub(ranks_of: list[list[int]], index: int, size: int, kind: str) -> ExpertComm:
            if size == world.world:
                return world
            if size == 1:  # no collectives run on a group of one
                return ExpertComm(0, 1, world.device, world.timeout_s, None)
            mine = None
            for ranks in ranks_of:  # every rank creates every group, in the same order
                group = dist.new_group(ranks, timeout=timedelta(seconds=world.timeout_s))
                if world.rank in ranks:
                    mine = group
            label = f"rank {world.rank} of {world.world} ({kind} rank {index} of {size})"
            return ExpertComm(index, size, world.device, world.timeout_s, mine, label=label)

        rows = [[r * tp + c for c in range(tp)] for r in range(ep)]
        cols = [[r * tp + c for r in range(ep)] for c in range(tp)]
        return ParallelGroups(world, sub(rows, t, tp, "tp"), sub(cols, e, ep, "ep"))


# ---- checks ------------------------------------------------------------------------------------------

def kv_heads_of(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> tuple[int, int]:
    """Returns [k0, k1): the key/value heads tp rank `rank` keeps (split, or one replicated)."""
    if num_kv_heads % tp == 0:
        per = num_kv_heads // tp
        return rank * per, (rank + 1) * per
    if tp % num_kv_heads == 0:  # fewer kv heads than ranks: each rank's q heads read one of them
        k = rank // (tp // num_kv_heads)
        return k, k + 1
    raise MoekitError(f"--parallel tp={tp}: the {num_kv_heads} key/value heads can neither be split over {tp} "
                      f"ranks nor replicated on them (one must divide the other); give a tp that divides "
                      f"{num_heads} and is a divisor or multiple of {num_kv_heads}")


def check_tensor_parallel(cfg: ModelConfig, tp: int, split_experts: bool) -> None:
    """Raises MoekitError (one line) unless the model's heads and ffn widths can be split over tp ranks."""
    if tp == 1:
        return
    if cfg.num_heads % tp:
        raise MoekitError(f"--parallel tp={tp} does not divide the {cfg.num_heads} attention heads; give a tp "
                          f"that divides {cfg.num_heads}")
    if cfg.mla is None:  # latent attention caches one latent for every head: nothing to split
        kv_heads_of(cfg.num_heads, cfg.num_kv_heads, tp, 0)
    widths = [("dense MLP", cfg.dense_ffn if not all(cfg.moe_layers) else 0),
              ("shared expert", cfg.shared_expert_ffn), ("expert", cfg.expert_ffn if split_experts else 0)]
    for what, width in widths:
        if width % tp:
            raise MoekitError(f"--parallel tp={tp} does not divide the {what} ffn width {width}; give a tp that "
                              f"divides {width}")


# ---- the split modules ---------------------------------------------------------------------------------

class RowParallelLinear(Linear):
    """A projection whose input features are split over the tp row: each rank multiplies its
    slice, all_reduce sums them, then the bias (whole, on every rank) is added once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, comm: ExpertComm, what: str):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.full_bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.comm, self.what = comm, what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.comm.all_reduce(super().forward(x), self.what)
        return out if self.full_bias is None else out + self.full_bias


class SplitRMSNorm(RMSNorm):
    """RMSNorm over features split over the tp row ("full" q/k norm): the sum of squares is
    all-reduced, so every rank divides by the statistics of the whole projection. Replicated kv
    heads count R / Hkv times on both sides of the mean, which leaves it exact."""

    def __init__(self, weight: torch.Tensor, eps: float, comm: ExpertComm, what: str):
        super().__init__(weight.shape[0], eps)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.comm, self.what = comm, what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        squares = self.comm.all_reduce(x32.pow(2).sum(-1, keepdim=True), self.what)
        normed = x32 * torch.rsqrt(squares / (x.shape[-1] * self.comm.world) + self.eps)
        return self.weight * normed.to(x.dtype)


class _UnfusedProject:
    """Mixin: a split "full" q/k norm cannot run in fused.qk_norm_rope (it sees local statistics)."""

    def _fuse_project(self, qkv, cos, sin) -> bool:
        return False


_UNFUSED: dict[type, type] = {}


def _unfused(cls: type) -> type:
    if cls not in _UNFUSED:
        _UNFUSED[cls] = type(f"Split{cls.__name__}", (_UnfusedProject, cls), {})
    return _UNFUSED[cls]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """Returns a Linear holding copies of `weight` [out, in] and `bias` [out]."""
    lin = Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return lin


@torch.no_grad()
def split_attention(attn: Attention, comm: ExpertComm) -> None:
    """Keeps this rank's heads of `attn` (q/k/v rows, o_proj columns, norms, sinks) in place."""
    cfg, tp, t = attn.cfg, comm.world, comm.rank
    dh, per = cfg.head_dim, cfg.num_heads // tp
    h0, h1 = t * per, (t + 1) * per
    k0, k1 = kv_heads_of(cfg.num_heads, cfg.num_kv_heads, tp, t)
    q_dim, kv_dim = attn.q_dim, attn.kv_dim
    rows = torch.cat([torch.arange(h0 * dh, h1 * dh), q_dim + torch.arange(k0 * dh, k1 * dh),
                      q_dim + kv_dim + torch.arange(k0 * dh, k1 * dh)]).to(attn.qkv.weight.device)
    qkv = attn.qkv
    attn.qkv = _linear(qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])
    o = attn.o_proj
    attn.o_proj = RowParallelLinear(o.weight[:, h0 * dh:h1 * dh].clone(), None if o.bias is None else o.bias.clone(),
                                    comm, f"the attention all-reduce of layer {attn.layer}")
    if cfg.qk_norm == "full":
        what = f"the q/k norm of layer {attn.layer}"
        attn.q_norm = SplitRMSNorm(attn.q_norm.weight[h0 * dh:h1 * dh].clone(), cfg.rms_norm_eps, comm, what)
        attn.k_norm = SplitRMSNorm(attn.k_norm.weight[k0 * dh:k1 * dh].clone(), cfg.rms_norm_eps, comm, what)
        attn.__class__ = _unfused(type(attn))
    if getattr(attn, "sinks", None) is not None:
        attn.sinks = nn.Parameter(attn.sinks[h0:h1].clone(), requires_grad=False)
    attn.cfg = dataclasses.replace(cfg, num_heads=per, num_kv_heads=k1 - k0)
    attn.q_dim, attn.kv_dim = per * dh, (k1 - k0) * dh


@torch.no_grad()
def split_latent_attention(attn: nn.Module, comm: ExpertComm) -> None:
    """Keeps this rank's heads of a LatentAttention (moekit.mla) in place: q rows, kv_b rows (each
    head's key and value halves), o_proj columns; the latent path stays whole."""
    cfg, m, tp, t = attn.cfg, attn.mla, comm.world, comm.rank
    per = cfg.num_heads // tp
    h0, h1 = t * per, (t + 1) * per
    q_name = "q_b_proj" if m.q_lora_rank else "q_proj"
    q = getattr(attn, q_name)
    setattr(attn, q_name, _linear(q.weight[h0 * m.qk_head_dim:h1 * m.qk_head_dim], None))
    kv_b, width = attn.kv_b_proj, m.qk_nope_head_dim + m.v_head_dim
    attn.kv_b_proj = _linear(kv_b.weight[h0 * width:h1 * width], None)
    o = attn.o_proj
    attn.o_proj = RowParallelLinear(o.weight[:, h0 * m.v_head_dim:h1 * m.v_head_dim].clone(),
                                    None if o.bias is None else o.bias.clone(), comm,
                                    f"the attention all-reduce of layer {attn.layer}")
    attn.cfg = dataclasses.replace(cfg, num_heads=per, num_kv_heads=per)  # kv heads: unused by MLA
    attn.q_dim = per * m.qk_head_dim


@torch.no_grad()
def split_mlp(mlp: DenseMLP, comm: ExpertComm, what: str) -> None:
    """Keeps this rank's ffn slice of a SwiGLU MLP (gate and up rows, down columns) in place."""
    ffn = mlp.down.weight.shape[1]
    f = ffn // comm.world
    lo, hi = comm.rank * f, (comm.rank + 1) * f
    gate_up = mlp.gate_up.weight
    mlp.gate_up = _linear(torch.cat([gate_up[lo:hi], gate_up[ffn + lo:ffn + hi]]), None)
    mlp.down = RowParallelLinear(mlp.down.weight[:, lo:hi].clone(), None, comm, what)


class SplitDenseForm(DenseForm):
    """The dense form of this rank's ffn slice [f] of each expert: reads a whole expert, keeps
    gate and up rows lo..hi and down columns lo..hi."""

    name = "dense_tp"

    def __init__(self, whole: DenseForm, rank: int, ranks: int):
        super().__init__(whole.hidden, whole.ffn // ranks, whole.dtype)
        self.whole, self.lo = whole, rank * (whole.ffn // ranks)

    def read(self, ckpt, family, layer, expert, out):
        ffn, lo, hi, d = self.whole.ffn, self.lo, self.lo + self.ffn, self.hidden
        gate, up, down = family.expert_names(layer, expert)
        if (not ckpt.has(family.stacked_expert_names(layer)[0]) and ckpt.fp8_block is None
                and ckpt.has(gate) and ckpt.shape(gate) == ckpt.shape(up) == (ffn, d)):
            # per-expert tensors: gate and up rows lo..hi are contiguous, read alone; down's
            # columns are not, it is read whole
            out["gate_up"][:self.ffn].copy_(ckpt.read_rows(gate, lo, hi))
            out["gate_up"][self.ffn:].copy_(ckpt.read_rows(up, lo, hi))
            out["down"].copy_(ckpt.read(down, shape=(d, ffn))[:, lo:hi])
            return
        one = {k: v[0] for k, v in self.whole.empty(1, layer, out["gate_up"].device).items()}
        self.whole.read(ckpt, family, layer, expert, one)
        out["gate_up"][:self.ffn].copy_(one["gate_up"][lo:hi])
        out["gate_up"][self.ffn:].copy_(one["gate_up"][ffn + lo:ffn + hi])
        out["down"].copy_(one["down"][:, lo:hi])

    def read_layer(self, ckpt, family, layer, out):
        for e in range(out["gate_up"].shape[0]):
            self.read(ckpt, family, layer, e, {k: v[e] for k, v in out.items()})


class LocalExperts(nn.Module):
    """Every expert of one MoE layer in a stored form, on this rank (ep = 1): [E, ...] tensors."""

    def __init__(self, form: StoredForm, layer: int, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.form, self.layer, self.names = form, layer, list(tensors)
        self.num_experts, self.hidden, self.ffn = next(iter(tensors.values())).shape[0], form.hidden, form.ffn
        for name, t in tensors.items():
            self.register_buffer(name.replace(".", "_"), t)

    def stacked(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name.replace(".", "_")) for name in self.names}

    def expert_bytes(self) -> int:
        return self.form.expert_bytes(self.layer)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] for x [N, D]."""
        return self.form.run(x, expert_ids, weights, self.stacked())


class SplitExperts(nn.Module):
    """A layer's experts whose ffn is split over the tp row: the inner source's partial output
    [N, D] (its ffn slice), all-reduced."""

    def __init__(self, inner: nn.Module, comm: ExpertComm, layer: int):
        super().__init__()
        self.inner, self.comm, self.layer = inner, comm, layer

    def expert_bytes(self) -> int:
        return self.inner.expert_bytes()

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns the layer's routed output [N, D] for x [N, D] (every rank of the row alike)."""
        return self.comm.all_reduce(self.inner(x, expert_ids, weights), f"the expert all-reduce of layer {self.layer}")


# ---- the loader -------------------------------------------------------------------------------------------

class ParallelRuntime(ExpertParallelRuntime):
    """ExpertParallelRuntime's statistics for the grid: rank and ranks are global, plus ep and tp."""

    def __init__(self, groups: ParallelGroups):
        super().__init__(groups.world)
        self.groups = groups
        self.split_experts = False

    def report(self) -> dict:
        out = super().report()
        out.update(ep=self.groups.ep.world, tp=self.groups.tp.world, experts_split_by_tp=self.split_experts,
                   ep_over_tp=self.groups.ep_over_tp)
        return out

    def capture_decode(self, model, cache, token, position):
        """Returns the decode step as one CUDA graph when no expert exchange runs in it (ep = 1:
        only all-reduces, which NCCL captures), else None (captured in pieces between the
        exchanges, whose split sizes the host reads)."""
        if self.groups.ep.world > 1 or not token.is_cuda:
            return None
        from ..generate import _GraphedDecode

        try:
            return _GraphedDecode(model, cache, token, position)
        except RuntimeError:  # an expert form that syncs with the host (as generate falls back): in pieces;
            torch.cuda.synchronize()  # every rank fails alike (the same model), so all fall back together
            return None


class ParallelLoader(ExpertParallelLoader):
    """Builds each MoE layer's experts for an ep x tp grid and splits attention and dense MLPs
    over the tp row once the model is loaded (`finish`); `expert_map` as ExpertParallelLoader's,
    with ranks counted along the ep column."""

    def __init__(self, groups: ParallelGroups, expert_map=None):
        super().__init__(groups.ep, expert_map)
        self.groups = groups
        self.runtime = ParallelRuntime(groups)
        self.split = False

    def _start(self, ctx) -> None:
        self.groups.world.check_same(checkpoint_digest(ctx), "checkpoint", str(ctx.ckpt.path))
        self._plan(ctx)
        self._check_map(self.groups.world)
        tp = self.groups.tp.world
        self.split = tp > 1 and type(self.form) is DenseForm and not self.groups.ep_over_tp
        check_tensor_parallel(ctx.config, tp, self.split)
        if self.split:
            self.form = SplitDenseForm(self.form, self.groups.tp.rank, tp)
        self.runtime.split_experts = self.split

    def build(self, ctx, layer: int) -> nn.Module:
        if self.form is None:
            self._start(ctx)
        if self.groups.ep.world > 1:
            inner = super().build(ctx, layer)
        else:
            tensors = self.form.empty(ctx.config.experts_in(layer), layer, ctx.device)
            with torch.no_grad():
                self.form.read_layer(ctx.ckpt, ctx.family, layer, tensors)
            self.runtime.owned[layer] = ctx.config.experts_in(layer)
            inner = LocalExperts(self.form, layer, {**tensors, **self.form.tables(layer)})
        return SplitExperts(inner, self.groups.tp, layer) if self.split else inner

    def finish(self, model: nn.Module, ctx):
        tp, cfg = self.groups.tp, ctx.config
        if self.form is None:  # no MoE layer: the checks still run
            check_tensor_parallel(ctx.config, tp.world, False)
        if tp.world > 1:
            for i, layer in enumerate(model.layers):
                (split_attention if cfg.mla is None else split_latent_attention)(layer.attn, tp)
                mlp = layer.mlp
                if isinstance(mlp, MoEBlock):
                    if mlp.shared is not None:
                        split_mlp(mlp.shared, tp, f"the shared-expert all-reduce of layer {i}")
                else:
                    split_mlp(mlp, tp, f"the MLP all-reduce of layer {i}")
            # the KV caches are sized from it: local heads only (MLA's latent cache has no heads)
            per = cfg.num_heads // tp.world
            k0, k1 = (0, per) if cfg.mla is not None else kv_heads_of(cfg.num_heads, cfg.num_kv_heads, tp.world,
                                                                       tp.rank)
            model.config = dataclasses.replace(cfg, num_heads=per, num_kv_heads=k1 - k0)
        return self.runtime


def load_parallel(path, groups: ParallelGroups, expert_map=None, dtype: str | torch.dtype | None = None,
                  **kwargs) -> nn.Module:
    """Returns the model at `path` on groups.world.device, split over the ep x tp grid (this rank's
    heads, ffn slices and experts); every rank must call it with the same arguments."""
    from ..errors import MoekitError
    from ..load import load_model

    if kwargs.get("dense", "bf16") != "bf16":  # the ranks split bf16 projections by rows and columns
        raise MoekitError("int8 projections (--quantize-dense int8) are not available with --parallel yet: load "
                          "with dense='bf16'")
    return load_model(path, device=groups.world.device, dtype=dtype,
                      experts=ParallelLoader(groups, expert_map), **kwargs)
