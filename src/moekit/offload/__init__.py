"""Offload: run a model larger than the device. Experts live in a store (pinned host memory, or
the checkpoint on disk), a device cache under a byte budget holds the ones in use, and a predictor
prefetches the next layer's experts on a side stream while the current layer computes. With
OffloadConfig(misses="cpu" | "auto"), decode-sized calls compute the experts absent from the device
on the CPU from the store instead of copying them (offload.cpu). Experts move in their stored
form (dense, int-N, ternary code; offload.layout says how a form lies in store rows and cache
slots) and only the form multiplies them (experts.forms). The budget plan holds what runs
(offload.planner): chunked prefill, a KV cache reserved per generation, untied input embeddings
in host memory (offload.embedding), a measured warm-up that fills the budget (offload.loader).

Entry points: `load_offloaded(path, device, offload=OffloadConfig(...))`, `OffloadLoader` (an
ExpertLoader for moekit.load_model), `plan_budget`, `train_pregates` (moekit pregate).
"""

from .config import OffloadConfig, format_size, parse_size
from .layout import PackedLayout, SlotLayout, TensorLayout, layout_for
from .loader import OffloadLoader, load_offloaded, read_counts
from .planner import BudgetPlan, plan_budget
from .source import OffloadedExperts, OffloadRuntime
from .stats import OffloadStats

__all__ = ["OffloadConfig", "OffloadLoader", "OffloadRuntime", "OffloadedExperts", "OffloadStats",
           "BudgetPlan", "PackedLayout", "SlotLayout", "TensorLayout", "layout_for", "load_offloaded", "plan_budget", "parse_size",
           "format_size", "read_counts"]
