"""One training loop for moekit models: tiny models from scratch, and fine-tuning (router, pre-gates).

`train` runs AdamW (weight decay on 2-D+ weights only) with linear warm-up and cosine decay,
gradient clipping, bf16 autocast on CUDA (float32 on the CPU), an optional filter on which
parameters train, and an optional Switch-style load-balancing loss read from the routers by
forward hooks, so model.py needs no training code. `lm_loss` and `evaluate_perplexity` score
next-token prediction; `init_weights` gives a freshly built MoEModel its starting weights.

Shape legend:
    B = batch, T = tokens per sequence, V = vocab, M = tokens in a stream,
    N = B*T routed tokens, E = experts, A = experts per token (top-k)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MoekitError
from .experts import ResidentExperts
from .model import Attention, DenseMLP, MoEBlock, MoEModel, RMSNorm


# ---- initialisation ---------------------------------------------------------------------------

def init_weights(model: MoEModel, std: float = 0.02, seed: int = 0) -> MoEModel:
    """Returns `model` with fresh weights: normal(0, std) for linears, embeddings and experts,
    ones for RMSNorm weights, zeros for biases; output projections (attention o_proj, expert and
    dense-MLP down) scaled by 1/sqrt(2 * num_layers) so the residual stream does not grow with depth.

    Values are drawn on the CPU from one seeded generator in module order, so the same seed
    gives the same weights on every device.
    """
    gen = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * model.config.num_layers)
    outputs = {id(m.o_proj) for m in model.modules() if isinstance(m, Attention)}
    outputs |= {id(m.down) for m in model.modules() if isinstance(m, DenseMLP)}

    def normal(p: torch.Tensor, s: float) -> None:
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)

    with torch.no_grad():
        for name, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Embedding):
                normal(module.weight, std)
            elif isinstance(module, nn.Linear):
                normal(module.weight, out_std if id(module) in outputs else std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, ResidentExperts):
                normal(module.gate_up, std)
                normal(module.down, out_std)
            else:
                raise MoekitError(
                    f"init_weights does not know how to initialise {name} ({type(module).__name__}, "
                    f"parameters {sorted(own)}); add a rule for it in moekit.train.init_weights")
    return model


# ---- losses -----------------------------------------------------------------------------------

def lm_loss(model: MoEModel, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Returns the next-token cross-entropy (0-d float32) of input_ids [B, T]: the model reads
    tokens 0..T-2 and predicts 1..T-1, so B*(T-1) tokens are scored."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise MoekitError(f"lm_loss needs input_ids of shape [batch, tokens >= 2], got {list(input_ids.shape)}")
    logits = model(input_ids[:, :-1])  # [B, T-1, V]
    targets = input_ids[:, 1:]  # [B, T-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


class LoadBalance:
    """Switch-style load-balancing loss of every MoE layer, read from router outputs by hooks.

    Inside ``with LoadBalance(model) as balance:`` every forward pass run with gradients records
    each MoE block's router logits [N, E] (evaluation under no_grad is not counted);
    ``balance.loss()`` returns the mean over MoE layers of
    ``E * sum_e fraction_routed[e] * mean_prob[e]`` and forgets the records. fraction_routed
    counts top-k slots (so it sums to 1 over experts); the loss is 1.0 for uniform routing and
    E for a router that sends every token to one expert.
    """

    def __init__(self, model: nn.Module):
        self.blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
        if not self.blocks:
            raise MoekitError("the load-balancing loss needs MoE layers, and this model has none; "
                              "set aux_loss_coef=0")
        self.records: list[tuple[torch.Tensor, int]] = []  # (router logits [N, E], top_k)
        self._handles: list[Any] = []

    def __enter__(self) -> "LoadBalance":
        for block in self.blocks:
            self._handles.append(block.router.register_forward_hook(self._hook(block.top_k)))
        return self

    def _hook(self, top_k: int) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: tuple, logits: torch.Tensor) -> None:
            if torch.is_grad_enabled():  # evaluation inside a training run must not count
                self.records.append((logits, top_k))
        return record

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.records.clear()

    def loss(self) -> torch.Tensor:
        """Returns the mean load-balancing loss (0-d float32) over the recorded router calls."""
        if not self.records:
            raise MoekitError("no router outputs recorded: run a forward pass inside `with LoadBalance(model)`")
        losses = [balance_loss(logits, top_k) for logits, top_k in self.records]
        self.records.clear()
        return torch.stack(losses).mean()


def balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Returns E * sum_e fraction_routed[e] * mean_prob[e] (0-d float32) for router logits [N, E]."""
    logits = logits.reshape(-1, logits.shape[-1])
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
    ids = torch.topk(probs, top_k, dim=-1).indices  # [N, A]
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts).float()  # [E]
    fraction_routed = counts / ids.numel()
    return num_experts * (fraction_routed * probs.mean(dim=0)).sum()


