"""Shared fixtures: tiny Hugging Face MoE checkpoints, built once per session, never downloaded.

Every variant is a real transformers model (`AutoModelForCausalLM.from_config`) saved with
`save_pretrained`, so moekit is checked against the reference implementation of each family.
Weights are random with a large `initializer_range` so that greedy argmax has no near-ties.
"""

from __future__ import annotations

import os

# Triton decides at decoration time whether kernels run compiled or interpreted, so this must be
# set before moekit is imported: without a GPU, the kernel tests run under the interpreter.
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# tiny tensors: one intra-op thread is faster than two (and than fighting other jobs)
torch.set_num_threads(1)

VOCAB = 100
MAX_POS = 128

# Shared by every family: 32 wide, 4 query heads over 2 kv heads (GQA), 4 experts top-2.
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=2, max_position_embeddings=MAX_POS, initializer_range=0.2,
)

# variant name -> (transformers config class name, config kwargs)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4)),
    "mixtral_tied": ("MixtralConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4,
        tie_word_embeddings=True)),
    "mixtral_sliding": ("MixtralConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4, sliding_window=5)),
    # head_dim given: transformers' yarn code cannot derive it from MixtralConfig(head_dim=None)
    "mixtral_yarn": ("MixtralConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4, head_dim=8,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 32})),
    "mixtral_linear": ("MixtralConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    # shared expert behind a sigmoid gate, qkv bias, layer 1 dense via mlp_only_layers
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        _COMMON, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_experts=4, qkv_bias=True,
        mlp_only_layers=[1], decoder_sparse_step=1)),
    # decoder_sparse_step=2: only layer 1 ((1 + 1) % 2 == 0) is MoE, layers 0 and 2 dense
    "qwen2_moe_step": ("Qwen2MoeConfig", dict(
        _COMMON, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_experts=4, mlp_only_layers=[],
        decoder_sparse_step=2, norm_topk_prob=True)),
    # head_dim 16 != hidden / heads = 8
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=24,
        num_experts=4, head_dim=16, norm_topk_prob=True)),
    # attention_bias, and layer 0 dense through mlp_only_layers
    "qwen3_moe_bias": ("Qwen3MoeConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=24,
        num_experts=4, attention_bias=True, mlp_only_layers=[0])),
    "olmoe": ("OlmoeConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_experts=4, eos_token_id=2)),
    # clip_qkv, and attention_bias: biases on q, k, v and o
    "olmoe_clip": ("OlmoeConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_experts=4, eos_token_id=2,
        clip_qkv=0.3, attention_bias=True)),
}

