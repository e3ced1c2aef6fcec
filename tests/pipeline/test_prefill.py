"""The batch pipeline's prefill (moekit.pipeline.prefill) on the CPU: its work is per layer and per
micro-batch, never per sequence (issue 14), and the untouched host pool it fills (empty_host_cache,
zero_rest) ends as a zeroed pool would, every block the prompts do not fill zero."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moekit.errors import MoekitError
from moekit.generate import forward_step
from moekit.kv_cache import PagedKVCache
from moekit.load import load_model
from moekit.paged_attention import gather_sequence
from moekit.pipeline.prefill import empty_host_cache, prefill_to_host

PROMPTS = [[5, 17, 300, 42, 9, 11, 7], [1000, 3], [77] * 20, [8, 9, 10, 11, 12], [2048, 1, 4095, 31]]


@pytest.fixture(scope="module")
def tiny():
    return load_model(device="cpu", dtype="float32")


class OpCounts(TorchDispatchMode):
    """Counts the aten ops dispatched, except while `paused` (inside the counted stand-ins)."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = str(func.overloadpacket)
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def prefill_ops(model, prompts: list[list[int]], micro_batch: int) -> dict[str, int]:
    """Returns the aten ops prefill_to_host dispatches, the packed attention kernel and the expert
    call each counted as one op: on CUDA each is one packed launch (paged_prefill_kernel, the
    grouped expert kernels), while their CPU stand-ins loop per sequence or per expert."""
    import moekit.model as model_module
    from moekit.experts.resident import ResidentExperts

    counts = OpCounts()

    def as_one(name, fn):
        def call(*args, **kwargs):
            counts.ops[name] = counts.ops.get(name, 0) + 1
            counts.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                counts.paused = False
        return call

    host = PagedKVCache.for_tokens(model.config, sum(len(p) + 16 for p in prompts), 16, "cpu", torch.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_module, "prefill_attention", as_one("prefill_attention", model_module.prefill_attention))
        patch.setattr(ResidentExperts, "forward", as_one("experts", ResidentExperts.forward))
        with torch.inference_mode(), counts:
            prefill_to_host(model, host, prompts, micro_batch)
    return counts.ops


def test_prefill_work_does_not_grow_with_the_sequences(tiny):
    """Two micro-batches of 3 prompts or of 24: the same ops, as many times (the KV moved to the
    host pool in one copy per layer, the tokens packed into one call per micro-batch); a per-
    sequence copy, write or kernel call would add ops with every prompt."""
    g = torch.Generator().manual_seed(0)

    def prompts(n):
        lengths = torch.randint(1, 40, (n,), generator=g).tolist()
        return [torch.randint(0, tiny.config.vocab_size, (k,), generator=g).tolist() for k in lengths]

    few = prefill_ops(tiny, prompts(6), 3)
    many = prefill_ops(tiny, prompts(48), 24)
    assert few["prefill_attention"] == 2 * tiny.config.num_layers  # one packed call a (layer, micro-batch)
    grown = {op: (few.get(op, 0), many.get(op, 0)) for op in set(few) | set(many) if few.get(op) != many.get(op)}
    assert not grown, f"ops whose count grows with the sequences (6 -> 48 prompts): {grown}"


@pytest.mark.parametrize("micro_batch", [2, 5])
def test_untouched_pool_is_filled_and_zeroed_per_layer(tiny, micro_batch):
    """A pool from empty_host_cache (here filled with NaN, as reused memory could hold) holds each
    prompt's keys and values as the sequential engine makes them, and 0 in every other block
    (the decode's positions, the scratch block), after prefill_to_host(zero_rest=True)."""
    cfg = tiny.config
    host = empty_host_cache(cfg, 400, 16, torch.float32)
    for pool in host.keys + host.values:
        pool.fill_(float("nan"))
    direct = PagedKVCache.for_tokens(cfg, 256, 16, "cpu", torch.float32)
    with torch.inference_mode():
        logits = prefill_to_host(tiny, host, PROMPTS, micro_batch=micro_batch, zero_rest=True)
        expected = forward_step(tiny, direct, [(i, 0, p) for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    used = {b for i in range(len(PROMPTS)) for b in host.tables[i]}
    rest = [b for b in range(host.num_blocks + 1) if b not in used]
    assert rest and host.scratch_block in rest
    for layer in range(cfg.num_layers):
        for got, want in ((host.keys, direct.keys), (host.values, direct.values)):
            assert not got[layer].isnan().any(), f"layer {layer}: a block neither stored nor zeroed"
            assert got[layer][rest].abs().sum() == 0
            for i, p in enumerate(PROMPTS):
                a = gather_sequence(got[layer], torch.tensor(host.tables[i]), len(p))
                b = gather_sequence(want[layer], torch.tensor(direct.tables[i]), len(p))
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"layer {layer}, prompt {i}")


def test_zero_rest_refuses_a_pool_holding_sequences(tiny):
    host = PagedKVCache.for_tokens(tiny.config, 256, 16, "cpu", torch.float32)
    host.grow("other", 20)
    with pytest.raises(MoekitError, match="holds no sequence"), torch.inference_mode():
        prefill_to_host(tiny, host, PROMPTS, micro_batch=2, zero_rest=True)


def test_untouched_pool_is_advised_huge_pages_before_its_first_touch(tiny, monkeypatch):
    """The host pool's every layer is asked for 2 MB pages while still untouched (the advice is
    free then; the CPU attention kernel reads its blocks scattered: native.hugepages)."""
    import moekit.pipeline.prefill as prefill

    advised: list[torch.Tensor] = []
    monkeypatch.setattr(prefill, "advise_huge_pages", lambda ts: advised.extend(ts) or 0)
    host = empty_host_cache(tiny.config, 400, 16, torch.float32)
    pools = host.keys + host.values
    assert len(advised) == len(pools) == 2 * tiny.config.num_layers
    assert all(a is p for a, p in zip(advised, pools))
