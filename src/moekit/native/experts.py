"""Routed SwiGLU experts on the CPU in one native call per layer (experts.cpp), and its reference.

    out = expert_ffn(x, jobs)          # jobs: [(gate_up [2I, D], down [D, I], tokens [n], weights [n])]

computes, for every job (an expert and the tokens routed to it),
out[t] += weight * down @ (silu(gate @ x[t]) * (up @ x[t])), with float32 accumulation, at host
memory bandwidth for few tokens (each weight row is read once and reused for all of a job's
tokens). Larger batches are compute-bound; there PyTorch's GEMMs do better (`SMALL_BATCH_TOKENS`).
`reference` is the same computation in PyTorch (float32), which the tests hold it to.

Shapes: N tokens, D hidden, I expert ffn width, n tokens of one job.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MoekitError
from . import library, register_declarations, unavailable_reason

DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
MAX_JOB_TOKENS = 256  # tokens one job may hold (the kernel's per-row dot buffer)
MAX_ROW = 1 << 15  # widest weight row (hidden or ffn size) the kernel takes
DEFAULT_PREFETCH_BYTES = 4096  # experts.cpp's g_prefetch: the H200 host read a layer 61 -> 80 GB/s with it
SMALL_BATCH_TOKENS = 16  # up to this many tokens per call the kernel beats PyTorch's GEMMs (bf16 in hardware)

Job = tuple[torch.Tensor, torch.Tensor, list[int], list[float]]


ASYNC_BUSY, ASYNC_IDLE = -100, -101  # async_runner.cpp: a call still posted; a wait with none posted
RUNNER_TEAM_ENV = "MOEKIT_RUNNER_TEAM"  # the runner's calls on its own team: unset (compressed forms'), own, omp
RUNNER_TEAMS = ("own", "omp")


def _declare(lib: ctypes.CDLL) -> None:
    lib.moekit_async_expert_ffn.argtypes = lib.moekit_expert_ffn.argtypes  # the same arguments, posted
    lib.moekit_async_expert_ffn.restype = ctypes.c_int
    lib.moekit_async_wait.argtypes = []
    lib.moekit_async_wait.restype = ctypes.c_int
    lib.moekit_async_last_seconds.argtypes = []
    lib.moekit_async_last_seconds.restype = ctypes.c_double
    lib.moekit_expert_tuning.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.moekit_expert_tuning.restype = ctypes.c_int


register_declarations(_declare)


class Started:
    """A native call running on the library's runner thread (async_runner.cpp), started by
    `start=True`: holds every object the call reads or writes until `wait` returns. One call at a
    time per process; a Started dropped unwaited waits in its finaliser (its buffers stay alive)."""

    def __init__(self, out: torch.Tensor, keep: tuple, refusal: str, finish=None, posted: bool = True):
        self.out, self._keep, self._refusal, self._finish, self._posted = out, keep, refusal, finish, posted
        self._waited = False
        self.seconds: float | None = None  # the call's own wall time on the runner, once waited for

    def wait(self) -> torch.Tensor:
        """Returns out once the call is done (the GIL is released meanwhile); raises ValueError
        for arguments the kernel refused, MoekitError when waited for twice. Sets `seconds`."""
        if self._waited:
            raise MoekitError("this CPU expert call was already waited for: wait() once per start")
        self._waited = True
        code = library().moekit_async_wait() if self._posted else 0
        if self._posted:
            self.seconds = library().moekit_async_last_seconds()
        self._keep = ()
        if code != 0:
            raise ValueError(self._refusal.format(code=code))
        if self._finish is not None:
            self._finish()
        return self.out

    def __del__(self):
        if not self._waited and self._posted and library() is not None:
            library().moekit_async_wait()  # the call must not outlive its buffers


def no_jobs(out: torch.Tensor, start: bool) -> torch.Tensor | Started:
    """Returns a call with no jobs: out zeroed, or with start a Started already done."""
    return Started(out.zero_(), (), "", posted=False) if start else out.zero_()


def check_runner_team() -> None:
    """Raises MoekitError where $MOEKIT_RUNNER_TEAM holds a value async_runner.cpp would not take (it
    reads the variable at each post and treats anything else as unset; native/team.h says what each does)."""
    setting = os.environ.get(RUNNER_TEAM_ENV)
    if setting is not None and setting not in RUNNER_TEAMS:
        raise MoekitError(f"{RUNNER_TEAM_ENV}={setting!r} is not a setting: use own (every runner call on its own "
                          "team), omp (none: OpenMP), or unset it (the compressed forms' calls on the team)")


def post(entry, *args, keep: tuple, out: torch.Tensor, refusal: str, finish=None) -> Started:
    """Returns the Started of `entry(*args)` (a moekit_async_* function); raises MoekitError
    while another started call has not been waited for."""
    code = entry(*args)
    if code == ASYNC_BUSY:
        raise MoekitError("a CPU expert call started with start=True has not been waited for: call its wait() "
                          "before starting another (one at a time per process)")
    if code != 0:
        raise ValueError(refusal.format(code=code))
    return Started(out, (args, *keep), refusal, finish)


def tuning(pair_dots: bool | None = None, prefetch_bytes: int | None = None) -> bool:
    """Sets the bf16 kernel's tunables (None leaves one as it is): `pair_dots` the AVX512-BF16 pair
    dot products (on by default where compiled in; off runs the portable loops), `prefetch_bytes`
    the software prefetch distance in each weight stream (DEFAULT_PREFETCH_BYTES; 0 is off). Returns whether
    the pair dot products are compiled in on this machine; raises ValueError without the library."""
    lib = library()
    if lib is None:
        raise ValueError(f"the native library is unavailable: {unavailable_reason()}")
    if prefetch_bytes is not None and prefetch_bytes < 0:
        raise ValueError(f"prefetch_bytes must be >= 0, not {prefetch_bytes}")
    return bool(lib.moekit_expert_tuning(-1 if pair_dots is None else int(pair_dots),
                                         -1 if prefetch_bytes is None else prefetch_bytes))


def acc_stride(n: int) -> int:
    """Returns the floats between two threads' accumulators (experts.cpp: a cache line apart)."""
    return (n + 15) // 16 * 16 + 16


