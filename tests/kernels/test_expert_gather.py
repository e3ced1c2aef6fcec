"""The gather's copy kernel (moekit.kernels.expert_gather) against a PyTorch reference: experts'
packed bytes copied from host rows into cache slots, addressed as int32-word offsets from the slab;
an index of -1 copies nothing, the last block is partial, and a slot's words past the layer's stay
as they were. On the CPU under TRITON_INTERPRET=1 (conftest.py), on a GPU from pinned memory."""

from __future__ import annotations

import pytest
import torch

from moekit.experts import triton_ops

pytestmark = pytest.mark.kernels


def gather_reference(slab: torch.Tensor, srcs: list[int], dst_slots: list[int], host: torch.Tensor,
                     words: int) -> torch.Tensor:
    """Returns slab [S, W] with host[srcs[j], :words] copied into row dst_slots[j] where srcs[j] >= 0."""
    out = slab.clone()
    for e, slot in zip(srcs, dst_slots):
        if e >= 0:
            out[slot, :words] = host[e, :words].to(out.device)
    return out


@pytest.mark.parametrize("words,block", [(4096, 2048), (1000, 256), (12, 2048)])
def test_gather_copies_host_rows_into_slots(words, block):
    from moekit.kernels.expert_gather import expert_gather_kernel

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not triton_ops.triton_usable(torch.empty(0, device=device)):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(0)
    slot_words, experts = words + 8, 5  # a slot holds the largest layer's expert: more than this layer's
    slab = torch.randint(-2**31, 2**31 - 1, (4, slot_words), generator=gen, dtype=torch.int32).to(device)
    host = torch.randint(-2**31, 2**31 - 1, (experts, words), generator=gen, dtype=torch.int32)
    if device.type == "cuda":
        host = host.pin_memory()
    srcs, dst_slots = [3, -1, 0], [2, 1, 0]
    want = gather_reference(slab, srcs, dst_slots, host, words)
    offsets = torch.tensor([(host[e].data_ptr() - slab.data_ptr()) // 4 for e in range(experts)], dtype=torch.int64)
    as_dev = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    grid = (len(srcs), -(-words // block))
    expert_gather_kernel[grid](slab, as_dev(srcs), as_dev(dst_slots), offsets.to(device), words, slot_words,
                               BLOCK=block)
    assert torch.equal(slab.cpu(), want.cpu())
