"""A bf16 model's batch-1 decode step on the CPU as a short run of native calls (decode.cpp,
matvec.cpp), for moekit.generate.

    step = CpuDecodeStep.build(model, cache)     # None (with `unsupported(...)` saying why) if it does not apply
    logits = step(token_id, position)            # [1, V] bf16, what model(token, cache, start=position) gives

Why: a decode step of a small MoE on a CPU reads its weights once (the time floor is their bytes
over host memory bandwidth), but in eager PyTorch each layer also runs ~40 small ops (norms, q/k
norm, rope, softmax attention, routing), each with dispatch and allocation costs and some with a
parallel region; on the 2-core test machine these added 2-3 ms to a ~25 ms step of the 4-layer
OLMoE shape. Here a layer is eight native calls over preallocated buffers: RMSNorm, the qkv
projection, q/k norm + rope + cache write, attention, o-projection, residual add + RMSNorm,
router + top-k, and the routed experts (read expert by expert; decode.cpp says why).

What it covers (`unsupported` names the first thing it does not): bf16 weights, batch 1, a dense
KVCache, grouped-query attention without sinks, latent attention, clipping or a sliding window,
RMSNorm, MoE layers with softmax top-k routing, resident SwiGLU experts and no shared expert,
no forward hooks, no expert placement (offload). Everything else decodes through model.forward.
Results agree with model.forward to bf16 rounding (tests/native/test_cpu_decode.py).

Shapes: D hidden, H query heads, Hkv kv heads, Dh head dim, S cache positions, E experts,
A experts per token, I expert ffn width, V vocab.
"""

from __future__ import annotations

import ctypes
import os

import torch

from . import library, register_declarations
from .matvec import MAX_ROWS  # noqa: F401 -- loads matvec's declarations with this module


def _declare(lib: ctypes.CDLL) -> None:
    i64, vp, f32, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.moekit_rmsnorm_bf16.argtypes = [vp, vp, i64, f32, vp]
    lib.moekit_rmsnorm_bf16.restype = None
    lib.moekit_add_rmsnorm_bf16.argtypes = [vp, vp, vp, i64, f32, vp]
    lib.moekit_add_rmsnorm_bf16.restype = None
    lib.moekit_qkv_rope_bf16.argtypes = [vp, i64, i64, i64, c_int, vp, vp, f32, f32, vp, vp, i64, vp, vp, vp, i64, i64]
    lib.moekit_qkv_rope_bf16.restype = c_int
    lib.moekit_dense_decode_attention_bf16.argtypes = [vp, vp, vp, i64, i64, i64, i64, i64, f32, vp, vp, c_int]
    lib.moekit_dense_decode_attention_bf16.restype = c_int
    lib.moekit_route_softmax_bf16.argtypes = [vp, i64, i64, c_int, vp, vp]
    lib.moekit_route_softmax_bf16.restype = c_int
    lib.moekit_moe_decode_bf16.argtypes = [vp, vp, vp, vp, vp, i64, i64, i64, vp, vp, vp, c_int]
    lib.moekit_moe_decode_bf16.restype = c_int


register_declarations(_declare)

_QK_NORM = {"none": 0, "full": 1, "head": 2}


