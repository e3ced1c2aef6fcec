"""CGOPipe's CPU attention as the pipeline calls it: one kernel call per (layer, micro-batch) of mu
sequences with MTBench-like lengths, layer after layer over each layer's own pool, in KV GB/s next
to one call over the whole batch of uniform lengths (what the HRM's probe times). Is the pipeline
worker's rate (13a0b14: ~33 GB/s at mu=341; fdc2c8a: ~29 at mu=128, where the uniform probe read
46-48) lost to the call size, the length spread, or to a core the launch thread keeps busy?

    PYTHONPATH=src python3 benchmarks/probes/cpu_attention_calls.py --out $OUT/cac          # H200 host, ~1 min
    PYTHONPATH=src nice python3 benchmarks/probes/cpu_attention_calls.py --quick --out /tmp/cac

Mixtral's attention shape (32 q / 8 kv heads x 128, bf16, 16-position blocks, 2 MB pages as the
pipeline's pool), N sequences of prompt (MTBench-like, mean ~77, max 418) + g positions, g drawn
uniformly from 0..gen-1 (a decode step halfway on average), the blocks of every sequence scattered
over the pool. Rows:
  uniform      one call over N sequences of the mean length (the HRM probe's pattern)
  spread       one call over the N sequences of MTBench-like lengths
  mu=M         the pipeline's pattern: N / M calls of M sequences a layer, over `--layers` pools
  mu=M busy    the same with one more Python thread spinning on a core, holding the GIL between its
               bytecodes as the launch thread does while it issues: each call's return waits for
               the GIL (Python hands it over every sys.getswitchinterval(), 5 ms by default)
  mu=M busy si the same at --switch-interval-us
  mu=M gpu     the same with a thread driving the GPU as the launch thread does (--gpu)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_pipeline import mtbench_lengths  # noqa: E402

from moekit import native  # noqa: E402
from moekit.native import attention as na  # noqa: E402
from moekit.native.experts import stream_read_bytes_per_s  # noqa: E402
from moekit.native.hugepages import advise_huge_pages  # noqa: E402
from moekit.pipeline.host_attention import NativeAttention  # noqa: E402

HEADS, KV_HEADS, DH, BLOCK = 32, 8, 128, 16


def pools(layers: int, blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Returns `layers` (keys, values) pools [blocks, BLOCK, Hkv, Dh] bf16 in advised 2 MB pages."""
    tile = torch.randn(BLOCK, KV_HEADS, DH).to(torch.bfloat16)
    out = []
    for _ in range(layers):
        kv = []
        for flip in (False, True):
            t = torch.empty(blocks, BLOCK, KV_HEADS, DH, dtype=torch.bfloat16)
            advise_huge_pages([t])
            kv.append(t.copy_((tile.flip(0) if flip else tile).expand_as(t)))
        out.append(tuple(kv))
    return out


