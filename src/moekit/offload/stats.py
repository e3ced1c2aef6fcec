"""OffloadStats: what the offload runtime did: cache hits, bytes moved, prefetch accuracy, stalls."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch


PARTNER_CALLS_KEPT = 1 << 16


@dataclass
class OffloadStats:
    """Counters of one offloaded model since the last reset (`runtime.reset_stats()`)."""

    lookups: int = 0  # (layer, expert) pairs a layer needed
    hits: int = 0  # ... found in the device cache (resident, or already on its way)
    prefetch_hits: int = 0  # ... of the hits, brought in by a prefetch
    demand_fetches: int = 0  # experts fetched when a layer needed them (misses)
    prefetches: int = 0  # experts fetched ahead of time on a prediction
    bytes_moved: int = 0  # bytes copied from the store into the device cache
    decode_bytes_moved: int = 0  # ... during one-token calls (decode at batch 1)
    predicted: int = 0  # experts predicted for a layer (per call, union over its tokens)
    routed: int = 0  # experts truly routed in calls that had a prediction
    predicted_correct: int = 0  # predicted experts that were routed
    tokens: int = 0  # tokens through the first MoE layer
    decode_tokens: int = 0  # ... in one-token calls
    cpu_experts: int = 0  # (layer, expert) pairs computed on the CPU from the store (misses cpu/auto)
    cpu_bytes: int = 0  # expert bytes those CPU computations read from the store
    decode_cpu_bytes: int = 0  # ... during one-token calls
    cpu_s: float = 0.0  # seconds the CPU worker spent computing experts
    cpu_wait_s: float = 0.0  # ... of which the layer waited for it after launching its device part
    admissions: int = 0  # missed experts then copied into the cache in the background (popular ones)
    in_place_experts: int = 0  # (layer, expert) pairs misses auto's split had the device read in place
    row_split_experts: int = 0  # ... computed by rows on the CPU and read in place for the rest (the row split)
    mapped_reads: int = 0  # routed slots whose expert the device read in place from host memory (misses mapped, auto)
    gathered_experts: int = 0  # ... of which the partner's gather copied into a scratch slot inside the step
    mapped_bytes: int = 0  # bytes those in-place reads moved over the link
    decode_mapped_bytes: int = 0  # ... during one-token steps
    stall_s: float = 0.0  # time compute waited for experts (GPU: measured by CUDA events)
    fetch_s: float = 0.0  # host time spent issuing fetches (disk reads happen here on the CPU)
    peak_device_bytes: int = 0  # allocator peak on CUDA; the planned total on the CPU
    # the CPU partner's layer calls with work (offload.partner): (kernel seconds, experts computed), at most
    # PARTNER_CALLS_KEPT of them; to_dict reports their medians (is a layer's time its bytes or a fixed cost?)
    partner_layer_calls: list = field(default_factory=list, repr=False)
    pending_stalls: deque = field(default_factory=deque, repr=False)  # CUDA (start, end) pairs, in stream order
    spare_events: list = field(default_factory=list, repr=False)  # resolved pairs, recorded again by later stalls

    def stall_events(self) -> tuple:
        """Returns a (start, end) pair of timing CUDA events to record around a stall: a resolved one
        when there is one (the stalls that have ended are added to stall_s first), else a new one."""
        self.collect()
        if self.spare_events:
            return self.spare_events.pop()
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def collect(self) -> None:
        """Adds the stalls that have ended to stall_s without waiting, oldest first (on one stream they
        end in the order recorded), so that a long run keeps a few pairs pending, not one per stall."""
        while self.pending_stalls and self.pending_stalls[0][1].query():
            self._add(self.pending_stalls.popleft())

    def resolve(self) -> None:
        """Adds the elapsed time of recorded CUDA wait events to stall_s (waits for them)."""
        while self.pending_stalls:
            pair = self.pending_stalls.popleft()
            pair[1].synchronize()
            self._add(pair)

    def _add(self, pair: tuple) -> None:
        start, end = pair
        self.stall_s += start.elapsed_time(end) / 1e3
        self.spare_events.append(pair)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def precision(self) -> float:
        """Share of predicted experts that the layer then routed to."""
        return self.predicted_correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        """Share of routed experts (in calls with a prediction) that had been predicted."""
        return self.predicted_correct / self.routed if self.routed else 0.0

    @property
    def bytes_per_token(self) -> float:
        """Bytes moved per decode token (per token overall when nothing was decoded)."""
        return self._per_token(self.decode_bytes_moved, self.bytes_moved)

    @property
    def cpu_bytes_per_token(self) -> float:
        """Expert bytes read by the CPU per decode token (per token overall when nothing was decoded)."""
        return self._per_token(self.decode_cpu_bytes, self.cpu_bytes)

    @property
    def mapped_bytes_per_token(self) -> float:
        """Bytes read in place from host memory per decode token (per token when nothing was decoded)."""
        return self._per_token(self.decode_mapped_bytes, self.mapped_bytes)

    def _per_token(self, decode_total: float, total: float) -> float:
        """Returns decode_total per decode token, or total per token when nothing was decoded."""
        if self.decode_tokens:
            return decode_total / self.decode_tokens
        return total / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        self.resolve()
        out = {k: v for k, v in self.__dict__.items()
               if k not in ("pending_stalls", "spare_events", "partner_layer_calls")}
        if self.partner_layer_calls:
            out["partner_layer_us"] = partner_layer_summary(self.partner_layer_calls)
        out.update(hit_rate=round(self.hit_rate, 4), prefetch_precision=round(self.precision, 4),
                   prefetch_recall=round(self.recall, 4), bytes_per_token=round(self.bytes_per_token, 1),
                   cpu_bytes_per_token=round(self.cpu_bytes_per_token, 1),
                   mapped_bytes_per_token=round(self.mapped_bytes_per_token, 1))
        out["stall_s"] = round(self.stall_s, 6)
        for key in ("fetch_s", "cpu_s", "cpu_wait_s"):
            out[key] = round(out[key], 6)
        return out


def partner_layer_summary(calls: list[tuple[float, int]]) -> dict[str, Any]:
    """Returns the partner's layer calls (kernel seconds, experts) as microseconds: their count, median and
    90th percentile, and the median by experts computed (1..8, then "9+"): a time that does not grow with
    the experts is a fixed cost per call (waking threads, barriers), one that does is the bytes."""
    def median_us(values: list[float]) -> float:
        ordered = sorted(values)
        return round(ordered[len(ordered) // 2] * 1e6, 1)

    seconds = [s for s, _ in calls]
    by: dict[str, list[float]] = {}
    for s, e in calls:
        by.setdefault(str(e) if e <= 8 else "9+", []).append(s)
    p90 = sorted(seconds)[int(0.9 * (len(seconds) - 1))]
    keys = sorted(by, key=lambda k: (len(k), k))  # "1".."8", then "9+"
    return {"calls": len(calls), "median": median_us(seconds), "p90": round(p90 * 1e6, 1),
            "median_by_experts": {k: median_us(by[k]) for k in keys}, "calls_by_experts": {k: len(by[k]) for k in keys}}
