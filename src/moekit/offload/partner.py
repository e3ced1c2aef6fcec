"""Missed experts computed on the CPU inside a decode step captured whole (misses cpu or auto on a GPU,
experts under 64 MiB or of a form the device cannot read in place, `wanted`; MOEKIT_CPU_GRAPH=1 / 0
forces it on / off): the CPU as the device's partner, no host decision per layer.

Why. With misses cpu / auto each MoE layer call leaves the captured segments: the host reads the
routing (one sync per layer), builds the CPU's jobs in Python, starts the native kernel, launches
the device part, waits, copies the sum back and adds it. On the H200 that host work is ~0.4 ms a
layer beside a ~0.8 ms kernel (OLMoE, profile_cpu_misses_ab07f17.json), and the Qwen3 shape (24
layers of small experts) decoded at 35.2 tok/s, as fast as llama.cpp and 50% of its ceiling
(bench_llamacpp_qwen3_677d4b7.json). Here the step is one CUDA graph (as with misses mapped:
offload.mapped's table says which experts the cache holds) and the CPU side is one native call
per step (native/partner.cpp) that serves every layer in turn:

    device, layer l                                 CPU (the native runner thread)
    routing; partner_post_kernel: x, weights,
      routes -> page-locked mailbox, ready[l]=seq -> waits for ready[l]; builds the jobs of the
    cached experts (slot kernels, misses skipped)     missed experts; moekit_expert_ffn -> out[l];
    partner_combine_kernel: waits for done[l],    <-  done[l] = seq
      adds out[l] (read in place)
    next layer ...

Nothing on the host runs per layer: the layer's time is the CPU kernel plus the two flag round
trips, and the device's share runs beside the kernel. Experts in a compressed form (int-N, the
ternary code) differ on the device's side: it runs the cached ones from their cache slots through
the form's slot kernels (a missed one points at the cache's blank slot with weight 0: zeros, an
expert that adds nothing in every layer's layout, ExpertCache.reserve_blank); on the CPU's the same
native loop runs each layer's missed ones through the form's kernel (moekit_partner_step_compressed,
native.compressed.PartnerExperts). Before 14980b7 a Python thread ran those jobs between native
flag waits: on the H200 (OLMoE shape, all experts in host memory, c92d900) a layer took ~1.4 ms for
~17 MB of missed int4 experts, which the int4 kernel's 66 GB/s at the Mixtral shape (f51a719) would
read in ~0.3 ms. The native loop, same shape and footprints (2ef1e0c): int4 144.0 tok/s vs llama.cpp's
Q4_K_M 86.1 (1.67x; 46.0 with the thread), int2 156.8 vs Q2_K 119.6 (1.31x), 246 MB of int4 experts
read by the CPU a token, ~35 GB/s averaged over the token (47 over the report's kernel time), under its
83 GB/s read rate. Other forms (gpt-oss's clamped ones) are refused: their
misses run split per layer call. Between steps the host keeps the cache as misses mapped does
(admissions of popular missed experts, copies landed -> table rows), and counts the CPU's work from
the native call's per-layer report.

The row split (on by default with misses auto, MOEKIT_ROW_SPLIT=0 off; dense experts of 64 MiB and up, where one
expert is milliseconds on either side: Mixtral's): the CPU computes ffn rows [0, r) of each missed
expert (partner.cpp with R = r, the rows LD = I apart) while the device reads rows [r, I) of the same
experts in place from the pinned host store (a second slot-kernel call over offload.mapped's split
table, cached experts -1 there), so both links stream at once; r from the load-time rates of one
expert on each side (cpu.row_split). H200, 2ef1e0c, Mixtral-8x7B shape cut to 8 layers, all experts
in host memory at llama.cpp's 2.52 GB: 17.7 tok/s (101% of the combined ceiling) vs 13.7 whole and
llama.cpp's 14.7.

The gather (compressed experts of 64 MiB and up on a GPU, whose slot kernels read no host memory;
MOEKIT_PARTNER_GATHER=N / 0, `gather_slots`): the device copies each layer's missed experts of rank
1..G into scratch cache slots itself, inside the step, while the CPU computes rank 0 (offload.mapped
says how). H200, d3aa10f, Mixtral-8x7B shape cut to 8 layers, int4 experts of 88 MB at llama.cpp's
Q4_K_M footprint: 52.6 tok/s with it, 35.8 without, llama.cpp 31.3.

Failure: the native side gives up after TIMEOUT_S waiting for a post, and then releases every layer
left with a zero sum; the device gives up after MAX_POLLS polls of a done flag and sets an error
flag. Either makes the step raise (the outputs of a failed step are never returned).

Shapes: L = MoE layers, N = tokens of the step (its batch), A = experts per token, S = N * A,
E = experts per layer, D = hidden, I = expert ffn width.
"""