@functools.cache
def bf16_in_hardware() -> bool:
    """Returns whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX-BF16, read
    from /proc/cpuinfo; True where that cannot be read, e.g. off Linux or x86: PyTorch's choice)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or "avx512_bf16" in flags or "amx_bf16" in flags


def kernel_tokens(weight_dtype: torch.dtype) -> int:
    """Returns up to how many tokens (rows) a call goes to the kernels rather than PyTorch's GEMMs.
    SMALL_BATCH_TOKENS, except bf16 weights on a CPU without bf16 in hardware: there PyTorch's bf16
    GEMM converts in software (21 GFLOP/s on the 2-core AVX2 machine, [64, 2048] x [2048, 6144])
    and the kernel, which converts each weight row once and dots two rows with four tokens at a
    time, runs 100 (25f9323): every call of up to MAX_JOB_TOKENS rows (bigger ones in pieces of that many)."""
    if weight_dtype == torch.bfloat16 and not bf16_in_hardware():
        return MAX_JOB_TOKENS
    return SMALL_BATCH_TOKENS


def usable(x: torch.Tensor, weight_dtype: torch.dtype) -> bool:
    """Returns whether expert_ffn takes x [N, D] with weights of `weight_dtype` on this machine."""
    return (x.device.type == "cpu" and x.dtype in DTYPE_CODES and weight_dtype in DTYPE_CODES
            and x.shape[-1] <= MAX_ROW and library() is not None)


class Scratch:
    """Reusable float32 work buffers of one caller (one thread): per-slot hidden activations,
    x in float, per-thread output accumulators."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):
                buf = self.buffers[name] = torch.empty(max(numel, 1), dtype=torch.float32)
        return buf


def float_ptr(t: torch.Tensor, ctype=ctypes.c_float):
    """Returns a ctypes pointer to the tensor's data (float by default), for the native calls."""
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctype))


class Routes:
    """The jobs' routes as the kernels take them: job j's tokens are tokens[starts[j]:starts[j+1]],
    each with its weight (ctypes int32 / int32 / float arrays; `slots` = T, the tokens of all jobs)."""

    def __init__(self, jobs: list, n: int):
        """Reads (..., tokens, weights) from the end of each job; raises ValueError for a job of
        more than MAX_JOB_TOKENS tokens, a weight missing, or a token outside x's n rows."""
        starts, tokens, weights = [0], [], []
        for job in jobs:
            toks, ws = job[-2], job[-1]
            if len(toks) > MAX_JOB_TOKENS or len(toks) != len(ws):
                raise ValueError(f"a job holds at most {MAX_JOB_TOKENS} tokens, with one weight each")
            tokens.extend(toks)
            weights.extend(ws)
            starts.append(len(tokens))
        if tokens and not 0 <= min(tokens) <= max(tokens) < n:
            raise ValueError(f"a job's token index is outside x's {n} rows")
        self.slots = len(tokens)
        self.starts = (ctypes.c_int32 * len(starts))(*starts)
        self.tokens = (ctypes.c_int32 * max(1, len(tokens)))(*tokens)
        self.weights = (ctypes.c_float * max(1, len(weights)))(*weights)


