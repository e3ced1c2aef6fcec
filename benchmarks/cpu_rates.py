"""The ceilings beside bench_llamacpp's figures: the host's read rate with all cores, pinned
host-to-device copies alone and both at once, and the CPU expert kernels' read rates (bf16 native
vs PyTorch, one expert and a layer's top-k; int4, int2 and the ternary code decoded in the matvec).

Shape legend: D = hidden, I = expert ffn, k = top-k experts per token.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

# ---- ceilings -----------------------------------------------------------------------------------

def cpu_and_link_rates(device: torch.device, threads: int, nbytes: int = 2 << 30, seconds: float = 2.0) -> dict:
    """Returns host read (native stream read, `threads` threads), pinned H2D copy, and both at once
    (bytes/s): what the CPU and the link can give a decode step together."""
    from moekit.native import library

    lib = library()
    out: dict = {"threads": threads}
    host = torch.ones(nbytes // 8, dtype=torch.int64)

    def read_loop(stop: threading.Event, done: list) -> None:
        while not stop.is_set():
            lib.moekit_stream_read(host.data_ptr(), nbytes, threads)
            done.append(nbytes)

    def timed_reads(stop_after: float) -> float:
        stop, done = threading.Event(), []
        t0 = time.perf_counter()
        th = threading.Thread(target=read_loop, args=(stop, done))
        th.start()
        time.sleep(stop_after)
        stop.set()
        th.join()
        return sum(done) / (time.perf_counter() - t0)

    out["cpu_read_alone_bytes_per_s"] = timed_reads(seconds)
    if device.type != "cuda":
        return out
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(1 << 30, dtype=torch.uint8, device=device)

    def copies(duration: float) -> float:
        torch.cuda.synchronize(device)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < duration:
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            n += src.numel()
        return n / (time.perf_counter() - t0)

    copies(0.2)
    out["h2d_alone_bytes_per_s"] = copies(seconds)
    stop, done = threading.Event(), []
    th = threading.Thread(target=read_loop, args=(stop, done))
    t0 = time.perf_counter()
    th.start()
    out["h2d_concurrent_bytes_per_s"] = copies(seconds)
    stop.set()
    th.join()
    out["cpu_read_concurrent_bytes_per_s"] = sum(done) / (time.perf_counter() - t0)
    return out


def kernel_rates(cfg, threads: int, reps: int = 5) -> dict:
    """Returns the CPU expert path's read rate (bytes/s) native vs PyTorch, on one expert and on a
    layer's top-k experts (distinct, cold in the caches), bf16, one token."""
    import torch.nn.functional as F

    from moekit.native.experts import Scratch, expert_ffn, prepared_expert_ffn, stream_read_bytes_per_s

    d, ffn, k = cfg.hidden_size, cfg.expert_ffn, cfg.top_k
    from moekit.offload.layout import pinned_empty

    count = max(64, 4 * k * reps)  # more experts than any last-level cache holds
    # allocated as the host store's experts are (offload.layout.pinned_empty: page-locked beside CUDA,
    # advised into 2 MB pages), which is what CPU misses read; the plain-page rate is kept beside it
    gate_up = pinned_empty((count, 2 * ffn, d), torch.bfloat16)
    gate_up.copy_(torch.randn(count, 2 * ffn, d))
    down = pinned_empty((count, d, ffn), torch.bfloat16)
    down.copy_(torch.randn(count, d, ffn))
    x = torch.randn(1, d).to(torch.bfloat16)
    expert_bytes = 3 * d * ffn * 2
    scratch, turn = Scratch(), [0]

    def native(n: int) -> None:
        ids = [(turn[0] + i) % count for i in range(n)]
        turn[0] += n
        expert_ffn(x, [(gate_up[e], down[e], [0], [1.0 / n]) for e in ids], threads=threads, scratch=scratch)

    def pytorch(n: int) -> None:
        ids = [(turn[0] + i) % count for i in range(n)]
        turn[0] += n
        out = torch.zeros_like(x)
        for e in ids:
            g, u = F.linear(x, gate_up[e]).chunk(2, dim=-1)
            out += F.linear(F.silu(g) * u, down[e]) / n

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    res = {}
    try:
        for n_threads in sorted({1, 4, 8, threads, threads + 1}):  # how the kernel scales with cores
            native(k)
            t0 = time.perf_counter()
            expert_ffn(x, [(gate_up[e], down[e], [0], [1.0 / k]) for e in range(k, 2 * k)], threads=n_threads,
                       scratch=scratch)
            res[f"native_layer_top_k_threads{n_threads}_bytes_per_s"] = k * expert_bytes / (time.perf_counter() - t0)
            res[f"stream_read_threads{n_threads}_bytes_per_s"] = stream_read_bytes_per_s(1 << 30, n_threads, reps=3)
        plain = (torch.randn(4 * k, 2 * ffn, d).to(torch.bfloat16), torch.randn(4 * k, d, ffn).to(torch.bfloat16))
        times = []
        for rep in range(reps + 1):  # the first call warms
            ids = [(rep * k + i) % (4 * k) for i in range(k)]
            t0 = time.perf_counter()
            expert_ffn(x, [(plain[0][e], plain[1][e], [0], [1.0 / k]) for e in ids], threads=threads, scratch=scratch)
            times.append(time.perf_counter() - t0)
        res["native_layer_top_k_plain_pages_bytes_per_s"] = k * expert_bytes / statistics.median(times[1:])
        del plain
        # the kernel alone: each call's arguments built before the clock starts (native_* above pays
        # expert_ffn's ~10-25 us of Python a call: a seventh of one expert's ~140 us at 90 GB/s)
        for n, label in ((1, "one_expert"), (k, "layer_top_k")):
            calls = []
            for rep in range(reps + 1):
                ids = [(turn[0] + i) % count for i in range(n)]
                turn[0] += n
                calls.append(prepared_expert_ffn(x, [(gate_up[e], down[e], [0], [1.0 / n]) for e in ids],
                                                 threads=threads, scratch=scratch))
            times = []
            for call in calls:
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            res[f"kernel_{label}_bytes_per_s"] = n * expert_bytes / statistics.median(times[1:])
        for name, fn in (("native", native), ("pytorch", pytorch)):
            for n, label in ((1, "one_expert"), (k, "layer_top_k")):
                fn(n)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn(n)
                    times.append(time.perf_counter() - t0)
                res[f"{name}_{label}_bytes_per_s"] = n * expert_bytes / statistics.median(times)
    finally:
        torch.set_num_threads(old)
    return res