def tables_of(lengths: list[int], blocks: int, gen: torch.Generator) -> torch.Tensor:
    """Returns block tables [N, MB] int32: each sequence's blocks drawn at random from the pool."""
    need = [-(-n // BLOCK) for n in lengths]
    perm = torch.randperm(blocks, generator=gen).to(torch.int32)
    table = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[at:at + n]
        at += n
    return table


def spinner(stop: threading.Event) -> None:
    while not stop.is_set():  # a core busy, as the launch thread issuing kernels
        pass


def gpu_driver(stop: threading.Event) -> None:
    """Drives the GPU as the pipeline's launch thread does, beside the kernel: GEMMs on the device,
    a 4 MB D2H and a 3 MB H2D through pinned buffers, a wait on the stream, over and over."""
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    down, up = torch.empty(2 << 20, dtype=torch.bfloat16, pin_memory=True), torch.empty(
        3 << 19, dtype=torch.bfloat16, pin_memory=True)
    d_down, d_up = torch.empty(down.shape, device=dev, dtype=down.dtype), torch.empty(up.shape, device=dev,
                                                                                        dtype=up.dtype)
    while not stop.is_set():
        for _ in range(4):
            a = (a @ a).clamp_(-1, 1)
        down.copy_(d_down, non_blocking=True)
        d_up.copy_(up, non_blocking=True)
        torch.cuda.current_stream().synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/cpu_attention_calls"))
    p.add_argument("--seqs", type=int, default=None, help="sequences of a step (default 1024; quick: 64)")
    p.add_argument("--gen", type=int, default=128, help="generated tokens: each sequence has 0..gen-1 of them")
    p.add_argument("--layers", type=int, default=None, help="pools, one a layer (default 8; quick: 2)")
    p.add_argument("--mus", default=None, help="micro-batch sizes, comma-separated (default 64,128,256,341,512)")
    p.add_argument("--items", default="auto", help="the kernel's work items (native.attention.ITEMS)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: usable cores but two)")
    p.add_argument("--switch-interval-us", type=float, default=200.0,
                   help="the GIL switch interval of the 'busy si' rows (default 200)")
    p.add_argument("--no-busy", dest="busy", action="store_false", help="leave out the rows with a GIL-holding thread")
    p.add_argument("--gpu", action="store_true",
                   help="rows with a thread driving the GPU beside the kernel (GEMMs, pinned copies both ways)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu drives a CUDA device beside the kernel: none here")
    if native.library() is None:
        print(f"no native library: {native.unavailable_reason()}")
        return 1
    na.items_code(args.items)
    seqs = args.seqs or (64 if args.quick else 1024)
    layers = args.layers or (2 if args.quick else 8)
    mus = [int(m) for m in (args.mus or ("16,32" if args.quick else "64,128,256,341,512")).split(",") if m]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or max(1, cores - 2)
    gen = torch.Generator().manual_seed(0)
    prompts = mtbench_lengths(seqs)
    steps = torch.randint(0, args.gen, (seqs,), generator=gen).tolist()
    lengths = sorted((a + b for a, b in zip(prompts, steps)), reverse=True)  # Alg. 2 packs longest first
    mean = round(sum(lengths) / len(lengths))
    blocks = sum(-(-n // BLOCK) for n in lengths) + seqs
    kv = pools(layers, blocks)
    table = tables_of(lengths, blocks, gen)
    lens = torch.tensor(lengths, dtype=torch.int32)
    uniform_table = tables_of([mean] * seqs, blocks, gen)
    uniform_lens = torch.full((seqs,), mean, dtype=torch.int32)
    q = torch.randn(seqs, HEADS, DH, generator=gen).to(torch.bfloat16)
    out = torch.empty_like(q)
    ceiling = stream_read_bytes_per_s((32 if args.quick else 512) << 20, threads=threads, reps=3)
    reps = 2 if args.quick else 3
    per_layer = int(na.kv_bytes(kv[0][0], lens))
    print(f"{seqs} sequences, lengths mean {mean} max {lengths[0]} (prompt + 0..{args.gen - 1}), {layers} layers, "
          f"{per_layer / 1e6:.0f} MB of KV a layer, {threads} threads, items {args.items}; "
          f"host read ceiling {ceiling / 1e9:.1f} GB/s")

    def timed(name: str, fn, nbytes: int, calls: int, busy: bool = False, switch_s: float | None = None,
              gpu: bool = False) -> dict:
        stop = threading.Event()
        spin = threading.Thread(target=gpu_driver if gpu else spinner, args=(stop,), daemon=True) \
            if busy or gpu else None
        default_switch = sys.getswitchinterval()
        if switch_s is not None:
            sys.setswitchinterval(switch_s)
        if spin:
            spin.start()
        try:
            fn()
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
        finally:
            stop.set()
            if spin:
                spin.join()
            sys.setswitchinterval(default_switch)
        row = dict(row=name, seconds=best, kv_bytes=nbytes, calls=calls, kv_gb_s=nbytes / best / 1e9,
                   share_of_ceiling=nbytes / best / ceiling, us_per_call=best / calls * 1e6)
        print(f"{name:16} {calls:6d} calls {best * 1e3:9.2f} ms {row['kv_gb_s']:7.1f} GB/s {row['share_of_ceiling']:6.2f} "
              f"of ceiling, {row['us_per_call']:8.1f} us a call")
        return row

    def one_call(tab, ln):
        def fn():
            for keys, values in kv:
                na.decode_attention(q, keys, values, tab, ln, out=out, threads=threads, items=args.items)
        return fn

    def micro(mu: int):
        # the pipeline's call: NativeAttention, its tables and lengths prepared once a step (one
        # foreign call a task, where decode_attention makes a dozen small tensor ops around it)
        codes = (na.DTYPE_CODES[q.dtype], na.DTYPE_CODES[torch.bfloat16])
        parts = []
        for a in range(0, seqs, mu):
            tt, ll = table[a:a + mu].contiguous(), lens[a:a + mu].contiguous()
            call = NativeAttention(native.library(), tt, ll, (ll.shape[0], HEADS, KV_HEADS, DH, BLOCK, tt.shape[1]),
                                   codes, na.items_code(args.items))
            parts.append((call, q[a:a + mu], out[a:a + mu]))

        def fn():
            for keys, values in kv:
                for call, qq, oo in parts:
                    call(keys, values, qq, oo, None, threads)
        return fn, len(parts)

    total = per_layer * layers
    rows = [timed("uniform", one_call(uniform_table, uniform_lens), int(na.kv_bytes(kv[0][0], uniform_lens)) * layers,
                  layers),
            timed("spread", one_call(table, lens), total, layers)]
    for mu in mus:
        fn, n = micro(mu)
        rows.append(timed(f"mu={mu}", fn, total, n * layers))
        if args.gpu:
            rows.append(timed(f"mu={mu} gpu", fn, total, n * layers, gpu=True))
        if args.busy:
            rows.append(timed(f"mu={mu} busy", fn, total, n * layers, busy=True))
            rows.append(timed(f"mu={mu} busy si", fn, total, n * layers, busy=True,
                              switch_s=args.switch_interval_us / 1e6))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(seqs=seqs, layers=layers, gen=args.gen, mean_len=mean, max_len=lengths[0], threads=threads,
                  items=args.items, switch_interval_us=args.switch_interval_us, host_read_gb_s=ceiling / 1e9, rows=rows)
    (out_dir / "cpu_attention_calls.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