from __future__ import annotations

import ctypes
import os

import torch

from ..errors import MoekitError
from ..experts.forms import DenseForm
from ..native import library, register_declarations
from ..native.experts import DTYPE_CODES, Scratch, acc_stride, float_ptr
from .stats import PARTNER_CALLS_KEPT

ENV = "MOEKIT_CPU_GRAPH"  # "1" / "0": decode steps with the CPU as partner always / never (unset: `wanted`)
GATHER_ENV = "MOEKIT_PARTNER_GATHER"  # scratch slots of the gather (compressed forms): "0" none (unset: `gather_slots`)
TIMEOUT_S = 30.0  # the native side waits this long for a layer's post
MAX_POLLS = 1 << 26  # the device's polls of a done flag (each a read over the link, ~1 us) before it gives up
BLOCK_D = 1024
FLAG_STRIDE = 8  # int64s between two flags: each on its own 64-byte line (one writer each)


def _declare(lib: ctypes.CDLL) -> None:
    i64, p64, dbl = ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_double
    lib.moekit_async_partner_step.argtypes = [
        ctypes.c_int, ctypes.c_int, i64, i64, i64, i64, i64, i64, i64, p64, p64, p64, p64, p64, p64, p64, p64, i64, dbl,
        ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float), ctypes.c_int,
        ctypes.POINTER(dbl), ctypes.POINTER(ctypes.c_int32)]
    lib.moekit_async_partner_step.restype = ctypes.c_int


register_declarations(_declare)


def wanted(device: torch.device, expert_bytes: int, large: int, native: bool = True,
           in_place_share: bool = True) -> bool:
    """Returns whether decode steps should run with the CPU as partner: MOEKIT_CPU_GRAPH=1 always,
    =0 never; unset, on a GPU for experts smaller than `large` bytes (larger ones keep misses auto's
    split, whose in-place share lets the device read some of them beside the CPU: Mixtral's 352 MB
    experts ran 14.6 tok/s with it, 11.5 on the CPU alone), or of any size where that split would
    have no in-place share (`in_place_share` False: a form whose kernels read only cache slots, int-N
    and the ternary code; there the split is the CPU and demand fetches, each layer call leaving the
    captured step: Mixtral's int4 experts, 88 MB, ran 36.4 tok/s so at 10956a6, the CPU computing 14.4
    of a token's 16 missed experts), whose step's CPU side is one native call
    (`native`: dense, int-N, the ternary code; with =1 other forms are tried and refused). H200, all experts in
    host memory at llama.cpp's footprint: Qwen3-30B-A3B shape cut to 24 layers, bf16, 72.3 tok/s with
    the partner, 42.2 misses cpu and 33.0 auto without it (bench_llamacpp_qwen3_partner_7f24100.json);
    OLMoE shape (bench_llamacpp_olmoe_compressed_c92d900.json, the compressed forms' jobs still run
    from a Python thread then) int4 46.0 against auto's 36.8, int2 65.5 against 53.3."""
    env = os.environ.get(ENV)
    if env not in (None, "0", "1"):
        raise MoekitError(f"{ENV}={env!r}: set it to 1 (the CPU partner always) or 0 (never), or leave it unset")
    if env is not None or not native:
        return env == "1"
    return device.type == "cuda" and (expert_bytes < large or not in_place_share)