def unsupported(model, cache) -> str | None:
    """Returns why CpuDecodeStep cannot run this model's decode steps over `cache`, or None."""
    from ..experts.resident import ResidentExperts
    from ..kv_cache import KVCache
    from ..linear import Linear

    cfg = model.config
    if os.environ.get("MOEKIT_CPU_DECODE", "1") == "0":
        return "MOEKIT_CPU_DECODE=0"
    if library() is None:
        from . import unavailable_reason

        return f"no native library: {unavailable_reason()}"
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return "not a bf16 model on the CPU"
    if getattr(model, "expert_runtime", None) is not None:
        return "an expert placement (offload) runs the experts"
    if not isinstance(cache, KVCache) or cache.keys[0].shape[0] != 1:
        return "not a batch-1 dense KVCache"
    if (cfg.clip_qkv is not None or cfg.sliding_window is not None or cfg.embedding_multiplier != 1.0
            or cfg.residual_multiplier != 1.0 or cfg.logits_scaling != 1.0 or cfg.expert_act != "silu"
            or cfg.expert_bias or cfg.router.scoring != "softmax" or cfg.router.group_limited
            or cfg.router.scaling_factor != 1.0 or cfg.shared_expert_ffn):
        return "a config option the native step does not implement"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global forward hooks"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "forward hooks on the model"
    if not _is(model.norm, "RMSNorm") or type(model.lm_head) is not Linear:
        return "the final norm or lm_head is not the plain kind"
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        if (not _is(layer, "DecoderLayer") or not _is(attn, "Attention") or not _is(mlp, "MoEBlock")
                or not _is(layer.input_norm, "RMSNorm") or not _is(layer.post_norm, "RMSNorm")
                or type(mlp.experts) is not ResidentExperts or mlp.skip_below > 0 or mlp.score_bias is not None):
            return "a layer that is not grouped-query attention + softmax-routed resident experts"
        linears = (attn.qkv, attn.o_proj, mlp.router)
        if any(type(m) is not Linear for m in linears):
            return "a projection that is not moekit.linear.Linear"
        tensors = [m.weight for m in linears] + [mlp.experts.gate_up, mlp.experts.down]
        tensors += [m.bias for m in linears if m.bias is not None]
        if any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in tensors):
            return "weights that are not contiguous bf16"
    return None


