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
RMSNorm, MoE layers with softmax top-k routing, resident SwiGLU experts (bf16, or compressed:
int-N or the ternary code, run by compressed.cpp's kernels as CompressedExperts runs them on the
CPU, so the same bits for the same input and routing) and no shared expert,
no forward hooks, no expert placement (offload). Everything else decodes through model.forward.
Results agree with model.forward to bf16 rounding (tests/native/test_cpu_decode.py). Opt-in
($MOEKIT_CPU_DENSE, `dense`): "int8" puts the qkv and o-projections and the LM head in int8 per row
(dense_q8.cpp; half their bytes, not bit-exact: tests/native/test_dense_q8.py measures it), "int4"
the qkv and o-projections in int4 (groups of 128 columns; a quarter) and the LM head in int8.

Shapes: D hidden, H query heads, Hkv kv heads, Dh head dim, S cache positions, E experts,
A experts per token, I expert ffn width, V vocab.
"""

from __future__ import annotations

import ctypes
import os

import torch

from . import library, register_declarations
from .compressed import DecodeExperts
from .dense_q8 import dense_form, quantized
from .experts import MAX_ROW
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
    lib.moekit_argmax_bf16.argtypes = [vp, i64]
    lib.moekit_argmax_bf16.restype = i64
    lib.moekit_decode_step_bf16.argtypes = [ctypes.POINTER(_StepPlan), i64, i64]
    lib.moekit_decode_step_bf16.restype = c_int


_P = ctypes.c_void_p


class _LayerPlan(ctypes.Structure):
    """decode.cpp's LayerPlan: one layer's weights and buffers, as addresses."""

    _fields_ = [("in_norm", _P), ("post_norm", _P), ("wqkv", _P), ("bqkv", _P), ("q_norm", _P), ("k_norm", _P),
                ("q_scale", ctypes.c_float), ("k_cache", _P), ("v_cache", _P), ("wo", _P), ("bo", _P), ("wr", _P),
                ("br", _P), ("experts", ctypes.c_int64), ("top_k", ctypes.c_int64), ("ffn", ctypes.c_int64),
                ("gate_up", _P), ("down", _P), ("router", _P), ("ids", _P), ("weights", _P), ("acc", _P), ("act", _P),
                ("compressed", _P), ("wqkv_q8", _P), ("wo_q8", _P)]


class _StepPlan(ctypes.Structure):
    """decode.cpp's StepPlan: shapes, the non-layer weights and the step's buffers."""

    _fields_ = [(n, ctypes.c_int64) for n in ("layers", "D", "H", "Hkv", "Dh", "S", "rope_dim", "V")] + [
        ("qk_norm", ctypes.c_int32), ("norm_topk", ctypes.c_int32), ("threads", ctypes.c_int32),
        ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("embed", _P), ("final_norm", _P),
        ("lm_head", _P), ("lm_bias", _P), ("cos", _P), ("sin", _P), ("x", _P), ("normed", _P), ("delta", _P),
        ("qkv", _P), ("q", _P), ("attn", _P), ("logits", _P), ("scores", _P), ("xf", _P),
        ("layer", ctypes.POINTER(_LayerPlan)), ("lm_head_q8", _P)]


register_declarations(_declare)

_QK_NORM = {"none": 0, "full": 1, "head": 2}


def config_unsupported(cfg) -> str | None:
    """Returns why CpuDecodeStep cannot run a model of this ModelConfig whatever its weights, or
    None; read before loading (the CLI's CPU default dtype) and again by `unsupported`."""
    if os.environ.get("MOEKIT_CPU_DECODE", "1") == "0":
        return "MOEKIT_CPU_DECODE=0"
    if library() is None:
        from . import unavailable_reason

        return f"no native library: {unavailable_reason()}"
    if (cfg.clip_qkv is not None or cfg.sliding_window is not None or cfg.embedding_multiplier != 1.0
            or cfg.residual_multiplier != 1.0 or cfg.logits_scaling != 1.0 or cfg.expert_act != "silu"
            or cfg.expert_bias or cfg.router.scoring != "softmax" or cfg.router.group_limited
            or cfg.router.scaling_factor != 1.0 or cfg.router.correction_bias or cfg.shared_expert_ffn):
        return "a config option the native step does not implement"
    if cfg.mla is not None or cfg.attention_sinks or cfg.norm != "rms" or not all(cfg.moe_layers):
        return "latent attention, attention sinks, LayerNorm or dense MLP layers"
    if (cfg.num_heads > 256 or cfg.num_heads * cfg.head_dim > 1 << 15 or cfg.top_k > 64
            or max(cfg.experts_in(i) for i in range(cfg.num_layers)) > 4096
            or max(cfg.hidden_size, cfg.expert_ffn) > MAX_ROW):
        return ("a shape beyond decode.cpp's limits (256 heads, 32768 q features, top-64 of 4096 experts, "
                "rows of 32768: compressed.cpp's too)")
    return None


def unsupported(model, cache) -> str | None:
    """Returns why CpuDecodeStep cannot run this model's decode steps over `cache`, or None."""
    from ..experts.resident import ResidentExperts
    from ..kv_cache import KVCache
    from ..linear import Linear
    from ..quant.formats import CompressedExperts
    from .compressed import decode_unsupported

    why = config_unsupported(model.config)
    if why is not None:
        return why
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return "not a bf16 model on the CPU"
    if getattr(model, "expert_runtime", None) is not None:
        return "an expert placement (offload) runs the experts"
    if not isinstance(cache, KVCache) or cache.keys[0].shape[0] != 1:
        return "not a batch-1 dense KVCache"
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
                or type(mlp.experts) not in (ResidentExperts, CompressedExperts) or mlp.skip_below > 0
                or mlp.score_bias is not None):
            return "a layer that is not grouped-query attention + softmax-routed resident experts"
        linears = (attn.qkv, attn.o_proj, mlp.router)
        if any(type(m) is not Linear for m in linears):
            return "a projection that is not moekit.linear.Linear"
        tensors = [m.weight for m in linears]
        if type(mlp.experts) is CompressedExperts:  # int-N or the ternary code (compressed.cpp)
            why = decode_unsupported(mlp.experts)
            if why is not None:
                return why
        else:
            tensors += [mlp.experts.gate_up, mlp.experts.down]
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
    """One model's decode steps of one token over one KVCache, in native calls (see the module).

    Every buffer and pointer is set up once: a step is ~8 ctypes calls a layer and no allocation.
    Built for one generate call: the weights, cache and top-k must not change while it is used."""

    @classmethod
    def build(cls, model, cache, dense: str | None = None) -> CpuDecodeStep | None:
        """Returns a step for `model` over `cache`, or None where `unsupported` gives a reason."""
        return None if unsupported(model, cache) is not None else cls(model, cache, dense)

    def __init__(self, model, cache, dense: str | None = None):
        """dense: the qkv, o-projection and LM head weights, "bf16", "int8" or "int4" (dense_q8.dense_form:
        default $MOEKIT_CPU_DENSE, else bf16; int4: the LM head stays int8)."""
        from ..quant.formats import CompressedExperts

        cfg = model.config
        self.dense = dense_form(dense)
        self.lib = library()
        self.model, self.cache, self.cfg = model, cache, cfg
        threads = self.threads = torch.get_num_threads()
        d, h, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        s = self.capacity = cache.capacity
        self.eps = eps = cfg.rms_norm_eps
        self.rope_dim = cfg.rope_dim
        bf = torch.bfloat16
        with torch.inference_mode(False):
            cos, sin = model.rope(torch.arange(s))  # [S, rope_dim], computed once for every position
            self.cos, self.sin = cos.contiguous(), sin.contiguous()
            self.x = torch.empty(d, dtype=bf)  # residual stream
            self.normed = torch.empty(d, dtype=bf)
            self.delta = torch.empty(d, dtype=bf)  # o-projection or experts' output
            self.qkv = torch.empty(h * dh + 2 * hkv * dh, dtype=bf)
            self.q = torch.empty(h * dh, dtype=bf)
            self.attn = torch.empty(h * dh, dtype=bf)
            self.scores = torch.empty(h * s, dtype=torch.float32)
            self.logits = torch.empty(1, cfg.vocab_size, dtype=bf)
            self.xf = torch.empty(max(d, h * dh), dtype=torch.float32)  # matvec's portable path
            self.keep: list[torch.Tensor] = []  # buffers and float biases the pointers below point into
            self.compressed: list = []  # compressed layers' DecodeExperts (their ctypes plans must stay alive)
            normed, delta = self.normed.data_ptr(), self.delta.data_ptr()
            scale = dh ** -0.5  # Attention folds a non-default softmax scale into q (q_scale)
            self.layers = []
            for i, layer in enumerate(model.layers):
                attn, mlp = layer.attn, layer.mlp
                e = mlp.experts
                top_k = mlp.top_k
                router = self._buffer(e.num_experts, bf)  # router logits [E]
                ids, weights = self._buffer(top_k, torch.long), self._buffer(top_k, torch.float32)  # [A]
                compressed = None
                if type(e) is CompressedExperts:  # its own plan and buffers (compressed.cpp)
                    compressed = DecodeExperts(e, top_k, threads)
                    self.keep.extend(compressed.keep)
                    self.compressed.append(compressed)
                    acc = act = gate_up = down = None
                else:
                    acc = self._buffer(max(top_k * e.ffn, d), torch.float32)  # the expert kernel's accumulators
                    act = self._buffer(top_k * e.ffn, bf)  # [A, I] activations
                    gate_up, down = e.gate_up.data_ptr(), e.down.data_ptr()
                keys, values = cache.keys[i].data_ptr(), cache.values[i].data_ptr()
                q_norm = _ptr(None if attn.q_norm is None else attn.q_norm.weight)
                k_norm = _ptr(None if attn.k_norm is None else attn.k_norm.weight)
                self.layers.append((
                    layer.input_norm.weight.data_ptr(),
                    self._matvec_args(attn.qkv, normed, self.qkv.data_ptr()),
                    (self.qkv.data_ptr(), h, hkv, dh, _QK_NORM[cfg.qk_norm], q_norm, k_norm, eps, float(attn.q_scale)),
                    (self.q.data_ptr(), keys, values, s),
                    (self.q.data_ptr(), keys, values, h, hkv, dh, s),
                    (scale, self.attn.data_ptr(), self.scores.data_ptr(), threads),
                    self._matvec_args(attn.o_proj, self.attn.data_ptr(), delta),
                    layer.post_norm.weight.data_ptr(),
                    self._matvec_args(mlp.router, normed, router),
                    (router, e.num_experts, top_k, int(bool(cfg.norm_topk_prob)), ids, weights),
                    (normed, gate_up, down, ids, weights, top_k, d, e.ffn, acc, act, delta, threads),
                    None if compressed is None else (compressed.address, normed, ids, weights, top_k, delta, threads),
                ))
            self.final_norm = model.norm.weight.data_ptr()
            self.lm_head = self._matvec_args(model.lm_head, normed, self.logits.data_ptr())
            # int8 / int4 copies of the dense projections (dense_q8; kept per module across steps), None: bf16
            attn_bits = {"int8": 8, "int4": 4}.get(self.dense)
            q8 = (lambda linear: quantized(linear, attn_bits)) if attn_bits else (lambda linear: None)
            self.dense_q8 = [(q8(layer.attn.qkv), q8(layer.attn.o_proj)) for layer in model.layers]
            self.lm_head_q8 = quantized(model.lm_head) if attn_bits else None  # int8 for both forms
        self.plan = self._plan(model)

    def _plan(self, model) -> _StepPlan:
        """Returns the whole step's arguments as decode.cpp's StepPlan (the pieces' own, in one struct)."""
        cfg = model.config
        layers = (_LayerPlan * len(self.layers))()
        for plan, (in_norm, qkv, qkv_rope, cache, _, _, o_proj, post_norm, router, route, experts, compressed) in zip(
                layers, self.layers):
            plan.in_norm, plan.post_norm = in_norm, post_norm
            plan.wqkv, plan.bqkv = qkv[1], qkv[2]
            plan.q_norm, plan.k_norm, plan.q_scale = qkv_rope[5], qkv_rope[6], qkv_rope[8]
            plan.k_cache, plan.v_cache = cache[1], cache[2]
            plan.wo, plan.bo = o_proj[1], o_proj[2]
            plan.wr, plan.br, plan.router = router[1], router[2], router[3]
            plan.experts, plan.top_k, plan.ids, plan.weights = route[1], route[2], route[4], route[5]
            plan.gate_up, plan.down, plan.ffn, plan.acc, plan.act = experts[1], experts[2], experts[7], experts[8], experts[9]
            plan.compressed = None if compressed is None else compressed[0]
        for plan, (qkv_q8, o_q8) in zip(layers, self.dense_q8):
            plan.wqkv_q8 = None if qkv_q8 is None else qkv_q8.address
            plan.wo_q8 = None if o_q8 is None else o_q8.address
        self.keep_plan = layers
        d, h, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        return _StepPlan(
            layers=len(self.layers), D=d, H=h, Hkv=hkv, Dh=dh, S=self.capacity, rope_dim=self.rope_dim,
            V=cfg.vocab_size, qk_norm=_QK_NORM[cfg.qk_norm], norm_topk=int(bool(cfg.norm_topk_prob)),
            threads=self.threads, eps=self.eps, attn_scale=self.layers[0][5][0] if self.layers else 1.0,
            embed=model.embed.weight.data_ptr(), final_norm=self.final_norm, lm_head=self.lm_head[1],
            lm_bias=self.lm_head[2], cos=self.cos.data_ptr(), sin=self.sin.data_ptr(), x=self.x.data_ptr(),
            normed=self.normed.data_ptr(), delta=self.delta.data_ptr(), qkv=self.qkv.data_ptr(), q=self.q.data_ptr(),
            attn=self.attn.data_ptr(), logits=self.logits.data_ptr(), scores=self.scores.data_ptr(),
            xf=self.xf.data_ptr(), layer=layers,
            lm_head_q8=None if self.lm_head_q8 is None else self.lm_head_q8.address)

    def _buffer(self, n: int, dtype: torch.dtype) -> int:
        """Returns the address of a new buffer of n elements, kept alive with the step."""
        self.keep.append(torch.empty(n, dtype=dtype))
        return self.keep[-1].data_ptr()

    def _matvec_args(self, linear, x: int, out: int) -> tuple:
        """Returns moekit_matvec_bf16's arguments for one token through `linear` (x, out: addresses)."""
        w = linear.weight
        bias = None
        if linear.bias is not None:
            self.keep.append(linear.bias.detach().float().contiguous())
            bias = self.keep[-1].data_ptr()
        return (x, w.data_ptr(), bias, out, 1, w.shape[0], w.shape[1], self.xf.data_ptr(), self.threads)

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Returns the logits [1, V] (bf16) of `token` at `position`, its keys and values written
        to the cache; the returned tensor is reused by the next call. One native call (decode.cpp's
        moekit_decode_step_bf16 runs `pieces`' calls in C: ~0.4 ms of Python and ctypes a step less)."""
        self._check(token, position)
        code = self.lib.moekit_decode_step_bf16(ctypes.byref(self.plan), token, position)
        if code != 0:
            raise ValueError(f"the native decode step refused its arguments (code {code}: see decode.cpp)")
        return self.logits

    def _check(self, token: int, position: int) -> None:
        if not 0 <= position < self.capacity:
            from ..errors import MoekitError

            raise MoekitError(f"KV cache holds {self.capacity} positions, asked to write position {position}")
        if not 0 <= token < self.model.embed.weight.shape[0]:
            from ..errors import MoekitError

            raise MoekitError(f"token id {token} is outside the vocabulary of {self.model.embed.weight.shape[0]}")

    def pieces(self, token: int, position: int) -> torch.Tensor:
        """Returns what __call__ returns, each piece its own ctypes call (to time the pieces)."""
        self._check(token, position)
        lib, eps, d = self.lib, self.eps, self.x.numel()
        rope_dim = self.rope_dim
        cos = self.cos.data_ptr() + position * rope_dim * 2
        sin = self.sin.data_ptr() + position * rope_dim * 2
        x, normed, delta = self.x.data_ptr(), self.normed.data_ptr(), self.delta.data_ptr()
        with torch.inference_mode():
            self.x.copy_(self.model.embed.weight[token])
        add_norm = lib.moekit_add_rmsnorm_bf16

        def matvec(args, q8=None):  # decode.cpp's project: int8 / int4 weights where there are some
            if q8 is None:
                lib.moekit_matvec_bf16(*args)
            else:
                x_, _, bias, out, _, _, _, xf, threads = args
                lib.moekit_matvec_q8(q8.address, x_, bias, out, xf, threads)

        for i, (in_norm, qkv, qkv_rope, cache, attn, attn_rest, o_proj, post_norm, router, route,
                experts, compressed) in enumerate(self.layers):
            qkv_q8, o_q8 = self.dense_q8[i]
            if i == 0:
                lib.moekit_rmsnorm_bf16(x, in_norm, d, eps, normed)
            else:  # the previous layer's experts' output joins the residual stream first
                add_norm(x, delta, in_norm, d, eps, normed)
            matvec(qkv, qkv_q8)
            lib.moekit_qkv_rope_bf16(*qkv_rope, cos, sin, rope_dim, *cache, position)
            lib.moekit_dense_decode_attention_bf16(*attn, position + 1, *attn_rest)
            matvec(o_proj, o_q8)
            add_norm(x, delta, post_norm, d, eps, normed)
            matvec(router)
            lib.moekit_route_softmax_bf16(*route)
            if compressed is not None:
                lib.moekit_compressed_moe_decode(*compressed)
            else:
                lib.moekit_moe_decode_bf16(*experts)
        add_norm(x, delta, self.final_norm, d, eps, normed)
        matvec(self.lm_head, self.lm_head_q8)
        return self.logits

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """Returns the argmax [1] (int64) of logits [1, V] (what sample gives at temperature 0)."""
        if logits.dtype != torch.bfloat16 or logits.shape[0] != 1 or not logits.is_contiguous():
            return logits.argmax(dim=-1)
        return torch.tensor([self.lib.moekit_argmax_bf16(logits.data_ptr(), logits.shape[-1])])