# issue 15's families (tests/families): norms, biases and router biases get random values too
# (transformers initialises them to 1 / 0, which would hide a norm bias or a router bias not loaded)
VARIANTS.update({
    # the muP scalars all away from 1, attention bias on q, k, v and o
    "granitemoe": ("GraniteMoeConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4, attention_bias=True,
        embedding_multiplier=3.0, residual_multiplier=0.6, attention_multiplier=0.2, logits_scaling=2.5)),
    "granitemoe_tied": ("GraniteMoeConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4, tie_word_embeddings=True,
        embedding_multiplier=2.0, residual_multiplier=0.8, attention_multiplier=0.25, logits_scaling=3.0)),
    # LayerNorm with bias, sparsemixer, attention and LM-head biases, a sliding window shorter than the prompts
    "phimoe": ("PhimoeConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4, attention_bias=True,
        lm_head_bias=True, sliding_window=6)),
    # default jitter gap 0.01 and no window
    "phimoe_plain": ("PhimoeConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4)),
    # longrope as Phi-3.5-MoE ships it (short/long factors and mscales over an original context of 64)
    "phimoe_longrope": ("PhimoeConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                         "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.5, 2.5, 4.0, 8.0],
                         "short_mscale": 1.19, "long_mscale": 1.31})),
    # MLA with a plain q_proj (V2-Lite), layer 0 dense, 2 shared experts, greedy softmax routing x1.5;
    # v_head_dim != qk dims so a mixed-up split fails
    "deepseek_v2": ("DeepseekV2Config", dict(
        _COMMON, num_key_value_heads=4, num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24,
        n_routed_experts=8, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, routed_scaling_factor=1.5)),
    # q_lora, group-limited greedy (best 2 of 4 groups), top-3, yarn with mscale_all_dim (prompts pass 32),
    # attention_bias (on q_a, kv_a and o)
    "deepseek_v2_group": ("DeepseekV2Config", dict(
        _COMMON, num_key_value_heads=4, num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=24,
        n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=24,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, num_experts_per_tok=3, attention_bias=True,
        topk_method="group_limited_greedy", n_group=4, topk_group=2,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "mscale": 0.9,
                         "mscale_all_dim": 0.7, "original_max_position_embeddings": 32})),
    # sigmoid + selection bias, best 2 of 4 groups, top-3 renormalised x2.5, q_lora, interleaved rope
    "deepseek_v3": ("DeepseekV3Config", dict(
        _COMMON, num_key_value_heads=4, num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24,
        n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, num_experts_per_tok=3, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)),
    # plain q, no groups, no renormalisation, rotate-half rope, yarn
    "deepseek_v3_plain": ("DeepseekV3Config", dict(
        _COMMON, num_key_value_heads=4, num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=24,
        n_routed_experts=8, n_shared_experts=2, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, rope_interleave=False,
        rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 32})),
    # V3 routing (best 2 of 4 groups, x1.5), rope on half of each 16-wide head, q/k norm, qkv bias, layer 0 dense
    "glm4_moe": ("Glm4MoeConfig", dict(
        _COMMON, num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24, head_dim=16,
        n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, num_experts_per_tok=3, n_group=4,
        topk_group=2, routed_scaling_factor=1.5, use_qk_norm=True, attention_bias=True)),
    # a quarter of each head rotated, no q/k norm, no groups, no renormalisation
    "glm4_moe_plain": ("Glm4MoeConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=24,
        n_routed_experts=8, n_shared_experts=2, first_k_dense_replace=0, norm_topk_prob=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
    # sinks, sliding window 5 on even layers (full on odd), biases everywhere, 3 layers; a clamp
    # limit of 0.6 so the clamps bite at this init scale; yarn as in the released config (factor 32 over 4096)
    "gpt_oss": ("GptOssConfig", dict(
        _COMMON, num_hidden_layers=3, intermediate_size=24, num_local_experts=4, head_dim=8,
        sliding_window=5, swiglu_limit=0.6)),
    # the MXFP4 tests' source: hidden and expert widths multiples of 32 (one scale per 32 values)
    "gpt_oss_wide": ("GptOssConfig", dict(
        _COMMON, hidden_size=64, num_hidden_layers=2, intermediate_size=32, num_local_experts=4, head_dim=16,
        sliding_window=5, swiglu_limit=0.6)),
    # every layer full attention, 8 experts top-3, default clamp, no rope scaling
    "gpt_oss_full": ("GptOssConfig", dict(
        _COMMON, num_hidden_layers=2, intermediate_size=24, num_local_experts=8, num_experts_per_tok=3,
        head_dim=8, sliding_window=5, layer_types=["full_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
})
NEW_FAMILY_VARIANTS = {"granitemoe", "granitemoe_tied", "phimoe", "phimoe_plain", "phimoe_longrope", "deepseek_v2",
                       "deepseek_v2_group", "deepseek_v3", "deepseek_v3_plain", "glm4_moe", "glm4_moe_plain",
                       "gpt_oss", "gpt_oss_full", "gpt_oss_wide"}

FAMILY_VARIANTS = ["mixtral", "qwen2_moe", "qwen2_moe_step", "qwen3_moe", "qwen3_moe_bias", "olmoe",
                   "olmoe_clip"]


@dataclass
class TinyCheckpoint:
    """A saved tiny HF checkpoint and the transformers model it was saved from (the reference)."""

    name: str
    path: Path
    hf: Any  # the transformers model, float32, eval mode; tests must not modify it

    def hf_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Returns transformers' logits [B, T, V] for ids [B, T]."""
        with torch.no_grad():
            return self.hf(ids).logits

    def hf_greedy(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Returns transformers' greedy new tokens [B, max_new_tokens], never stopping at eos."""
        gen = transformers.GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            out = self.hf.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))
        return out[:, ids.shape[1]:]


def build_hf_model(variant: str, seed: int = 0, **overrides: Any):
    """Returns a fresh float32 transformers model of a VARIANTS entry (random weights from seed)."""
    cls_name, kwargs = VARIANTS[variant]
    cfg = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if variant in NEW_FAMILY_VARIANTS:
        _randomise_constant_init(model)
    return apply_swiglu_config(model).eval()


def apply_swiglu_config(model):
    """Returns a transformers gpt-oss model with its experts' clamped SwiGLU set from its config
    (swiglu_alpha, swiglu_limit); other models unchanged.

    transformers 5.17 (the H200 image's) hard-codes alpha 1.702 and limit 7.0 in GptOssExperts
    and ignores the config; 5.24 reads it. The tiny variants clamp at 0.6, so without this the
    reference depends on the installed version (relative logit error 0.80 under 5.17)."""
    cfg = model.config
    if cfg.model_type != "gpt_oss":
        return model
    experts = [m for m in model.modules() if type(m).__name__ == "GptOssExperts"]
    if not experts or not all(hasattr(m, "alpha") and hasattr(m, "limit") for m in experts):
        raise RuntimeError(f"transformers {transformers.__version__}: no GptOssExperts with alpha and limit "
                           "attributes; update apply_swiglu_config in tests/conftest.py for this version")
    for m in experts:
        m.alpha, m.limit = getattr(cfg, "swiglu_alpha", 1.702), getattr(cfg, "swiglu_limit", 7.0)
    return model


@torch.no_grad()
def _randomise_constant_init(model) -> None:
    """Gives norm weights, biases and router selection biases random values (transformers starts
    them at 1 or 0), so that a loader that skips one of them fails the comparison."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        if "norm" in name and name.endswith("weight"):
            t.copy_(1.0 + 0.3 * torch.randn_like(t))
        elif name.endswith(("bias", "sinks")) or "correction_bias" in name:
            t.copy_(0.2 * torch.randn_like(t))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Callable[[str], TinyCheckpoint]:
    """Returns a function variant -> TinyCheckpoint; each variant is built and saved once."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, TinyCheckpoint] = {}

    def get(variant: str) -> TinyCheckpoint:
        if variant not in built:
            model = build_hf_model(variant)
            path = root / variant
            model.save_pretrained(path)
            # the reference generates past eos (hf_greedy); the saved generation_config keeps it
            model.generation_config.eos_token_id = None
            built[variant] = TinyCheckpoint(variant, path, model)
        return built[variant]

    return get


@pytest.fixture(scope="session")
def mixtral_model(tiny):
    """Returns the moekit model of the tiny mixtral checkpoint (shared: do not modify it)."""
    import moekit

    return moekit.load_model(tiny("mixtral").path)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Returns (exit code, stdout, stderr) of `moekit ARGV` run in this process."""
    from moekit.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_char_tokenizer(path: Path) -> None:
    """Writes a character-level tokenizer.json (printable ASCII, ids below VOCAB) into path, so a
    tiny checkpoint can run CLI commands in place of the bundled model, which is ~100x slower
    under the Triton interpreter."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))


def token_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Returns random token ids [batch, length] in [3, VOCAB) (clear of bos/eos/pad ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def kernel_device() -> str:
    """Returns the device for tests that run Triton kernels on tensors they build: "cuda" where
    there is a GPU, else "cpu" under TRITON_INTERPRET=1; skips the test where neither works."""
    from moekit.experts.triton_ops import HAVE_TRITON, triton_usable

    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    if torch.cuda.is_available():
        return "cuda"
    if not triton_usable(torch.empty(0)):
        pytest.skip("no CUDA, and TRITON_INTERPRET is not 1: CPU tensors cannot run the Triton kernels")
    return "cpu"


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Returns ||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def median_token_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Returns the median over tokens of ||actual - expected|| / ||expected|| (last dim).

    Robust to the odd token whose near-tied router top-k flips under low-precision rounding."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm(dim=-1) / expected.norm(dim=-1)).median().item()


def cpu_step_logits_by_threads(model, threads=(1, 2)) -> list[torch.Tensor]:
    """Returns the native CPU decode step's logits of three tokens after a 12-token prefill, once per
    thread count (moekit.native.decode.CpuDecodeStep): equal bits are what the step promises."""
    from moekit.kv_cache import KVCache
    from moekit.native.decode import CpuDecodeStep

    ids = token_ids(1, 12)
    results = []
    old = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            cache = KVCache(model.config, 1, 20, "cpu", torch.bfloat16)
            with torch.inference_mode():
                model(ids, cache=cache, start=0)
                step = CpuDecodeStep(model, cache)
                results.append(torch.cat([step(t, 12 + i).clone() for i, t in enumerate((3, 9, 4))]))
    finally:
        torch.set_num_threads(old)
    return results


def pytest_report_header(config):
    # the reference's version decides some expected values (apply_swiglu_config): name it in every log
    return f"reference: transformers {transformers.__version__}, torch {torch.__version__}"


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the marker below must be there to select on
def pytest_collection_modifyitems(config, items):
    for item in items:  # the tests of modules that run Triton kernels on tensors they build (kernel_device):
        # on CUDA where there is one, so the GPU machine's run is `-m "gpu or kernels"` (-m gpu alone misses them)
        if getattr(getattr(item, "module", None), "kernel_device", None) is kernel_device:
            item.add_marker(pytest.mark.kernels)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def build_without_interpreter(args: list[str]) -> None:
    """Runs `python ARGS` (a Triton build for a GPU that need not be here) in a child process
    without TRITON_INTERPRET (set above, and @triton.jit then gives interpreted functions), src on
    its path; skips where this triton's ptxas cannot assemble its own PTX, fails on any other error."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, *args], check=False, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode and "Unsupported .version" in run.stderr:
        pytest.skip("this triton's ptxas cannot assemble its own PTX here")
    assert run.returncode == 0, run.stderr[-3000:]


def paged_case(lens: list[int], h: int, hkv: int, dh: int, bs: int, dtype: torch.dtype, seed: int = 0,
               sinks: bool = False):
    """Returns q [B, H, Dh], pools [NB, BS, Hkv, Dh], block tables [B, MB] (shuffled blocks) and
    context lens [B] of a paged decode attention case; with `sinks`, also sink logits [H] (some far
    above the scores, some far below)."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // bs) for n in lens]
    nb = sum(per_seq) + 1
    keys = torch.randn(nb, bs, hkv, dh, generator=g).to(dtype)
    values = torch.randn(nb, bs, hkv, dh, generator=g).to(dtype)
    order = torch.randperm(nb, generator=g).tolist()
    mb = max(per_seq)
    tables, at = [], 0
    for n in per_seq:
        tables.append(order[at:at + n] + [0] * (mb - n))
        at += n
    q = torch.randn(len(lens), h, dh, generator=g).to(dtype)
    case = (q, keys, values, torch.tensor(tables, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32))
    if not sinks:
        return case
    logits = 2.0 * torch.randn(h, generator=g)
    logits[0], logits[-1] = 30.0, -30.0  # the sink takes nearly all the weight / none of it
    return (*case, logits)