# ---- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_perplexity(model: MoEModel, token_ids: torch.Tensor, seqlen: int, batch: int = 8,
                        progress: bool = False) -> tuple[float, int]:
    """Returns (perplexity, tokens scored) of a token stream token_ids [M].

    The stream is cut into windows of seqlen + 1 tokens that share only their boundary token:
    the model reads seqlen tokens of each and every token after the first is scored exactly
    once (M - 1 in all), without context from the window before. `progress` shows the scored
    tokens on stderr (moekit.progress: a bar on a terminal, periodic lines otherwise).
    """
    from .progress import Progress

    token_ids = token_ids.reshape(-1)
    if token_ids.numel() < 2:
        raise MoekitError(f"perplexity needs at least 2 tokens, got {token_ids.numel()}")
    if not 1 <= seqlen <= model.config.max_position_embeddings:
        raise MoekitError(f"seqlen {seqlen} must be in 1..{model.config.max_position_embeddings} "
                          "(the model's max_position_embeddings)")
    device = model.device
    was_training = model.training
    model.eval()
    full = (token_ids.numel() - 1) // seqlen
    pieces: list[torch.Tensor] = []
    if full:
        windows = token_ids[: full * seqlen + 1].unfold(0, seqlen + 1, seqlen)  # [W, seqlen+1]
        pieces += list(windows.split(batch))
    if token_ids.numel() - 1 > full * seqlen:
        pieces.append(token_ids[full * seqlen:][None])  # the short last window
    total = torch.zeros((), dtype=torch.float64, device=device)
    bar = Progress(token_ids.numel() - 1, "scoring", unit="tokens", enabled=progress)
    try:
        with _autocast(device):
            for piece in pieces:
                total += lm_loss(model, piece.to(device), reduction="sum").double()
                bar.update(piece.shape[0] * (piece.shape[1] - 1))
    finally:
        bar.close()
        model.train(was_training)
    scored = token_ids.numel() - 1
    return math.exp(total.item() / scored), scored


# ---- training ---------------------------------------------------------------------------------