def output_for(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Returns `out` (or a new tensor) checked to be a contiguous tensor of x's shape and dtype."""
    out = torch.empty_like(x) if out is None else out
    if not out.is_contiguous() or out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must be a contiguous {list(x.shape)} {x.dtype} tensor")
    return out


def expert_ffn(x: torch.Tensor, jobs: list[Job], out: torch.Tensor | None = None, threads: int | None = None,
               scratch: Scratch | None = None, start: bool = False) -> torch.Tensor | Started:
    """Returns out [N, D] (x's dtype): the weighted sum over jobs of their expert on their tokens;
    with start=True, a Started whose wait() returns it (the call runs on the runner thread: until
    then nothing may write x, the weights or scratch, nor read out).

    Each job's gate_up [2I, D] (gate rows, then up rows) and down [D, I] must be contiguous CPU
    tensors of one dtype (bf16, fp16 or fp32); tokens index x's rows; a token may appear in
    several jobs, at most once per job. Raises ValueError for arguments the kernel cannot take
    (check `usable` first)."""
    x = x.contiguous()
    out = output_for(x, out)
    if not jobs:
        return no_jobs(out, start)
    wdtype, ffn, gate_ups, downs = _job_pointers(x, jobs)
    return _run(x, out, wdtype, ffn, gate_ups, downs, Routes(jobs, x.shape[0]), threads, scratch,
                (jobs,) if start else None)


def prepared_expert_ffn(x: torch.Tensor, jobs: list[Job], threads: int | None = None,
                        scratch: Scratch | None = None) -> Callable[[], torch.Tensor]:
    """Returns a callable that runs expert_ffn(x, jobs)'s native call and returns its out, its
    arguments checked and built once here: what the kernel alone takes, without the ~10-25 us of
    Python each expert_ffn call spends on them (benchmarks time the kernel with it; a decode step's
    calls from the runner pay none either). The tensors must stay unchanged while it is used."""
    x = x.contiguous()
    out = output_for(x, None)
    if not jobs:
        raise ValueError("prepared_expert_ffn needs at least one job")
    wdtype, ffn, gate_ups, downs = _job_pointers(x, jobs)
    lib, args, held = _call_args(x, out, wdtype, ffn, gate_ups, downs, Routes(jobs, x.shape[0]), threads, scratch)
    return functools.partial(_prepared_call, lib.moekit_expert_ffn, args, out, (x, jobs, held))


def _prepared_call(entry, args: tuple, out: torch.Tensor, _keep: tuple) -> torch.Tensor:
    """prepared_expert_ffn's call (_keep: what the arguments point into, alive while it is)."""
    code = entry(*args)
    if code != 0:
        raise ValueError(REFUSAL.format(code=code))
    return out


def _job_pointers(x: torch.Tensor, jobs: list[Job]) -> tuple[torch.dtype, int, list[int], list[int]]:
    """Returns (weight dtype, ffn, gate_up pointers, down pointers) of expert_ffn's jobs, checked."""
    d = x.shape[1]
    wdtype = jobs[0][0].dtype
    ffn = jobs[0][1].shape[1]
    gate_ups, downs = [], []
    for gate_up, down, _, _ in jobs:
        if (gate_up.shape != (2 * ffn, d) or down.shape != (d, ffn) or gate_up.dtype != wdtype
                or down.dtype != wdtype or not gate_up.is_contiguous() or not down.is_contiguous()
                or gate_up.device.type != "cpu" or down.device.type != "cpu"):
            raise ValueError(f"every job needs contiguous CPU gate_up [{2 * ffn}, {d}] and down [{d}, {ffn}] "
                             f"of one dtype; got {list(gate_up.shape)} {gate_up.dtype}, {list(down.shape)} {down.dtype}")
        gate_ups.append(gate_up.data_ptr())
        downs.append(down.data_ptr())
    return wdtype, ffn, gate_ups, downs


def expert_ffn_stacked(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                       jobs: list[tuple[int, list[int], list[float]]], out: torch.Tensor | None = None,
                       threads: int | None = None, scratch: Scratch | None = None,
                       start: bool = False, rows: tuple[int, int] | None = None) -> torch.Tensor | Started:
    """Returns out [N, D]: what expert_ffn returns, each job's expert being a row of the stacked
    gate_up [E, 2I, D] and down [E, D, I] (jobs: (row, tokens, weights)); start=True: a Started,
    as expert_ffn's. `rows` (r0, r1): only ffn rows r0..r1-1 of every expert (gate and up rows,
    down columns), whose partial output added to the other rows' is the expert's output (an
    expert split by rows between the CPU and the device).

    The pointers are computed from the stacks' strides: no per-expert tensor view is made or
    checked (16 per OLMoE layer, ~4 us each, on the decode path of offload.cpu). Each expert's
    matrices must be contiguous (the stacks' last two dims); raises ValueError otherwise."""
    x = x.contiguous()
    n, d = x.shape
    out = output_for(x, out)
    if not jobs:
        return no_jobs(out, start)
    count, ffn = gate_up.shape[0], down.shape[-1]
    if (gate_up.dim() != 3 or gate_up.shape[1:] != (2 * ffn, d) or down.shape != (count, d, ffn)
            or gate_up.dtype != down.dtype or gate_up.device.type != "cpu" or down.device.type != "cpu"
            or gate_up.stride()[1:] != (d, 1) or down.stride()[1:] != (ffn, 1)):
        raise ValueError(f"expert_ffn_stacked needs CPU gate_up [E, {2 * ffn}, {d}] and down [E, {d}, {ffn}] of one "
                         f"dtype, each expert contiguous; got {list(gate_up.shape)} {gate_up.dtype} "
                         f"{gate_up.stride()}, {list(down.shape)} {down.dtype} {down.stride()}")
    experts = [job[0] for job in jobs]
    if not 0 <= min(experts) <= max(experts) < count:
        raise ValueError(f"a job's row is outside the {count} stacked experts")
    r0, r1 = rows if rows is not None else (0, ffn)
    if not 0 <= r0 < r1 <= ffn:
        raise ValueError(f"rows {rows} is not a non-empty range of the {ffn} ffn rows")
    size = gate_up.element_size()
    gu0, gu_step = gate_up.data_ptr() + r0 * d * size, gate_up.stride(0) * size
    dn0, dn_step = down.data_ptr() + r0 * size, down.stride(0) * size
    return _run(x, out, gate_up.dtype, r1 - r0, [gu0 + e * gu_step for e in experts],
                [dn0 + e * dn_step for e in experts], Routes(jobs, n), threads, scratch,
                (gate_up, down) if start else None, ld=ffn)


REFUSAL = "the CPU expert kernel refused its arguments (code {code}: see experts.cpp)"


def _run(x: torch.Tensor, out: torch.Tensor, wdtype: torch.dtype, ffn: int, gate_ups: list[int], downs: list[int],
         routes: Routes, threads: int | None, scratch: Scratch | None, keep: tuple | None,
         ld: int | None = None) -> torch.Tensor | Started:
    """Returns out after the native call on checked pointers (x contiguous [N, D], out like x); with
    `keep` (what else the call reads: the weights), the Started call instead. `ffn` rows of experts
    `ld` wide (default ffn; experts.cpp, LD)."""
    lib, args, held = _call_args(x, out, wdtype, ffn, gate_ups, downs, routes, threads, scratch, ld)
    if keep is not None:
        return post(lib.moekit_async_expert_ffn, *args, keep=(x, out, *held, *keep), out=out, refusal=REFUSAL)
    code = lib.moekit_expert_ffn(*args)
    if code != 0:
        raise ValueError(REFUSAL.format(code=code))
    return out


def _call_args(x: torch.Tensor, out: torch.Tensor, wdtype: torch.dtype, ffn: int, gate_ups: list[int],
               downs: list[int], routes: Routes, threads: int | None, scratch: Scratch | None,
               ld: int | None = None) -> tuple[ctypes.CDLL, tuple, tuple]:
    """Returns (library, moekit_expert_ffn's arguments, what they point into: the routes and the
    scratch buffers) for a call of _run's."""
    lib = library()
    if lib is None:
        from . import unavailable_reason

        raise ValueError(f"the CPU expert kernel is unavailable: {unavailable_reason()}")
    n, d = x.shape
    if wdtype not in DTYPE_CODES or x.dtype not in DTYPE_CODES or max(d, ffn) > MAX_ROW:
        raise ValueError(f"the CPU expert kernel takes bf16/fp16/fp32 rows of at most {MAX_ROW}; "
                         f"got {wdtype} weights, {x.dtype} input, hidden {d}, ffn {ffn}")
    threads = threads or torch.get_num_threads()
    scratch = scratch or Scratch()
    gate_ptrs = (ctypes.c_int64 * len(gate_ups))(*gate_ups)
    down_ptrs = (ctypes.c_int64 * len(downs))(*downs)
    h = scratch.get("h", routes.slots * ffn)
    xf = scratch.get("x", n * d)
    accs = scratch.get("acc", threads * acc_stride(n))
    args = (DTYPE_CODES[wdtype], DTYPE_CODES[x.dtype], x.data_ptr(), out.data_ptr(), n, d, ffn, ld or ffn,
            len(gate_ups), gate_ptrs, down_ptrs, routes.starts, routes.tokens, routes.weights, float_ptr(h),
            float_ptr(xf), float_ptr(accs), threads)
    return lib, args, (routes, h, xf, accs)


_linear_scratch = threading.local()  # per thread: x in float32 (the CPU expert worker calls too)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           threads: int | None = None) -> torch.Tensor:
    """Returns x [M, K] @ weight [N, K]^T (+ bias) as [M, N] in x's dtype, float32 accumulation,
    each weight row read once: a decode step's projections at host memory bandwidth (PyTorch's
    bf16 matmul on a CPU without AMX read ~2 GB/s here). M <= MAX_JOB_TOKENS; CPU tensors of
    bf16/fp16/fp32; raises ValueError otherwise (check `usable` first)."""
    lib = library()
    if lib is None:
        from . import unavailable_reason

        raise ValueError(f"the CPU kernels are unavailable: {unavailable_reason()}")
    m, k = x.shape
    n = weight.shape[0]
    if (weight.shape[1] != k or m > MAX_JOB_TOKENS or k > MAX_ROW or weight.dtype not in DTYPE_CODES
            or x.dtype not in DTYPE_CODES or weight.device.type != "cpu" or x.device.type != "cpu"):
        raise ValueError(f"linear takes CPU x [M <= {MAX_JOB_TOKENS}, K <= {MAX_ROW}] and weight [N, K] of "
                         f"bf16/fp16/fp32; got {list(x.shape)} {x.dtype}, {list(weight.shape)} {weight.dtype}")
    x = x.contiguous()
    weight = weight.contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    out = torch.empty(m, n, dtype=x.dtype)
    scratch = getattr(_linear_scratch, "value", None)
    if scratch is None:
        scratch = _linear_scratch.value = Scratch()
    xf = scratch.get("x", m * k)
    code = lib.moekit_linear(DTYPE_CODES[weight.dtype], DTYPE_CODES[x.dtype], x.data_ptr(), weight.data_ptr(),
                             None if b is None else float_ptr(b), out.data_ptr(), m, n, k, float_ptr(xf),
                             threads or torch.get_num_threads())
    if code != 0:
        raise ValueError(f"the CPU linear kernel refused its arguments (code {code}: see experts.cpp)")
    return out


def reference(x: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
    """Returns what expert_ffn computes, in PyTorch with float32 arithmetic, as [N, D] float32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    xf = x.float()
    for gate_up, down, toks, ws in jobs:
        idx = torch.tensor(toks, dtype=torch.long)
        gate, up = F.linear(xf[idx], gate_up.float()).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down.float())
        out.index_add_(0, idx, y * torch.tensor(ws, dtype=torch.float32)[:, None])
    return out


def stream_read_bytes_per_s(nbytes: int = 1 << 30, threads: int | None = None, reps: int = 5) -> float:
    """Returns the best of `reps` rates (bytes/s) at which `threads` threads read `nbytes` of host
    memory with the native library: the CPU expert path's ceiling on this machine."""
    import time

    lib = library()
    if lib is None:
        raise ValueError("the native library is unavailable")
    buf = torch.ones(nbytes // 8, dtype=torch.int64)
    threads = threads or torch.get_num_threads()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        lib.moekit_stream_read(buf.data_ptr(), buf.numel() * 8, threads)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best