def gather_slots(device: torch.device, expert_bytes: int, large: int, top_k: int, pinned: bool) -> int:
    """Returns how many missed compressed experts of a step the device copies in itself beside the
    CPU partner (offload.mapped's gather): MOEKIT_PARTNER_GATHER=N that many (0: none); unset, on a
    GPU reading a pinned host store, top_k // 2 (at least 1) for experts of `large` bytes and up,
    where one expert is milliseconds on either link (Mixtral's int4, 88 MB: the CPU alone took ~1.7 ms
    an expert, 3.3 ms a layer for two, and nothing crossed PCIe), else 0."""
    env = os.environ.get(GATHER_ENV)
    if env is not None:
        if not env.isdigit():
            raise MoekitError(f"{GATHER_ENV}={env!r}: set it to a number of scratch slots (0: no gather), "
                              "or leave it unset")
        return int(env)
    return max(1, top_k // 2) if device.type == "cuda" and pinned and expert_bytes >= large else 0


def _int64s(values: list[int]):
    return (ctypes.c_int64 * max(1, len(values)))(*values)


class CpuPartner:
    """The mailboxes, flags and native call of one offload runtime's CPU partner (module docstring)."""

    def __init__(self, runtime, max_tokens: int, cpu_rows: int | None = None):
        """`cpu_rows` r (dense experts only): the CPU computes ffn rows [0, r) of each missed expert
        and the device reads rows [r, I) in place (offload.mapped's split table; the row split);
        None: whole experts on the CPU."""
        from ..experts import triton_ops

        if not triton_ops.HAVE_TRITON:
            raise MoekitError("the CPU partner's device kernels need Triton")
        self.runtime = runtime
        cfg, form, store, worker = runtime.model_config, runtime.form, runtime.store, runtime.cpu
        self.device, self.dtype = runtime.device, runtime.dtype
        self.layers = list(runtime.moe_layers)
        self.num_layers, self.top_k, self.num_experts = len(self.layers), cfg.top_k, cfg.num_experts
        self.hidden, self.ffn = form.hidden, form.ffn
        self.max_tokens = max_tokens
        self.cpu_rows = cpu_rows if cpu_rows is not None else self.ffn
        if not 0 < self.cpu_rows <= self.ffn or (cpu_rows is not None and not isinstance(form, DenseForm)):
            raise MoekitError(f"the CPU partner splits dense experts by rows within their {self.ffn} ffn rows; "
                              f"got {cpu_rows} for {form.name} experts")
        self.threads, self.scratch = worker.threads, Scratch()
        self.layer_bytes = [runtime.layout.layer_bytes(layer) for layer in self.layers]  # one expert's bytes
        cuda = self.device.type == "cuda"
        L, N, S, D = self.num_layers, max_tokens, max_tokens * self.top_k, self.hidden
        with torch.inference_mode(False):
            self.x = torch.zeros(L, N, D, dtype=self.dtype, pin_memory=cuda)
            self.out = torch.zeros(L, N, D, dtype=self.dtype, pin_memory=cuda)
            self.w = torch.zeros(L, S, dtype=torch.float32, pin_memory=cuda)
            self.routes = torch.zeros(L, S, dtype=torch.int64, pin_memory=cuda)
            # ready, done (a flag per layer), the device's error flag at [2, 0, 0]
            self.flags = torch.zeros(3, L, FLAG_STRIDE, dtype=torch.int64, pin_memory=cuda)
            # device tensors the kernels address host memory from (unified addressing: element offsets)
            self.base_x = torch.zeros(1, dtype=self.dtype, device=self.device)
            self.base_w = torch.zeros(1, dtype=torch.float32, device=self.device)
            self.base_i = torch.zeros(1, dtype=torch.int64, device=self.device)
            self.seq_dev = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.seq = 0
        self.err_off = self._off(self.flags[2, 0], self.base_i)
        self.offsets = [dict(x=self._off(self.x[p], self.base_x), w=self._off(self.w[p], self.base_w),
                             routes=self._off(self.routes[p], self.base_i), out=self._off(self.out[p], self.base_x),
                             ready=self._off(self.flags[0, p], self.base_i), done=self._off(self.flags[1, p], self.base_i))
                        for p in range(L)]
        ptrs = lambda t: _int64s([t[p].data_ptr() for p in range(L)])
        self.x_ptrs, self.w_ptrs, self.route_ptrs, self.out_ptrs = ptrs(self.x), ptrs(self.w), ptrs(self.routes), ptrs(self.out)
        self.ready_ptrs, self.done_ptrs = ptrs(self.flags[0]), ptrs(self.flags[1])
        self.seconds = (ctypes.c_double * L)()
        self.experts = (ctypes.c_int32 * L)()
        self.started = False
        self.counting = True  # whether the started step's CPU work goes into the stats
        self.step_tokens = 0
        # one native call serves the step (partner.cpp): dense experts from the host store's rows,
        # the int-N and ternary-code forms through their kernels (native.compressed.PartnerExperts)
        self.dense = isinstance(form, DenseForm)
        self.compressed = None if self.dense else self._compressed_plan(max_tokens)
        if not self.dense:
            return
        gate_ups, downs = [], []
        for layer in self.layers:  # expert e of each layer: its rows in the host store (cfg.num_experts wide)
            stack, _ = store.host_rows(layer, 0)
            view = runtime.layout.view(stack, layer)
            gu, dn = view["gate_up"], view["down"]
            count = gu.shape[0]
            for e in range(self.num_experts):
                row = min(e, count - 1)  # a pruned layer's extra ids are never routed
                gate_ups.append(gu.data_ptr() + row * gu.stride(0) * gu.element_size())
                downs.append(dn.data_ptr() + row * dn.stride(0) * dn.element_size())
        self.gate_up_ptrs, self.down_ptrs = _int64s(gate_ups), _int64s(downs)
        self.wdtype = DTYPE_CODES[runtime.layout.view(store.host_rows(self.layers[0], 0)[0], self.layers[0])["gate_up"].dtype]

    def _compressed_plan(self, max_tokens: int):
        """Returns the native step's plan of a compressed form's experts in the host store
        (native.compressed.PartnerExperts); raises MoekitError for a form it cannot serve."""
        from ..native.compressed import NATIVE_CODE, NATIVE_INT, PartnerExperts

        runtime, form = self.runtime, self.runtime.form
        code = getattr(form, "NATIVE_FORM", 0)
        if code not in (NATIVE_INT, NATIVE_CODE):
            raise MoekitError(f"the CPU partner serves dense, int-N and ternary-code experts, not {form.name}")
        layers = []
        for layer in self.layers:
            count = runtime.model_config.experts_in(layer)
            views: dict[tuple, dict] = {}  # one view per stacked host tensor, not one per expert
            experts = []
            for e in range(self.num_experts):  # a pruned layer's extra ids are never routed
                rows, row = runtime.store.host_rows(layer, min(e, count - 1))
                key = tuple(t.data_ptr() for t in rows.values())
                if key not in views:
                    views[key] = runtime.layout.view(rows, layer)
                experts.append(form.native_parts(form.one(views[key], row)))
            layers.append(experts)
        tables = [form.host_table(layer) for layer in self.layers]  # copied to the host now, not inside a step
        try:
            return PartnerExperts(code, form.bits, self.hidden, self.ffn, layers, tables, max_tokens, self.top_k,
                                  self.threads)
        except ValueError as e:
            raise MoekitError(f"the CPU partner cannot serve these experts: {e}") from None

    @staticmethod
    def _off(host: torch.Tensor, base: torch.Tensor) -> int:
        delta = host.data_ptr() - base.data_ptr()
        if delta % base.element_size():
            raise MoekitError("a CPU partner buffer is not aligned to its elements")
        return delta // base.element_size()

    # ---- device side, inside the step (capturable) -----------------------------------------------
    def post(self, pos: int, x: torch.Tensor, weights: torch.Tensor, routes: torch.Tensor) -> None:
        """Queues the write of layer `pos`'s x [N, D], weights [N, A] and routes [S] to its mailbox,
        then its ready flag."""
        from ..kernels.partner_flags import partner_post_kernel, partner_ready_kernel

        n, slots = x.shape[0], routes.numel()
        if x.stride(-1) != 1 or n > self.max_tokens:
            raise MoekitError(f"the CPU partner takes up to {self.max_tokens} tokens with contiguous rows")
        o = self.offsets[pos]
        partner_post_kernel[(1,)](
            x, weights.reshape(-1).contiguous(), routes, self.base_x, o["x"], self.base_w, o["w"], self.base_i,
            o["routes"], n, self.hidden, slots, x.stride(0), BLOCK_D=BLOCK_D,
            BLOCK_S=max(16, 1 << (slots - 1).bit_length()))
        partner_ready_kernel[(1,)](self.base_i, o["ready"], self.seq_dev)

    def combine(self, pos: int, out: torch.Tensor) -> torch.Tensor:
        """Queues the wait for layer `pos`'s CPU sum and its addition to out [N, D] (in place)."""
        from ..kernels.partner_flags import partner_combine_kernel

        n = out.shape[0]
        o = self.offsets[pos]
        partner_combine_kernel[(n, -(-self.hidden // BLOCK_D))](
            out, self.base_x, o["out"], self.base_i, o["done"], self.seq_dev, self.err_off, MAX_POLLS, self.hidden,
            out.stride(0), BLOCK_D=BLOCK_D)
        return out

    # ---- host side, around the step ----------------------------------------------------------------
    def start(self, tokens: int, count: bool = True) -> None:
        """Starts the CPU side of the next step of `tokens` tokens (its seq queued for the device first);
        `count`: its CPU work goes into the stats. A step started and never finished (interrupted
        between two layers) is aborted first."""
        lib = library()
        if lib is None:
            raise MoekitError("the CPU partner needs the native library")
        if tokens > self.max_tokens:
            raise MoekitError(f"the CPU partner takes steps of up to {self.max_tokens} tokens; got {tokens}")
        if self.started:
            self.abort()
        self.seq += 1
        self.seq_dev.fill_(self.seq)  # on the compute stream, before the step's kernels
        boxes = (self.x_ptrs, self.w_ptrs, self.route_ptrs, self.out_ptrs, self.ready_ptrs, self.done_ptrs)
        dims = (self.num_layers, tokens, self.top_k, self.num_experts, self.hidden, self.ffn)
        if self.compressed is not None:
            code = lib.moekit_async_partner_step_compressed(
                self.compressed.address, DTYPE_CODES[self.dtype], *dims, *boxes, self.seq, TIMEOUT_S, self.threads,
                self.seconds, self.experts)
        else:
            slots = tokens * self.top_k
            h = self.scratch.get("h", slots * self.ffn)
            xf = self.scratch.get("x", tokens * self.hidden)
            accs = self.scratch.get("acc", self.threads * acc_stride(tokens))
            code = lib.moekit_async_partner_step(
                self.wdtype, DTYPE_CODES[self.dtype], *dims, self.cpu_rows, *boxes, self.gate_up_ptrs, self.down_ptrs,
                self.seq, TIMEOUT_S, float_ptr(h), float_ptr(xf), float_ptr(accs), self.threads, self.seconds,
                self.experts)
        if code != 0:
            raise MoekitError(f"the CPU partner could not start (code {code}: another CPU expert call is running)")
        self.started, self.step_tokens, self.counting = True, tokens, count

    def finish(self) -> None:
        """Waits for the CPU side of the step, counts its work; raises MoekitError where it failed
        (or where the device gave up waiting for an earlier step's sum)."""
        if not self.started:
            return
        self.started = False
        code = library().moekit_async_wait()
        if self.counting:
            self._count()
        if code != 0:
            why = {10: "waited too long for the device's post"}.get(code, f"code {code}")
            raise MoekitError(f"the CPU partner failed a decode step ({why}); rerun with {ENV}=0")
        self.check()

    def _count(self) -> None:
        stats = self.runtime.stats
        share = self.cpu_rows / self.ffn  # of each missed expert's bytes the CPU reads (the row split: r / I)
        nbytes = round(share * sum(count * size for count, size in zip(self.experts, self.layer_bytes)))
        stats.cpu_s += sum(self.seconds)
        stats.cpu_experts += sum(self.experts)
        if len(stats.partner_layer_calls) < PARTNER_CALLS_KEPT:
            stats.partner_layer_calls.extend((s, e) for s, e in zip(self.seconds, self.experts) if e > 0)
        if share < 1:
            stats.row_split_experts += sum(self.experts)
        stats.cpu_bytes += nbytes
        if self.step_tokens == 1:
            stats.decode_cpu_bytes += nbytes

    def abort(self) -> None:
        """Ends a started step that failed on the host before the device posted every layer: the
        flags not yet posted are set here, so the CPU side runs through and returns now (its work
        not counted)."""
        if self.started:
            self.counting = False
            self.flags[0, :, 0] = self.seq
            try:
                self.finish()
            except MoekitError:
                pass

    def check(self) -> None:
        """Raises MoekitError (once) where the device gave up waiting for the CPU's sum of a step
        (the flag it sets in page-locked memory: read without a sync, so a step still running may
        report it at the next check)."""
        if int(self.flags[2, 0, 0]):
            self.flags[2, 0, 0] = 0
            raise MoekitError(f"the device waited too long for the CPU partner's sum; rerun with {ENV}=0")

    def self_test(self) -> str | None:
        """Returns None when one step's round trip works (every layer posts x with expert 0 missed, the
        CPU computes it, the device adds the sum: equal to the native kernel's own output), else why
        not. Runs before the first real step (the loader's warm-up)."""
        from ..native.experts import expert_ffn_stacked

        gen = torch.Generator().manual_seed(0)
        x_host = torch.randn(1, self.hidden, generator=gen).to(self.dtype)
        x = x_host.to(self.device)
        w = torch.ones(1, self.top_k, dtype=torch.float32, device=self.device)
        routes = torch.full((self.top_k,), self.num_experts, dtype=torch.int64)  # every slot cached ...
        routes[0] = 0  # ... but the first: expert 0 runs on the CPU
        routes = routes.to(self.device)
        outs = []
        try:
            self.start(1, count=False)
            try:
                for pos in range(self.num_layers):
                    outs.append(torch.zeros(1, self.hidden, dtype=self.dtype, device=self.device))
                    self.post(pos, x, w, routes)
                    self.combine(pos, outs[-1])
            except BaseException:
                self.abort()
                raise
            self.finish()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            runtime = self.runtime
            for pos, layer in enumerate(self.layers):
                rows, row = runtime.store.host_rows(layer, 0)
                view = runtime.layout.view(rows, layer)
                if self.dense:
                    want = expert_ffn_stacked(x_host, view["gate_up"], view["down"], [(row, [0], [1.0])],
                                              threads=self.threads, rows=(0, self.cpu_rows))
                else:
                    want = runtime.form.native_ffn(x_host, [(runtime.form.one(view, row), [0], [1.0])],
                                                   threads=self.threads)
                if not torch.equal(outs[pos].cpu(), want):
                    return f"layer {layer}'s sum came back wrong"
        except (MoekitError, RuntimeError, ValueError) as e:
            return str(e).splitlines()[0]
        return None

    def close(self) -> None:
        """Waits for a started step (the runner thread reads this partner's buffers until it ends)."""
        self.abort()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- at interpreter exit the library may be gone
            pass
