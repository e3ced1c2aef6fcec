"""The device side of a decode step whose missed experts the CPU computes inside one CUDA graph
(offload.partner): post a layer's input to page-locked host memory, then wait for the CPU's sum.

Host memory is reached through unified addressing as the offset slot kernels reach it: each host
buffer is given as a device tensor of its dtype (`*_base`) and an element offset from it (`*_off`).

partner_post_kernel, one program: writes x [N, D] (its dtype), the routing weights [S] (float32)
and the routes [S] (int64) of a layer. partner_ready_kernel, launched after it, writes the step's
seq into the layer's ready flag (a system-scope release): a kernel starts after the one before it
on its stream has completed, its writes included, so the CPU sees the flag only after the data
(one kernel's threads would each need a system fence before a barrier for the same guarantee).

partner_combine_kernel, program (n, b): polls the layer's done flag (a volatile load over the link
each time) until it holds seq, then out[n, b-th block] += the CPU's sum, read in place, added in
float32 and rounded once (as the eager path's device part + the CPU's sum). After `max_polls`
polls it gives up, sets the error flag (page-locked, beside the others) and adds nothing (a CPU side
that never answered must not hang the device; the host raises on the flag); once it is set, later
layers do not wait at all.
"""

import triton
import triton.language as tl


@triton.jit
def partner_post_kernel(x_ptr, w_ptr, routes_ptr, hx_base, hx_off, hw_base, hw_off, hi_base, hr_off, N, D, S,
                        stride_xn, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    ss = tl.arange(0, BLOCK_S)
    s_ok = ss < S
    tl.store(hw_base + hw_off + ss, tl.load(w_ptr + ss, mask=s_ok, other=0.0).to(tl.float32), mask=s_ok)
    tl.store(hi_base + hr_off + ss, tl.load(routes_ptr + ss, mask=s_ok, other=0), mask=s_ok)
    for n in range(0, N):
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            tl.store(hx_base + hx_off + n * D + ds, tl.load(x_ptr + n * stride_xn + ds, mask=d_ok), mask=d_ok)


@triton.jit
def partner_ready_kernel(hi_base, ready_off, seq_ptr):
    tl.atomic_xchg(hi_base + ready_off, tl.load(seq_ptr), sem="release", scope="sys")


@triton.jit
def partner_combine_kernel(out_ptr, ho_base, ho_off, hi_base, done_off, seq_ptr, err_off, max_polls, D, stride_on,
                           BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    seq = tl.load(seq_ptr)
    flag = tl.load(hi_base + done_off, volatile=True)
    polls = 0
    if tl.load(hi_base + err_off, volatile=True) != 0:  # an earlier layer gave up: do not wait again
        polls = max_polls
    while (flag != seq) & (polls < max_polls):
        flag = tl.load(hi_base + done_off, volatile=True)
        polls += 1
    if flag == seq:
        # an acquire on the flag orders the reads of the sum after it (volatile loads alone are relaxed)
        tl.atomic_add(hi_base + done_off, 0, sem="acquire", scope="sys")
        cpu = tl.load(ho_base + ho_off + n * D + ds, mask=d_ok, other=0.0, volatile=True)
        mine = tl.load(out_ptr + n * stride_on + ds, mask=d_ok, other=0.0)
        tl.store(out_ptr + n * stride_on + ds, (mine.to(tl.float32) + cpu.to(tl.float32)).to(out_ptr.dtype.element_ty),
                 mask=d_ok)
    else:
        tl.store(hi_base + err_off, 1)
