"""Random-weight checkpoints in a family's Hugging Face layout, for speed and memory benchmarks
(routing of random weights is near-uniform: fine for speed, useless for quality).

Weights are N(0, 0.02) drawn on the given device (fast on a GPU), norms are ones. The writer is
moekit's own (save.write_checkpoint: sharded, atomic, sha256 per shard), fed one layer at a time
so host memory stays near one layer.

Shape legend: L = layers, D = hidden, I = expert ffn, E = experts, V = vocab.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

Rand = Callable[..., torch.Tensor]  # rand(*shape) -> a bf16 CPU tensor


def olmoe_hf_config(layers: int, hidden: int, expert_ffn: int, experts: int, top_k: int, heads: int,
                    kv_heads: int, vocab: int, max_positions: int = 4096) -> dict:
    """Returns an OlmoeForCausalLM config.json dict (untied embeddings, no eos: generation runs to
    max_new_tokens)."""
    return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": expert_ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_experts": experts,
            "num_experts_per_tok": top_k, "norm_topk_prob": False, "hidden_act": "silu",
            "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "clip_qkv": None, "eos_token_id": None, "pad_token_id": None,
            "bos_token_id": None, "torch_dtype": "bfloat16"}


def mixtral_hf_config(layers: int, hidden: int, expert_ffn: int, experts: int, top_k: int, heads: int,
                      kv_heads: int, vocab: int, max_positions: int = 4096) -> dict:
    """Returns a MixtralForCausalLM config.json dict (no sliding window, no eos: generation runs to
    max_new_tokens)."""
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": expert_ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_local_experts": experts,
            "num_experts_per_tok": top_k, "hidden_act": "silu", "max_position_embeddings": max_positions,
            "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
            "eos_token_id": None, "pad_token_id": None, "bos_token_id": None, "torch_dtype": "bfloat16"}


def qwen3_moe_hf_config(layers: int, hidden: int, expert_ffn: int, experts: int, top_k: int, heads: int,
                        kv_heads: int, vocab: int, max_positions: int = 4096) -> dict:
    """Returns a Qwen3MoeForCausalLM config.json dict (head dim 128, every layer sparse, no eos:
    generation runs to max_new_tokens)."""
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab,
            "hidden_size": hidden, "moe_intermediate_size": expert_ffn, "intermediate_size": 3 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": 128, "num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu",
            "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "tie_word_embeddings": False, "eos_token_id": None, "pad_token_id": None, "bos_token_id": None,
            "torch_dtype": "bfloat16"}


def device_rand(device: torch.device, seed: int = 0, std: float = 0.02,
                generator: torch.Generator | None = None) -> Rand:
    """Returns rand(*shape): N(0, std) bf16 drawn on `device` from one generator (`generator`, else
    a new one seeded with `seed`), moved to the CPU."""
    gen = generator if generator is not None else torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) * std).cpu()

    return rand


def non_expert_tensors(family, cfg, rand: Rand) -> dict[str, torch.Tensor]:
    """Returns every tensor but the routed experts, named as `family` names them: embeddings,
    lm_head (untied), final norm, and per layer the norms, q/k/v/o (+ q/k norms) and the router."""
    d, qd, kvd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    ones = lambda n: torch.ones(n, dtype=torch.bfloat16)  # noqa: E731
    tensors = {"model.embed_tokens.weight": rand(cfg.vocab_size, d), "model.norm.weight": ones(d)}
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = rand(cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        for name in family.norm_names(i):
            tensors[name] = ones(d)
        for part, rows in (("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)):
            tensors[family.attn_name(i, part) + ".weight"] = rand(rows, d)
        tensors[family.attn_name(i, "o_proj") + ".weight"] = rand(d, qd)
        norm_sizes = {"head": (cfg.head_dim, cfg.head_dim), "full": (qd, kvd)}.get(cfg.qk_norm)
        if norm_sizes:
            tensors[family.attn_name(i, "q_norm") + ".weight"] = ones(norm_sizes[0])
            tensors[family.attn_name(i, "k_norm") + ".weight"] = ones(norm_sizes[1])
        tensors[family.router_name(i)] = rand(cfg.num_experts, d)
    return tensors


def _tensors(family, cfg, rand: Rand) -> Iterator[tuple[str, torch.Tensor]]:
    yield from non_expert_tensors(family, cfg, rand).items()
    e, ffn, d = cfg.num_experts, cfg.expert_ffn, cfg.hidden_size
    for i in range(cfg.num_layers):
        gate_up, down = rand(e, 2 * ffn, d), rand(e, d, ffn)  # [E, 2I, D], [E, D, I]
        for j in range(e):
            gate, up, dn = family.expert_names(i, j)
            yield gate, gate_up[j, :ffn]
            yield up, gate_up[j, ffn:]
            yield dn, down[j]


def write_random_checkpoint(folder: str | Path, hf: dict, device: str | torch.device = "cpu", seed: int = 0,
                            tokenizer_from: str | Path | None = None) -> tuple[Path, object, int]:
    """Returns (folder, moekit ModelConfig, tensor bytes) after writing a random bf16 checkpoint of
    the config dict `hf` there (replacing one already there); the tokenizer files of
    `tokenizer_from` (a model folder) are copied along, so `moekit generate` can run it."""
    from moekit.families import family_for
    from moekit.save import write_checkpoint

    folder = Path(folder)
    family = family_for(hf, where=str(folder))
    cfg = family.config(hf)
    extra: dict[str, bytes] = {}
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            p = Path(tokenizer_from) / name
            if p.exists():
                extra[name] = p.read_bytes()
    total = 0

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal total
        for name, t in _tensors(family, cfg, device_rand(torch.device(device), seed)):
            total += t.numel() * t.element_size()
            yield name, t

    write_checkpoint(counted(), folder, hf, extra, overwrite=True)
    return folder, cfg, total