def _is(module, name: str) -> bool:
    """Returns whether `module` is exactly moekit.model's class `name` (a subclass may compute
    otherwise); by name, as moekit.model imports moekit.generate, which imports this module."""
    return type(module).__module__ == "moekit.model" and type(module).__qualname__ == name


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuDecodeStep:
    """One model's decode steps of one token over one KVCache, in native calls (see the module)."""

    @classmethod
    def build(cls, model, cache) -> CpuDecodeStep | None:
        """Returns a step for `model` over `cache`, or None where `unsupported` gives a reason."""
        return None if unsupported(model, cache) is not None else cls(model, cache)

    def __init__(self, model, cache):
        cfg = model.config
        self.lib = library()
        self.model, self.cache, self.cfg = model, cache, cfg
        self.threads = torch.get_num_threads()
        d, h, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dims = d, h, hkv, dh
        s = self.capacity = cache.capacity
        bf = torch.bfloat16
        with torch.inference_mode(False):
            positions = torch.arange(s)
            cos, sin = model.rope(positions)  # [S, rope_dim], computed once for every position
            self.cos, self.sin = cos.contiguous(), sin.contiguous()
            self.x = torch.empty(d, dtype=bf)  # residual stream
            self.normed = torch.empty(d, dtype=bf)
            self.delta = torch.empty(d, dtype=bf)  # o-projection or experts' output
            self.qkv = torch.empty(h * dh + 2 * hkv * dh, dtype=bf)
            self.q = torch.empty(h * dh, dtype=bf)
            self.attn = torch.empty(h * dh, dtype=bf)
            self.scores = torch.empty(h * s, dtype=torch.float32)
            self.logits = torch.empty(1, cfg.vocab_size, dtype=bf)
            self.xf = torch.empty(max(d, h * dh, cfg.expert_ffn), dtype=torch.float32)  # matvec's portable path
            layers = []
            for i, layer in enumerate(model.layers):
                attn, mlp = layer.attn, layer.mlp
                e = mlp.experts
                ffn = e.ffn
                top_k = mlp.top_k
                bufs = {"router": torch.empty(e.num_experts, dtype=bf),  # router logits [E]
                        "ids": torch.empty(top_k, dtype=torch.long), "weights": torch.empty(top_k),  # [A]
                        "h": torch.empty(max(top_k * ffn, d)),  # the expert kernel's accumulators
                        "hb": torch.empty(top_k * ffn, dtype=bf)}  # [A, I] activations
                layers.append({"layer": layer, "bufs": bufs, "top_k": top_k, "ffn": ffn, "num_experts": e.num_experts,
                               "q_scale": float(attn.q_scale), "keys": cache.keys[i], "values": cache.values[i]})
        self.layers = layers
        self.scale = dh ** -0.5  # Attention folds a non-default softmax scale into q (q_scale)
        self.biases: dict[int, torch.Tensor] = {}  # float32 copies of the projections' biases

    def _matvec(self, linear, x: torch.Tensor, out: torch.Tensor) -> None:
        w = linear.weight
        bias = None
        if linear.bias is not None:
            bias = self.biases.get(id(linear))
            if bias is None:
                bias = self.biases[id(linear)] = linear.bias.detach().float().contiguous()
        self.lib.moekit_matvec_bf16(x.data_ptr(), w.data_ptr(), _ptr(bias), out.data_ptr(), 1, w.shape[0], w.shape[1],
                                    self.xf.data_ptr(), self.threads)

    @torch.inference_mode()
    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Returns the logits [1, V] (bf16) of `token` at `position`, its keys and values written
        to the cache; the returned tensor is reused by the next call."""
        lib, cfg = self.lib, self.cfg
        d, h, hkv, dh = self.dims
        s = self.capacity
        if not 0 <= position < s:
            from ..errors import MoekitError

            raise MoekitError(f"KV cache holds {s} positions, asked to write position {position}")
        eps = cfg.rms_norm_eps
        qk_norm = _QK_NORM[cfg.qk_norm]
        rope_dim = cfg.rope_dim
        cos = self.cos.data_ptr() + position * rope_dim * 2
        sin = self.sin.data_ptr() + position * rope_dim * 2
        x, normed, delta = self.x, self.normed, self.delta
        x.copy_(self.model.embed.weight[token])
        for i, item in enumerate(self.layers):
            layer, bufs = item["layer"], item["bufs"]
            attn, mlp = layer.attn, layer.mlp
            if i == 0:
                lib.moekit_rmsnorm_bf16(x.data_ptr(), layer.input_norm.weight.data_ptr(), d, eps, normed.data_ptr())
            else:  # the previous layer's experts' output joins the residual stream first
                lib.moekit_add_rmsnorm_bf16(x.data_ptr(), delta.data_ptr(), layer.input_norm.weight.data_ptr(), d, eps,
                                            normed.data_ptr())
            self._matvec(attn.qkv, normed, self.qkv)
            qw = None if attn.q_norm is None else attn.q_norm.weight.data_ptr()
            kw = None if attn.k_norm is None else attn.k_norm.weight.data_ptr()
            keys, values = item["keys"], item["values"]
            lib.moekit_qkv_rope_bf16(self.qkv.data_ptr(), h, hkv, dh, qk_norm, qw, kw, eps, item["q_scale"], cos, sin,
                                     rope_dim, self.q.data_ptr(), keys.data_ptr(), values.data_ptr(), s, position)
            lib.moekit_dense_decode_attention_bf16(self.q.data_ptr(), keys.data_ptr(), values.data_ptr(), h, hkv, dh, s,
                                                   position + 1, self.scale, self.attn.data_ptr(),
                                                   self.scores.data_ptr(), self.threads)
            self._matvec(attn.o_proj, self.attn, delta)
            lib.moekit_add_rmsnorm_bf16(x.data_ptr(), delta.data_ptr(), layer.post_norm.weight.data_ptr(), d, eps,
                                        normed.data_ptr())
            self._matvec(mlp.router, normed, bufs["router"])
            top_k = item["top_k"]
            lib.moekit_route_softmax_bf16(bufs["router"].data_ptr(), item["num_experts"], top_k,
                                          int(bool(cfg.norm_topk_prob)), bufs["ids"].data_ptr(),
                                          bufs["weights"].data_ptr())
            e = mlp.experts
            lib.moekit_moe_decode_bf16(normed.data_ptr(), e.gate_up.data_ptr(), e.down.data_ptr(), bufs["ids"].data_ptr(),
                                       bufs["weights"].data_ptr(), top_k, d, item["ffn"], bufs["h"].data_ptr(),
                                       bufs["hb"].data_ptr(), delta.data_ptr(), self.threads)
        lib.moekit_add_rmsnorm_bf16(x.data_ptr(), delta.data_ptr(), self.model.norm.weight.data_ptr(), d, eps,
                                    normed.data_ptr())
        self._matvec(self.model.lm_head, normed, self.logits[0])
        return self.logits
