"""Calibration: run text through a model one decoder block at a time, for compression and pruning.

Hidden states of every sample live in host memory (one float32 buffer [N, D], a sample is a
run of T rows); only the current block's weights are on the device, read lazily from the
checkpoint, and freed before the next block is read. So a model larger than the device, and
larger than host memory, can be calibrated. At each MoE block the caller's `on_moe_layer`
sees the block's normed inputs, the routing, and the tokens routed to each expert (gathered
with vectorised indexing), and may swap the block's expert source (e.g. for its quantized
form) before the block's outputs are computed, so later blocks calibrate on what the
compressed model will really see.

Shape legend:
    S = samples, T = tokens per sample, N = S*T tokens, D = hidden, E = experts,
    A = experts per token, n_e = tokens routed to expert e
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import parse_device, parse_dtype
from .data import text_tokens
from .errors import MoekitError
from .experts import group_by_expert
from .load import ExpertLoader, LoadContext, fill_layer, read_config
from .model import DecoderLayer, MoEBlock
from .rope import cos_sin, inverse_frequencies


def calibration_tokens(docs: list[str], tokenizer, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Returns `samples` windows [S, T] of seqlen tokens drawn (seeded) from the documents' token
    stream (documents joined by the tokenizer's eos token when it has one)."""
    if samples <= 0 or seqlen <= 0:
        raise MoekitError(f"--samples and --seqlen must be > 0, got {samples} and {seqlen}")
    return sample_windows(text_tokens(docs, tokenizer), samples, seqlen, seed)


