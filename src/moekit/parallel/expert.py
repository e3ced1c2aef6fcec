"""Expert parallelism: each rank holds a slice of every MoE layer's experts, tokens travel to them.

Every rank holds the whole non-expert model and runs the same tokens (data replicated). A layer
call splits its N tokens into one contiguous chunk per rank; each rank dispatches the routed slots
of its own chunk to the ranks that own their experts:

    1. counts   all_to_all of [R] slot counts (what each rank will send each other rank)
    2. dispatch one all_to_all_single of the slots' inputs [S, D] with their expert ids (int64 bits
                as 8 / itemsize extra columns: one collective, not two) with those splits
    3. compute  the received slots through the local experts' stored form (form.run, weight 1)
    4. return   all_to_all_single of the unweighted outputs [S, D] back to the sending ranks
    5. combine  each token's A slots weighted by the routing weights (in slot order n * A + a)
    6. gather   all_gather of the chunks, so every rank holds the layer's output [N, D]

so the output equals one process's. Step 6 is what data replication costs; a data-parallel
engine (each rank its own tokens) would stop after step 5.

Shapes: N = tokens, A = experts per token, E = experts of the layer, R = ranks, D = hidden,
S = slots a rank sends (its chunk's N_r * A, less zero-weight ones), M = slots it receives.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import MoekitError
from ..experts.forms import StoredForm
from ..experts.loader import ExpertLoader, LoadContext
from .comm import ExpertComm

# ---- expert -> rank maps -------------------------------------------------------------------------

def contiguous_owners(num_experts: int, world: int, layer: int) -> list[int]:
    """Returns the owning rank of each of a layer's experts, in contiguous runs (the first
    E % R ranks one expert more); raises MoekitError when there are fewer experts than ranks."""
    if num_experts < world:
        raise MoekitError(f"layer {layer} has {num_experts} experts, fewer than the {world} ranks: every rank "
                          f"needs at least one expert of each layer; run with at most {num_experts} ranks "
                          "(or give an expert map)")
    base, extra = divmod(num_experts, world)
    return [r for r in range(world) for _ in range(base + (r < extra))]


def check_owners(owners: Sequence[int], num_experts: int, world: int, layer: int) -> list[int]:
    """Returns a given expert -> rank map of a layer as a list, checked against the layer and the ranks."""
    owners = [int(r) for r in owners]
    if len(owners) != num_experts:
        raise MoekitError(f"the expert map gives {len(owners)} owners for layer {layer}, which has {num_experts} "
                          "experts: give one rank per expert")
    bad = sorted({r for r in owners if not 0 <= r < world})
    if bad:
        raise MoekitError(f"the expert map of layer {layer} names rank(s) {bad}; there are {world} ranks (0..{world - 1})")
    return owners


def token_chunk(n: int, world: int, rank: int) -> tuple[int, int]:
    """Returns [lo, hi): the tokens of an N-token call whose slots `rank` dispatches."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def checkpoint_digest(ctx: LoadContext) -> bytes:
    """Returns a sha256 of the checkpoint's config.json and its weight files' names and sizes."""
    h = hashlib.sha256(json.dumps(ctx.ckpt.config, sort_keys=True).encode())
    for f in sorted(ctx.ckpt.path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.digest()


# ---- the sharded expert source ---------------------------------------------------------------------

class ExpertParallelRuntime:
    """What the engines may ask of an expert-parallel model (experts.runtime.ExpertRuntime), and its
    statistics: slots computed locally and sent to other ranks, bytes exchanged."""

    compilable = False  # collectives and a host sync (split sizes) per layer
    prefill_chunk = None

    def __init__(self, comm: ExpertComm):
        self.comm = comm
        self.owned: dict[int, int] = {}  # layer -> experts this rank holds
        self.calls = self.slots_local = self.slots_remote = self.bytes_sent = 0

    def reserve(self, batch: int, positions: int) -> None:
        return None

    def capture_decode(self, model, cache, token, position):
        return None  # captured in pieces: the collectives run eagerly between them

    def report(self) -> dict:
        return {"placement": "expert_parallel", "rank": self.comm.rank, "ranks": self.comm.world,
                "experts_held": sum(self.owned.values()), "layer_calls": self.calls,
                "slots_local": self.slots_local, "slots_remote": self.slots_remote, "bytes_sent": self.bytes_sent}


class ShardedExperts(nn.Module):
    """One MoE layer's experts split over the ranks: this rank's slice, stacked in its stored form.

    Tensors as the form names them, [E_r, ...] for the E_r experts this rank owns (in expert id
    order), plus the layer's tables; owner_of [E] and row_of [E] (-1: not here) map expert ids.
    Or `local_source`, an expert source over rows 0..E_r-1 (parallel.offload: this rank's shard
    offloaded), in place of the tensors."""

    def __init__(self, form: StoredForm, layer: int, owners: list[int], comm: ExpertComm,
                 tensors: dict[str, torch.Tensor], runtime: ExpertParallelRuntime,
                 local_source: nn.Module | None = None):
        super().__init__()
        self.form, self.layer, self.comm, self.runtime = form, layer, comm, runtime
        self.num_experts, self.hidden, self.ffn = len(owners), form.hidden, form.ffn
        self.local = [e for e, r in enumerate(owners) if r == comm.rank]
        self.local_source = local_source
        row_of = [-1] * len(owners)
        for row, e in enumerate(self.local):
            row_of[e] = row
        device = next(iter(tensors.values())).device if tensors else comm.device
        self.register_buffer("owner_of", torch.tensor(owners, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("row_of", torch.tensor(row_of, dtype=torch.long, device=device), persistent=False)
        self.names = list(tensors)
        for name, t in tensors.items():
            self.register_buffer(name.replace(".", "_"), t)

    def stacked(self) -> dict[str, torch.Tensor]:
        """Returns this rank's experts {name: [E_r, ...]} and the layer's tables, as the form reads them."""
        return {name: getattr(self, name.replace(".", "_")) for name in self.names}

    def expert_bytes(self) -> int:
        """Returns the bytes of one expert as stored."""
        return self.form.expert_bytes(self.layer)

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, experts={len(self.local)}/{self.num_experts} on rank {self.comm.rank}, "
                f"form={self.form.name}")

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] for x [N, D], the experts
        wherever they live (every rank calls it with the same x, ids and weights)."""
        comm, what = self.comm, f"the expert exchange of layer {self.layer}"
        n, top_k = expert_ids.shape
        lo, hi = token_chunk(n, comm.world, comm.rank)
        slot_ids = expert_ids[lo:hi].reshape(-1)  # [N_r * A]
        slot_w = weights[lo:hi].reshape(-1)
        kept = torch.nonzero(slot_w != 0).squeeze(1)  # dynamic skip: zero weights add nothing
        dest = self.owner_of[slot_ids[kept]]  # [S]
        order = torch.argsort(dest, stable=True)
        slots = kept[order]  # [S] grouped by destination rank
        send_counts = torch.bincount(dest, minlength=comm.world)  # [R]
        recv_counts = comm.all_to_all(send_counts.to(comm.device), [1] * comm.world, [1] * comm.world, what)
        send, recv = send_counts.tolist(), recv_counts.tolist()  # the one host sync
        d = x.shape[1]
        ids_as_x = slot_ids[slots].contiguous().view(x.dtype).view(-1, 8 // x.element_size())  # [S, 8 / itemsize]
        packed = comm.all_to_all(torch.cat([x[lo:hi][slots // top_k], ids_as_x], dim=1), send, recv, what)
        recv_x, recv_ids = packed[:, :d].contiguous(), packed[:, d:].contiguous().view(torch.long).view(-1)  # [M, D], [M]
        back = comm.all_to_all(self._run_local(recv_x, recv_ids), recv, send, what)  # [S, D]
        per_slot = x.new_zeros((hi - lo) * top_k, x.shape[1])  # skipped slots stay 0
        per_slot[slots] = back
        # the gathered plan's reduction (experts.forms.SlotPlan), written out for a chunk of 0 tokens
        chunk = (per_slot.view(hi - lo, top_k, x.shape[1]) * weights[lo:hi, :, None]).sum(dim=1)  # [N_r, D]
        self._count(send, x.shape[1] * x.element_size())
        return self._gather(chunk, n)

    def _run_local(self, xs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Returns each received slot through its expert, unweighted, [M, D] for xs [M, D]."""
        if xs.shape[0] == 0 or not self.local:
            return xs.new_zeros(xs.shape)
        rows = self.row_of[ids][:, None]  # [M, 1]
        ones = torch.ones(rows.shape, dtype=xs.dtype, device=xs.device)
        if self.local_source is not None:
            return self.local_source(xs, rows, ones)
        return self.form.run(xs, rows, ones, self.stacked())

    def _gather(self, chunk: torch.Tensor, n: int) -> torch.Tensor:
        """Returns the ranks' chunks [N_r, D] joined into [N, D] on every rank."""
        world = self.comm.world
        width = -(-n // world)  # the largest chunk; others are padded to it for all_gather
        padded = chunk.new_zeros(width, chunk.shape[1])
        padded[:chunk.shape[0]] = chunk
        parts = self.comm.all_gather(padded, f"gathering the expert outputs of layer {self.layer}")
        pieces = []
        for r, part in enumerate(parts):
            lo, hi = token_chunk(n, world, r)
            pieces.append(part[:hi - lo])
        return torch.cat(pieces)

    def _count(self, send: list[int], row_bytes: int) -> None:
        rt, remote = self.runtime, sum(send) - send[self.comm.rank]
        rt.calls += 1
        rt.slots_local += send[self.comm.rank]
        rt.slots_remote += remote
        rt.bytes_sent += 2 * remote * row_bytes  # the inputs out, the outputs back


# ---- the loader ------------------------------------------------------------------------------------

def form_of(ctx: LoadContext) -> StoredForm:
    """Returns the stored form the checkpoint's experts are read in (dense, gpt-oss clamped or MXFP4,
    or a moekit-compressed form with its tables on ctx.device)."""
    from ..experts.forms import DenseForm
    from ..quant.config import QuantConfig, is_moekit_quantized

    cfg = ctx.config
    if is_moekit_quantized(ctx.ckpt.config):
        from ..quant.formats import form_from_checkpoint

        quant = QuantConfig.from_dict(ctx.ckpt.config["quantization_config"], str(ctx.ckpt.path / "config.json"))
        form = form_from_checkpoint(quant, cfg, ctx.ckpt, ctx.family, ctx.device)
        if not cfg.plain_experts:  # gpt-oss: biases and the clamped SwiGLU around the codes
            from ..experts.clamped import BiasedCompressedForm

            form = BiasedCompressedForm.of(form, cfg, ctx.dtype)
        return form
    if not cfg.plain_experts:
        from ..experts.clamped import form_for

        return form_for(ctx)
    return DenseForm(cfg.hidden_size, cfg.expert_ffn, ctx.dtype)


class ExpertParallelLoader(ExpertLoader):
    """Builds each MoE layer's ShardedExperts: reads only this rank's experts from the checkpoint.

    `expert_map` {layer: owning rank of each expert} places experts as given (any counts, a rank
    may own none of a layer); layers not in it are split in contiguous runs."""

    def __init__(self, comm: ExpertComm, expert_map: Mapping[int, Sequence[int]] | None = None):
        self.comm = comm
        self.expert_map = dict(expert_map or {})
        self.runtime = ExpertParallelRuntime(comm)
        self.form: StoredForm | None = None
        self.owners: dict[int, list[int]] = {}

    def _start(self, ctx: LoadContext) -> None:
        # first the collective check (every rank reaches it), then the checks each rank makes alike
        self.comm.check_same(checkpoint_digest(ctx), "checkpoint", str(ctx.ckpt.path))
        self._plan(ctx)
        self._check_map(self.comm)

    def _check_map(self, comm: ExpertComm) -> None:
        """Raises MoekitError on every rank of `comm` unless all placed the experts alike: a map each
        rank made itself (from its --expert-usage file) must be one map."""
        if self.expert_map:
            placed = hashlib.sha256(json.dumps(sorted(self.owners.items())).encode()).digest()
            comm.check_same(placed, "expert map", "its expert map",
                            hint="give every rank the same --expert-usage file (or expert map)")

    def _plan(self, ctx: LoadContext) -> None:
        """Sets each MoE layer's owners and the stored form (the same on every rank: no collective)."""
        cfg = ctx.config
        for layer in range(cfg.num_layers):
            count = cfg.experts_in(layer)
            if not count:
                continue
            given = self.expert_map.get(layer)
            self.owners[layer] = (contiguous_owners(count, self.comm.world, layer) if given is None
                                  else check_owners(given, count, self.comm.world, layer))
        unknown = sorted(set(self.expert_map) - set(self.owners))
        if unknown:
            raise MoekitError(f"the expert map names layer(s) {unknown}, which have no routed experts "
                              f"(MoE layers: {sorted(self.owners)})")
        self.form = form_of(ctx)

    def build(self, ctx: LoadContext, layer: int) -> nn.Module:
        if self.form is None:
            self._start(ctx)
        form, owners = self.form, self.owners[layer]
        local = [e for e, r in enumerate(owners) if r == self.comm.rank]
        tensors = form.empty(len(local), layer, ctx.device)
        with torch.no_grad():
            for row, e in enumerate(local):  # one expert at a time: lazy reads stay lazy
                form.read(ctx.ckpt, ctx.family, layer, e, {k: v[row] for k, v in tensors.items()})
        self.runtime.owned[layer] = len(local)
        return ShardedExperts(form, layer, owners, self.comm, {**tensors, **form.tables(layer)}, self.runtime)

    def finish(self, model: nn.Module, ctx: LoadContext):
        return self.runtime


def load_expert_parallel(path, comm: ExpertComm, expert_map: Mapping[int, Sequence[int]] | None = None,
                         dtype: str | torch.dtype | None = None, **kwargs) -> nn.Module:
    """Returns the model at `path` on comm.device with this rank's slice of every layer's experts
    (the non-expert weights whole); every rank of comm must call it with the same arguments."""
    from ..load import load_model

    return load_model(path, device=comm.device, dtype=dtype,
                      experts=ExpertParallelLoader(comm, expert_map), **kwargs)
