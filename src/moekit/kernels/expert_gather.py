"""Copies of routed experts' packed bytes from page-locked host memory into cache slots, decided on
the device inside a captured step (offload.mapped's gather: a compressed expert the CPU partner
leaves to the device).

Host memory is reached through unified addressing as the offset slot kernels reach it: the slab is
given as a device tensor of int32 words and each host row as a word offset from it (`offsets`
[E]: expert e's packed bytes in the host store; negative values are fine, int64).

expert_gather_kernel, program (j, c): reads `srcs[j]` (an expert id, or -1: nothing to copy) and,
where it is one, copies words [c * BLOCK, (c + 1) * BLOCK) of that expert's `words` into slot
`dst_slots[j]` of the slab (its row `slot_words` words long). Rows start on ALIGN_BYTES (16-byte)
boundaries in both places (offload.layout), so loads and stores are 16-byte vectors; each warp's
requests cover whole 128-byte lines of the link."""

import triton
import triton.language as tl


@triton.jit
def expert_gather_kernel(slab_ptr, srcs_ptr, dst_slots_ptr, offsets_ptr, words, slot_words,
                         BLOCK: tl.constexpr):
    j = tl.program_id(0)
    c = tl.program_id(1)
    e = tl.load(srcs_ptr + j)
    # in 16-byte vectors of 4 words (rows and counts are multiples of 4): the mask is constant within
    # one, so each thread's loads and stores are 128-bit (a mask per word made them 32-bit)
    vectors = tl.where(e >= 0, words // 4, 0)  # a comparison, not `& (e >= 0)`: the interpreter rejects bool & scalar
    src = tl.multiple_of(tl.load(offsets_ptr + tl.maximum(e, 0)), 4)  # int64 word offset of the host row from slab_ptr
    dst = tl.multiple_of(tl.load(dst_slots_ptr + j).to(tl.int64) * slot_words, 4)
    vs = c * (BLOCK // 4) + tl.arange(0, BLOCK // 4)  # [BLOCK / 4]
    ws = vs[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK / 4, 4]
    ok = (vs < vectors)[:, None]
    tl.store(slab_ptr + dst + ws, tl.load(slab_ptr + src + ws, mask=ok, other=0), mask=ok)
