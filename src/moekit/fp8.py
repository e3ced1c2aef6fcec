"""FP8 block-quantized checkpoints (DeepSeek-V3/R1, Qwen3 "-FP8"; quantization_config.quant_method
"fp8"): each quantized weight W [R, C] is stored as float8 e4m3 with `<name>_scale_inv`
[ceil(R/br), ceil(C/bc)] float32, one scale per (br x bc) block (`weight_block_size`):
W = fp8 * scale_inv of its block. moekit dequantizes them as it reads them (Checkpoint.read), so
every placement holds the model's own dtype; FP8 as a stored form is not built.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import CheckpointError, UnsupportedModelError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"


def block_size(hf: dict[str, Any], where: str = "config.json") -> tuple[int, int] | None:
    """Returns (rows, cols) of the FP8 scale blocks of an HF config, or None when it is not FP8;
    refuses an FP8 config moekit cannot dequantize (per-tensor or per-channel scales, other formats)."""
    quant = hf.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size")
    fmt = quant.get("fmt", "e4m3")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)) or fmt != "e4m3":
        raise UnsupportedModelError(
            f"{where}: FP8 checkpoint with weight_block_size {block!r} and fmt {fmt!r}; moekit dequantizes "
            "block-scaled e4m3 weights only (DeepSeek's layout); convert the checkpoint to bf16 first")
    return int(block[0]), int(block[1])


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               name: str = "weight") -> torch.Tensor:
    """Returns float32 W [R, C] of an fp8 weight [R, C] and its block scales [ceil(R/br), ceil(C/bc)]."""
    rows, cols = weight.shape
    br, bc = block
    want = (-(-rows // br), -(-cols // bc))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"tensor '{name}{SCALE_SUFFIX}' has shape {list(scale_inv.shape)}; a [{rows}, {cols}] "
                              f"weight in {br}x{bc} blocks needs {list(want)}: the checkpoint is damaged")
    scale = scale_inv.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return weight.float() * scale