def sample_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Returns `samples` windows [S, T] of seqlen tokens at seeded random starts in the stream ids [M]."""
    if ids.numel() < seqlen:
        raise MoekitError(f"the calibration text has {ids.numel()} tokens, fewer than --seqlen {seqlen}; "
                          "give more text or a shorter --seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


@dataclass
class MoELayerInputs:
    """What one MoE block saw on the calibration set (host tensors unless said otherwise)."""

    layer: int
    block: MoEBlock  # on the device, with its (dense) expert source attached
    inputs: torch.Tensor  # [N, D] float32: the normed inputs of the block (what experts read)
    expert_ids: torch.Tensor  # [N, A] int64
    weights: torch.Tensor  # [N, A] float32 routing weights
    logits: torch.Tensor  # [N, E] float32 router logits
    token_of: torch.Tensor = field(init=False)  # [N*A] token index of each slot, sorted by expert
    bounds: list[int] = field(init=False)  # [E+1] each expert's run in token_of

    def __post_init__(self) -> None:
        groups = group_by_expert(self.expert_ids, self.weights, self.logits.shape[1])
        self.token_of, self.bounds = groups.token_of, groups.offsets()

    @property
    def num_experts(self) -> int:
        return len(self.bounds) - 1

    def tokens_per_expert(self) -> list[int]:
        """Returns n_e, the routed tokens of each expert."""
        return [self.bounds[e + 1] - self.bounds[e] for e in range(self.num_experts)]

    def token_ids_of(self, expert: int, max_tokens: int | None = None, seed: int = 0) -> torch.Tensor:
        """Returns the indices [n_e] (into inputs) of the tokens routed to `expert`; a seeded random
        subset of max_tokens when there are more."""
        idx = self.token_of[self.bounds[expert]:self.bounds[expert + 1]]
        if max_tokens is not None and idx.numel() > max_tokens:
            gen = torch.Generator().manual_seed(seed * 100003 + expert)
            idx = idx[torch.randperm(idx.numel(), generator=gen)[:max_tokens]].sort().values
        return idx

    def expert_inputs(self, expert: int, max_tokens: int | None = None, seed: int = 0) -> torch.Tensor:
        """Returns the inputs [n_e, D] of the tokens routed to `expert` (see token_ids_of)."""
        return self.inputs[self.token_ids_of(expert, max_tokens, seed)]


# on_moe_layer(inputs) -> a replacement expert source for the block (on the device), or None
MoELayerHook = Callable[[MoELayerInputs], "nn.Module | None"]


@dataclass
class CalibrationReport:
    layers: int
    tokens: int
    moe_layers: int
    hidden: torch.Tensor  # [N, D] float32: the residual stream after the last block (before the final norm)


@torch.no_grad()
def run_calibration(path: str | Path, token_ids: torch.Tensor, on_moe_layer: MoELayerHook,
                    device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                    batch: int = 8, progress: bool | None = None,
                    loader: ExpertLoader | None = None) -> CalibrationReport:
    """Returns a report after running token_ids [S, T] through the model at `path` block by block,
    calling on_moe_layer at every MoE block (see the module docstring).

    `batch` samples go through a block at once; `dtype` is the compute dtype of the block
    (default float32: calibration statistics want the precision)."""
    device = parse_device(device)
    dtype = parse_dtype(dtype, torch.float32)
    if token_ids.dim() != 2:
        raise MoekitError(f"calibration token ids must be [samples, tokens], got {list(token_ids.shape)}")
    ckpt, family, cfg = read_config(path)
    samples, seqlen = token_ids.shape
    if seqlen > cfg.max_position_embeddings:
        raise MoekitError(f"--seqlen {seqlen} exceeds the model's max_position_embeddings "
                          f"({cfg.max_position_embeddings})")
    ctx = LoadContext(ckpt, family, cfg, device, dtype)
    loader = loader or ExpertLoader()
    embed = ckpt.read("model.embed_tokens.weight", shape=(cfg.vocab_size, cfg.hidden_size))
    hidden = embed[token_ids.reshape(-1)].float() * cfg.embedding_multiplier  # [N, D], host
    del embed
    inv_freq, scale = inverse_frequencies(cfg.rope, cfg.rope_dim)
    cos, sin = cos_sin(inv_freq.to(device), scale, torch.arange(seqlen, device=device), dtype)
    disable = not sys.stderr.isatty() if progress is None else not progress
    for i in tqdm(range(cfg.num_layers), desc="calibrating", unit="layer", disable=disable):
        layer = _build_layer(ctx, i, loader)
        if isinstance(layer.mlp, MoEBlock):
            _run_moe_layer(layer, i, hidden, samples, seqlen, cos, sin, batch, device, dtype, on_moe_layer)
        else:
            for lo in range(0, samples, batch):
                rows = slice(lo * seqlen, min(samples, lo + batch) * seqlen)
                x = hidden[rows].view(-1, seqlen, cfg.hidden_size).to(device, dtype)
                hidden[rows] = layer(x, cos, sin).reshape(-1, cfg.hidden_size).float().cpu()
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return CalibrationReport(layers=cfg.num_layers, tokens=samples * seqlen, moe_layers=cfg.num_moe_layers,
                             hidden=hidden)


def _build_layer(ctx: LoadContext, i: int, loader: ExpertLoader) -> DecoderLayer:
    """Returns decoder layer i on ctx.device, filled from the checkpoint (experts by `loader`)."""
    cfg = ctx.config
    with torch.device("meta"):
        layer = DecoderLayer(cfg, i).to(ctx.dtype)
    if isinstance(layer.mlp, MoEBlock):
        layer.mlp.experts = nn.Identity()
    layer = layer.to_empty(device=ctx.device)
    fill_layer(layer, ctx, i, loader)
    return layer.eval()


def _run_moe_layer(layer: DecoderLayer, i: int, hidden: torch.Tensor, samples: int, seqlen: int,
                   cos: torch.Tensor, sin: torch.Tensor, batch: int, device: torch.device,
                   dtype: torch.dtype, on_moe_layer: MoELayerHook) -> None:
    """Two passes over the samples: attention + routing (then the hook), then the MoE block."""
    d = hidden.shape[1]
    block: MoEBlock = layer.mlp
    normed = torch.empty_like(hidden)  # [N, D] inputs of the MoE block
    ids = torch.empty(hidden.shape[0], block.top_k, dtype=torch.long)
    weights = torch.empty(hidden.shape[0], block.top_k)
    logits = torch.empty(hidden.shape[0], block.router.out_features)  # this layer's experts, not the largest layer's
    for lo in range(0, samples, batch):
        rows = slice(lo * seqlen, min(samples, lo + batch) * seqlen)
        x = hidden[rows].view(-1, seqlen, d).to(device, dtype)
        q, k, v = layer.pre_attn(x, cos, sin)
        h = layer.add_attention(x, layer.attn.attend(q, k, v, None, 0))
        u = layer.post_norm(h).reshape(-1, d)
        lg, e_ids, w = block.route(u)
        hidden[rows] = h.reshape(-1, d).float().cpu()  # the residual, until the block's output is added
        normed[rows], ids[rows], weights[rows], logits[rows] = u.float().cpu(), e_ids.cpu(), w.float().cpu(), lg.float().cpu()
    replacement = on_moe_layer(MoELayerInputs(i, block, normed, ids, weights, logits))
    if replacement is not None:
        block.experts = replacement
    for lo in range(0, samples, batch):
        rows = slice(lo * seqlen, min(samples, lo + batch) * seqlen)
        u = normed[rows].view(-1, seqlen, d).to(device, dtype)
        hidden[rows] = layer.add_mlp(hidden[rows], block(u).reshape(-1, d).float().cpu())
