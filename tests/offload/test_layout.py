import mmap
import os

import pytest
import torch

from moekit.offload.layout import pinned_empty


def test_pinned_empty_without_cuda_is_a_plain_tensor():
    if torch.cuda.is_available():
        pytest.skip("the CUDA case is below")
    t = pinned_empty((3, 5), torch.bfloat16)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16


def _vm_flags_at(address: int) -> list[str]:
    """Returns the VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    return []


def test_host_store_tensors_ask_for_huge_pages():
    """The host store's experts (what CPU misses stream) are advised into 2 MB pages (MADV_HUGEPAGE:
    'hg' in the mapping's flags) before they are filled; whether the kernel then finds 2 MB pages
    depends on its memory, so the advice is what is checked."""
    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("no /proc/self/smaps here")
    t = pinned_empty((16, 2**20), torch.uint8)  # 16 MB: seven whole 2 MB pages at least
    assert "hg" in _vm_flags_at(t.data_ptr() + 8 * 2**20)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_small_pinned_tensors_get_pages_of_their_own():
    """Small host tensors sit side by side in malloc's heap; locking a page twice fails and the stale
    CUDA error surfaced at the next kernel launch (the phimoe pipeline case on the H200)."""
    tensors = [pinned_empty((n, 7), dtype) for n in (1, 3, 50, 1000) for dtype in (torch.uint8, torch.bfloat16)]
    for t in tensors:
        assert t.data_ptr() % mmap.PAGESIZE == 0 and t.is_pinned()
        t.fill_(1)
        assert torch.equal(t.to("cuda", non_blocking=True).cpu(), t)
    assert torch.zeros(4, device="cuda").sum().item() == 0  # no error left behind for a later launch
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    pages = [(a // mmap.PAGESIZE, -(-b // mmap.PAGESIZE)) for a, b in spans]
    assert all(end <= start for (_, end), (start, _) in zip(pages, pages[1:]))  # no page shared


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_experts_given_to_a_pinning_store_are_kept_not_copied():
    """A caller's page-locked stacks (bench_pipeline's 90 GB of Mixtral experts) joined the host
    store as a second pinned copy: at 32 layers the offload engine's load ran out of host memory.
    Stacks pinned already are kept as they are; pageable ones are still copied into pinned memory."""
    from moekit.experts.forms import DenseForm
    from moekit.offload.layout import layout_for

    layout = layout_for(DenseForm(8, 4, torch.bfloat16), [0])
    pinned = {"gate_up": pinned_empty((2, 8, 8), torch.bfloat16), "down": pinned_empty((2, 8, 4), torch.bfloat16)}
    kept = layout.pack(0, pinned, pin=True)
    assert all(kept[k].data_ptr() == pinned[k].data_ptr() for k in pinned)
    pageable = {k: torch.randn(v.shape).to(torch.bfloat16) for k, v in pinned.items()}
    copied = layout.pack(0, pageable, pin=True)
    assert all(copied[k].is_pinned() and copied[k].data_ptr() != pageable[k].data_ptr() for k in pageable)
    assert all(torch.equal(copied[k], pageable[k]) for k in pageable)
    # pinned but not as stored (float32, or a transposed view): copied into the stored dtype and order
    wide = {"gate_up": pinned_empty((2, 8, 8), torch.float32), "down": pinned["down"]}
    assert layout.pack(0, wide, pin=True)["gate_up"].dtype == torch.bfloat16
    turned = {"gate_up": pinned_empty((2, 8, 8), torch.bfloat16).transpose(1, 2), "down": pinned["down"]}
    assert layout.pack(0, turned, pin=True)["gate_up"].is_contiguous()