def scheduled_lr(lr: float, step: int, warmup_steps: int, progress: float, min_lr_ratio: float) -> float:
    """Returns the learning rate at `step`: lr times a linear warm-up over warmup_steps times a
    cosine that falls from 1 to min_lr_ratio as progress goes from 0 to 1."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return lr * warm * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


@dataclass
class TrainResult:
    """What one `train` call did: steps, tokens, time, why it stopped, and the logged curve."""

    steps: int = 0  # optimizer steps taken
    tokens: int = 0  # tokens in the batches trained on (B*T per step)
    seconds: float = 0.0  # wall-clock time of the loop
    stop_reason: str = "steps"  # "steps" | "time" (max_seconds) | "data" (batches ran out)
    final_loss: float = float("nan")  # mean loss of the last logged interval
    history: list[dict[str, float]] = field(default_factory=list)  # one record per log interval


def train(model: MoEModel, batches: Iterable[torch.Tensor], steps: int, lr: float = 1e-3, *,
          warmup_steps: int = 100, min_lr_ratio: float = 0.1, weight_decay: float = 0.1,
          betas: tuple[float, float] = (0.9, 0.95), grad_clip: float | None = 1.0,
          aux_loss_coef: float = 0.0, trainable: Callable[[str], bool] | None = None,
          log_every: int = 10, on_log: Callable[[dict[str, float]], None] | None = None,
          max_seconds: float | None = None,
          extra_loss: Callable[[], torch.Tensor] | None = None) -> TrainResult:
    """Returns a TrainResult after training `model` in place on `batches` (token ids [B, T]).

    Runs `steps` AdamW steps on next-token cross-entropy, plus aux_loss_coef times the
    load-balancing loss (see LoadBalance) when it is > 0. `trainable(name)` picks the parameters
    that train (default: all); the others are frozen for the call and their requires_grad flags
    are restored after. Every `log_every` steps `on_log` receives a record (step, loss, aux_loss,
    lr, grad_norm, tokens_per_s, elapsed_s, and extra_loss when `extra_loss` is given); keys it adds (an evaluation, say) stay in the
    history. With `max_seconds` the loop stops when the time is
    up, and the cosine follows whichever of steps or time is further along, so the learning
    rate reaches its floor by the end either way. `extra_loss()`, when given, is called after
    each forward pass and its (already weighted) value is added to the loss (logged as extra_loss).
    """
    if steps <= 0:
        raise MoekitError(f"steps must be > 0, got {steps}")
    if log_every <= 0:
        raise MoekitError(f"log_every must be > 0, got {log_every}")
    named = list(model.named_parameters())
    saved_flags = {name: p.requires_grad for name, p in named}
    # stored bytes (MXFP4 blocks and scales, compressed codes) are not trainable, whatever their name
    chosen = [(n, p) for n, p in named if (trainable is None or trainable(n)) and p.is_floating_point()]
    if not chosen:
        raise MoekitError("the trainable filter matched no parameter; names look like "
                          f"{', '.join(n for n, _ in named[:4])}, ...")
    chosen_ids = {id(p) for _, p in chosen}
    for _, p in named:
        p.requires_grad_(id(p) in chosen_ids)
    params = [p for _, p in chosen]
    device = model.device
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas,
                                  fused=device.type == "cuda")
    balance = LoadBalance(model) if aux_loss_coef > 0 else None
    result = TrainResult()
    was_training = model.training
    model.train()
    start = time.perf_counter()
    interval_start, interval_tokens, interval_steps = start, 0, 0
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    extra_sum = torch.zeros((), device=device)
    lr_now, grad_norm = lr, float("nan")

    def log(step: int) -> None:
        nonlocal interval_start, interval_tokens, interval_steps, loss_sum, aux_sum, extra_sum
        loss, aux = loss_sum.item(), aux_sum.item()  # waits for the device: the timing is honest
        now = time.perf_counter()
        record = {"step": step, "loss": loss / interval_steps,
                  "aux_loss": aux / interval_steps if balance else float("nan"),
                  "lr": lr_now, "grad_norm": float(grad_norm),
                  "tokens_per_s": interval_tokens / max(now - interval_start, 1e-9),
                  "elapsed_s": now - start}
        if extra_loss is not None:  # absent otherwise, so print_log shows it only when there is one
            record["extra_loss"] = extra_sum.item() / interval_steps
        result.history.append(record)
        result.final_loss = record["loss"]
        if on_log is not None:
            on_log(record)
        interval_start, interval_tokens, interval_steps = time.perf_counter(), 0, 0  # on_log's time not counted
        loss_sum, aux_sum = torch.zeros_like(loss_sum), torch.zeros_like(aux_sum)
        extra_sum = torch.zeros_like(extra_sum)

    iterator = iter(batches)
    try:
        with balance if balance is not None else contextlib.nullcontext():
            for step in range(steps):
                elapsed = time.perf_counter() - start
                if max_seconds is not None and elapsed >= max_seconds:
                    result.stop_reason = "time"
                    break
                try:
                    batch = next(iterator).to(device, non_blocking=True)
                except StopIteration:
                    result.stop_reason = "data"
                    break
                progress = step / steps
                if max_seconds is not None:
                    progress = max(progress, elapsed / max_seconds)
                lr_now = scheduled_lr(lr, step, warmup_steps, progress, min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
                with _autocast(device):
                    loss = lm_loss(model, batch)
                    total = loss
                    if balance is not None:
                        aux = balance.loss()
                        total = loss + aux_loss_coef * aux
                        aux_sum += aux.detach()
                    if extra_loss is not None:
                        extra = extra_loss()
                        total = total + extra
                        extra_sum += extra.detach()
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if grad_clip:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                loss_sum += loss.detach()
                result.steps += 1
                result.tokens += batch.numel()
                interval_tokens += batch.numel()
                interval_steps += 1
                if result.steps % log_every == 0:
                    log(result.steps)
            if interval_steps:
                log(result.steps)
    finally:
        for name, p in named:
            p.requires_grad_(saved_flags[name])
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def print_log(record: dict[str, float]) -> None:
    """Prints one training log record as a line (the usual `on_log` for scripts)."""
    aux = "" if math.isnan(record["aux_loss"]) else f"  aux {record['aux_loss']:.3f}"
    print(f"step {int(record['step']):6d}  loss {record['loss']:.4f}{aux}  lr {record['lr']:.2e}  "
          f"gnorm {record['grad_norm']:.2f}  {record['tokens_per_s'] / 1e3:8.1f}k tok/s  "
          f"{record['elapsed_s']:6.0f}s" + "".join(f"  {k} {v:.4g}" for k, v in record.items() if k not in _LOGGED),
          flush=True)


_LOGGED = ("step", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s")


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 matmuls on CUDA (weights stay float32 for the optimizer); the CPU trains in float32
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