def compressed_kernel_rates(cfg, threads: int, reps: int = 5, group_size: int = 128) -> dict:
    """Returns the native CPU kernels' rates on compressed experts (moekit.native.compressed, decoded
    in the matvec), one token, a layer's top-k distinct experts: stored bytes/s and weights/s of
    int4 and int2 (group_size columns per scale, random codes) and the ternary code (RTN of Gaussian
    weights, the dictionary compress would choose), to set beside kernel_rates' bf16 row and the
    stream read. The ternary experts are only top_k + 1 (encoding is slow), so they may stay in the
    last-level cache; its kernel is decode-bound anyway."""
    from moekit.native.compressed import code_ffn, int_ffn, stored_bytes
    from moekit.native.experts import Scratch
    from moekit.quant.code import choose_dictionary, encode, symbol_probabilities
    from moekit.quant.grids import TernaryGrid, pack_codes

    d, ffn, k = cfg.hidden_size, cfg.expert_ffn, cfg.top_k
    weights = 3 * d * ffn
    x = torch.randn(1, d)
    scratch, res = Scratch(), {}

    def int_expert(bits: int, g: torch.Generator):
        def matrix(rows: int, cols: int):
            groups = -(-cols // group_size)
            return (pack_codes(torch.randint(0, 1 << bits, (rows, cols), generator=g), bits),
                    (torch.rand(rows, groups, generator=g) * 0.01).half(),
                    torch.randint(0, 1 << bits, (rows, groups), generator=g).to(torch.uint8))
        return matrix(2 * ffn, d), matrix(d, ffn)

    def ternary_experts(count: int) -> tuple[list, torch.Tensor]:
        grid, mats = TernaryGrid(), []
        for rows, cols in ((2 * ffn, d), (d, ffn)):
            w = torch.randn(count, rows, cols)
            lo, hi = grid.fit(w)
            codes, _ = grid.round(w, (lo, hi))
            mats.append((codes, lo.squeeze(-1).half(), hi.squeeze(-1).half()))
        symbols = torch.cat([m[0].flatten() for m in mats])
        table = choose_dictionary(symbol_probabilities(symbols), symbols.numel(), count * (2 * ffn + d))
        parts = [(encode(codes, table), lo, hi) for codes, lo, hi in mats]
        return [tuple((*(t[e] for t in code), lo[e], hi[e]) for code, lo, hi in parts) for e in range(count)], table.table

    def timed(run, experts: list, label: str, bytes_of) -> None:
        turn = [0]

        def once() -> tuple[float, int]:  # (seconds, stored bytes read)
            ids = [(turn[0] + i) % len(experts) for i in range(k)]
            turn[0] += k
            jobs = [(*experts[e], [0], [1.0 / k]) for e in ids]
            t0 = time.perf_counter()
            run(jobs)
            return time.perf_counter() - t0, bytes_of(jobs)

        once()
        runs = [once() for _ in range(reps)]
        seconds = statistics.median(t for t, _ in runs)
        res[f"native_{label}_layer_top_k_bytes_per_s"] = runs[0][1] / seconds
        res[f"native_{label}_layer_top_k_weights_per_s"] = k * weights / seconds

    g = torch.Generator().manual_seed(0)
    count = max(8 * k, 64)  # distinct experts: int4 at olmoe's shape 200 MB, more than a last-level cache
    for bits in (4, 2):
        experts = [int_expert(bits, g) for _ in range(count)]
        timed(lambda jobs, b=bits: int_ffn(x, jobs, b, threads=threads, scratch=scratch), experts, f"int{bits}_g{group_size}",
              stored_bytes)
        del experts
    experts, table = ternary_experts(k + 1)  # each call reads k of them, starting one further on
    timed(lambda jobs: code_ffn(x, jobs, table, threads=threads, scratch=scratch), experts, "ternary_code", stored_bytes)
    return res
