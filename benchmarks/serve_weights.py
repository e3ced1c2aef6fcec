"""bench_serve's random weights and its transformers baseline: a checkpoint written to disk (read
back by moekit and by transformers), or weights drawn on the device with no disk at all.

Drawn (`--weights drawn`, or `auto` for a shape over --disk-max-gb): moekit reads a
random_weights.RandomCheckpoint (each tensor drawn on the device from its name), resident and
offloaded alike (the offloaded host store copies each drawn expert into pinned host memory);
transformers builds the same shapes with `from_config` on the device in bf16, with its own random
init. The two engines then hold different values of the same shapes: routing of random weights is
near-uniform either way, so the speed compares, the tokens do not. The qwen3-30b-a3b shape
(61 GB) needs it: written, loaded by moekit and loaded again by transformers it would overrun a
600 s GPU call and nearly fill the H200 machine's 64 GB disk.

Also here: what the offloaded rows' host store needs (every routed expert, pinned on a GPU host),
the host memory available for it, and the setup time expected on the H200.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import sync
from random_checkpoint import write_random_checkpoint
from random_weights import RandomCheckpoint

WEIGHT_MODES = ("auto", "disk", "drawn")
DRAWN_NOTE = ("weights drawn on the device, no checkpoint on disk: moekit reads random_weights.RandomCheckpoint "
              "(N(0, 0.02) by tensor name), transformers is built by from_config with its own random init (same "
              "shapes, other values); routing of random weights is near-uniform in both, so speeds compare, tokens "
              "do not")
DISK_NOTE = "one random checkpoint written to disk, read by moekit and by transformers (the same values in both)"


def shape_bytes(hf: dict) -> int:
    """Returns the bf16 bytes of every tensor of the config dict `hf` (nothing drawn or written)."""
    return RandomCheckpoint(hf, "cpu").total_bytes()


def weights_mode(asked: str, nbytes: int, disk_max_gb: float) -> str:
    """Returns "disk" or "drawn": `asked` unless it is "auto", which draws shapes over disk_max_gb."""
    if asked not in WEIGHT_MODES:
        raise ValueError(f"--weights {asked!r}: choose one of {', '.join(WEIGHT_MODES)}")
    if asked != "auto":
        return asked
    return "drawn" if nbytes > disk_max_gb * 1e9 else "disk"


@dataclass
class ServeWeights:
    """One shape's weights for every engine of the run: a folder on disk, or drawn on `device`."""

    mode: str  # "disk" or "drawn"
    hf: dict  # the config.json dict
    cfg: Any  # moekit ModelConfig
    nbytes: int  # bf16 bytes of every tensor
    device: torch.device
    folder: Path | None = None  # the checkpoint (disk mode only)
    write_s: float | None = None  # seconds the checkpoint took to write (disk mode only)

    def moekit_source(self) -> Path | RandomCheckpoint:
        """Returns what load_model / load_offloaded read: the folder, or a RandomCheckpoint on the device."""
        return self.folder if self.mode == "disk" else RandomCheckpoint(self.hf, self.device)

    def describe(self) -> dict[str, Any]:
        """Returns the JSON record of where the weights came from."""
        return {"mode": self.mode, "bytes": self.nbytes, "write_s": self.write_s,
                "note": DISK_NOTE if self.mode == "disk" else DRAWN_NOTE}

    def transformers_model(self):
        """Returns the transformers model on the device in bf16, in eval mode: loaded from the folder
        (disk), or built from the config with transformers' own random init (drawn)."""
        if self.mode == "disk":
            return load_transformers(self.folder, self.device)
        return transformers_from_config(self.hf, self.device)


def prepare_weights(hf: dict, mode: str, root: Path, name: str, device: torch.device) -> ServeWeights:
    """Returns the shape's weights: written under root/name (disk) or only described (drawn)."""
    if mode == "disk":
        t0 = time.perf_counter()
        folder, cfg, nbytes = write_random_checkpoint(root / name, hf, device)
        return ServeWeights("disk", hf, cfg, nbytes, device, folder, round(time.perf_counter() - t0, 1))
    from moekit.load import read_config

    ckpt = RandomCheckpoint(hf, device)
    return ServeWeights("drawn", hf, read_config(ckpt)[2], ckpt.total_bytes(), device)


def load_transformers(folder: Path, device: torch.device):
    """Returns the checkpoint as a transformers model on `device` (straight there where accelerate
    is installed: no second copy through host memory)."""
    import transformers

    direct = device.type == "cuda" and importlib.util.find_spec("accelerate") is not None
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                           **({"device_map": str(device)} if direct else {}))
    return hf.to(device).eval()


def transformers_from_config(hf: dict, device: torch.device):
    """Returns a transformers model of the config dict `hf` built on `device` in bf16 with its own
    random init (no checkpoint read; seeded, so two runs build the same values)."""
    import transformers

    fields = {k: v for k, v in hf.items() if k not in ("model_type", "architectures", "torch_dtype")}
    config = transformers.AutoConfig.for_model(hf["model_type"], **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    sync(device)
    return model.to(device=device, dtype=torch.bfloat16).eval()


def transformers_setup(model) -> dict[str, Any]:
    """Returns what the transformers model runs: its experts and attention implementations, its bytes."""
    return {"experts_implementation": getattr(model.config, "_experts_implementation", None),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype)}


def transformers_padded(hf, prompts: list[list[int]], batch: int, new_tokens: int, device,
                        max_batches: int, max_time_s: float) -> dict[str, Any]:
    """Returns transformers' output tok/s on prompts left-padded into static batches of `batch`
    (prefill included, as a server would see it); each generate stops after max_time_s."""
    import transformers

    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        eos_token_id=None, pad_token_id=0, max_time=max_time_s)
    tokens, wall, short = 0, 0.0, 0
    for b in range(0, min(len(prompts), batch * max_batches), batch):
        group = prompts[b:b + batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, generation_config=gen)
        sync(device)
        wall += time.perf_counter() - t0
        tokens += (out.shape[1] - width) * len(group)
        short += out.shape[1] - width < new_tokens
    return {"batch": batch, "output_tokens": tokens, "wall_s": round(wall, 3), "output_tok_s": tokens / wall,
            "stopped_by_max_time": short, "max_time_s": max_time_s}


# ---- the offloaded rows' host store -----------------------------------------------------------

HOST_SHARE = 0.85  # of the host's available memory the offloaded rows' pinned store may take


def routed_expert_bytes(cfg) -> int:
    """Returns the bf16 bytes of every routed expert (what the offloaded host store holds)."""
    per_expert = 3 * cfg.hidden_size * cfg.expert_ffn * 2  # gate, up [I, D] and down [D, I]
    return per_expert * sum(cfg.experts_in(layer) for layer in range(cfg.num_layers))


def offload_setup_estimate_s(experts_bytes: int) -> float:
    """Returns the H200 seconds the offloaded setup is expected to take (load, fit, warm-up): 12 s
    plus 0.75 s per GB of experts pinned in host memory. An estimate from two runs, not a fit: it
    gives 21.7 s for OLMoE's 12.9 GB (measured 22.3 s, read from disk, f472762) and 55 s for the
    qwen3 shape's 58 GB (bench_offload drew that store on the GPU into pinned memory in 31.4 s at
    7e43795; the fit and warm-up come on top, and here each expert is drawn and copied alone)."""
    return 12.0 + 0.75 * experts_bytes / 1e9


def available_host_bytes() -> int | None:
    """Returns the host's MemAvailable (/proc/meminfo) in bytes, None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
