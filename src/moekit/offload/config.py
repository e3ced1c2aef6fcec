"""OffloadConfig: how an offloaded model places its experts, as one frozen dataclass.

Sizes are bytes. `parse_size` reads what users type: "10MB" (10**6 units), "24GiB" (2**30),
"1.5G" (taken as GB), or a plain number of bytes.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ..errors import MoekitError

PREDICTORS = ("auto", "none", "speculative", "pregate", "oracle")
POLICIES = ("lru", "lfu")
STORES = ("auto", "host", "disk")
MISSES = ("fetch", "cpu", "auto", "mapped")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | float, flag: str = "--device-memory") -> int:
    """Returns the bytes of a size like '10MB', '24GiB', '2.5G' or '1048576'."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise MoekitError(f"{flag}: cannot read size '{text}'; write e.g. 10MB, 512MiB, 24GB or 24GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: float) -> str:
    """Returns n bytes as a short string in the largest fitting binary unit ('3.2 MiB')."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class OffloadConfig:
    """Where experts live and how the device-side expert cache is run (version 1)."""

    device_memory: int | None = None  # bytes moekit may hold on the device (None: all free memory)
    # auto | none | speculative | pregate | oracle (benchmarks); auto: speculative, not consulted in
    # decode-sized calls whose misses run on the CPU (prefetching there cost 14-24% on the H200)
    predictor: str = "auto"
    cache_policy: str = "lfu"  # lfu | lru: which cached expert a fetch evicts (lfu counts survive eviction)
    store: str = "auto"  # auto (GPU: pinned host memory, CPU: disk) | host | disk
    prefetch_k: int = 0  # experts predicted per token for the next layer (0: the model's top-k)
    pin_experts: float = 0.0  # share of cache slots pinned to the most-used experts (needs counts)
    context_tokens: int | None = None  # KV-cache positions to plan for at load (None: reserved by each generation)
    batch: int = 1  # sequences to plan the KV cache and activations for
    strict: bool = False  # run only the predicted experts (changes outputs; needs a model tuned for it)
    pregate_path: str | None = None  # folder written by `moekit pregate` (predictor pregate)
    record_routing: bool = False  # keep every layer's routing (an oracle trace for a second run)
    # fetch | cpu | auto (offload.cpu) | mapped (read in place from host memory, offload.mapped). auto by
    # default: on the H200 (OLMoE shape) it ran 66.9 / 199.1 tok/s with all / half the experts in host memory
    # where fetch ran 25.2 / 123.3; where misses cannot run on the CPU (the CPU device, a form without a CPU
    # path) auto fetches
    misses: str = "auto"
    cpu_max_tokens: int = 8  # layer calls of at most this many tokens may run experts on the CPU
    cpu_threads: int = 0  # intra-op threads of the CPU expert worker (CUDA; 0: torch's threads - 1)
    prefill_chunk: int = 256  # tokens per prefill forward: bounds activations (and planned workspace)
    host_embedding: bool = True  # keep an untied input embedding table in host memory (CUDA)
    # bf16 | int8: the attention projections, dense / shared MLPs and an untied LM head as loaded, or as
    # int8 rows (linear.Int8Linear: half their bytes, for budgets as small as llama.cpp's Q4_K_M footprint)
    dense: str = "bf16"
    version: int = 1

    def __post_init__(self) -> None:
        if self.predictor not in PREDICTORS:
            raise MoekitError(f"--predictor '{self.predictor}' unknown; use one of {', '.join(PREDICTORS)}")
        if self.cache_policy not in POLICIES:
            raise MoekitError(f"--cache-policy '{self.cache_policy}' unknown; use one of {', '.join(POLICIES)}")
        if self.store not in STORES:
            raise MoekitError(f"offload store '{self.store}' unknown; use one of {', '.join(STORES)}")
        if self.device_memory is not None and self.device_memory <= 0:
            raise MoekitError(f"--device-memory must be > 0, got {self.device_memory}")
        if not 0.0 <= self.pin_experts < 1.0:
            raise MoekitError(f"pin_experts is a share of the cache in [0, 1), got {self.pin_experts}")
        if self.prefill_chunk < 1:
            raise MoekitError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.prefetch_k < 0 or self.batch <= 0:
            raise MoekitError("prefetch_k must be >= 0 and batch > 0")
        from ..linear import check_dense_form  # here: this module stays free of torch for the CLI's flag checks

        check_dense_form(self.dense)
        if self.misses not in MISSES:
            raise MoekitError(f"--misses '{self.misses}' unknown; use one of {', '.join(MISSES)}")
        if self.cpu_max_tokens < 1 or self.cpu_threads < 0:
            raise MoekitError(f"cpu_max_tokens must be >= 1 and cpu_threads >= 0, got {self.cpu_max_tokens} "
                              f"and {self.cpu_threads}")
        if self.misses == "mapped" and self.store == "disk":
            raise MoekitError("--misses mapped reads missed experts in place from host memory: it needs the host "
                              "store (store 'host' or 'auto'), not 'disk'")
        if self.misses == "mapped" and self.strict:
            raise MoekitError("strict mode runs the predicted experts, which mapped decode steps never consult: "
                              "use --misses fetch with --strict-pregate")
        if self.strict and self.predictor in ("none", "oracle"):
            raise MoekitError("strict mode runs the predicted experts: use --predictor pregate or speculative")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OffloadConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoekitError(f"offload config has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)
