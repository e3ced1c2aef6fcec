"""Lazy reading of a Hugging Face checkpoint directory (config.json + safetensors shards).

Nothing is read until asked for: a tensor, or one expert's slice, is read from its memory-mapped
shard on demand, so loading a model costs host memory near its largest tensor, not its size.
Every problem (missing file, missing tensor, wrong shape, damaged shard) is a CheckpointError
whose message names the file and the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open

from . import fp8
from .errors import CheckpointError
from .hashing import sha256_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """Returns the torch dtype for a name like 'bf16' or 'float32' (None gives the default)."""
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "").lower()
    if key not in DTYPES:
        raise CheckpointError(f"unknown dtype '{name}'; use one of: float32, float16, bfloat16")
    return DTYPES[key]


def parse_device(name: str | torch.device) -> torch.device:
    """Returns the torch device for a user's --device ('cpu', 'cuda', 'cuda:1'), or raises a one-line
    MoekitError when PyTorch does not know it or this machine does not have it."""
    from .errors import MoekitError

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise MoekitError(f"unknown --device '{name}'; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MoekitError("--device cuda asked for, but this PyTorch sees no CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MoekitError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise MoekitError(f"--device {name}: moekit runs on cpu and cuda devices")
    return device


def read_json(path: Path) -> dict[str, Any]:
    """Returns a JSON file's contents, or raises CheckpointError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


class Checkpoint:
    """An HF model directory, read lazily.

    ``weight_map`` maps every tensor name to the shard file that holds it; shards are opened
    (memory-mapped) on first use and kept open.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face model "
                                  "directory with config.json and *.safetensors)")
        self.config: dict[str, Any] = read_json(self.path / "config.json")
        self._handles: dict[str, Any] = {}
        self.checksums: dict[str, str] = {}  # shard -> sha256, when the writer recorded them
        self._verified: set[str] = set()
        self.weight_map = self._weight_map()
        self.fp8_block = fp8.block_size(self.config, str(self.path / "config.json"))  # None: not FP8

    def _weight_map(self) -> dict[str, str]:
        index_path = self.path / INDEX_FILE
        if index_path.exists():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: has no 'weight_map'")
            self.checksums = dict((index.get("metadata") or {}).get("moekit_sha256") or {})
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).exists():
                    example = next(k for k, v in weight_map.items() if v == shard)
                    raise CheckpointError(
                        f"{self.path / shard}: shard missing (named in {INDEX_FILE} for tensor "
                        f"'{example}' and others); copy the complete checkpoint")
            return dict(weight_map)
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.path}: no *.safetensors files (moekit reads safetensors "
                                  "checkpoints; convert .bin files with transformers' save_pretrained)")
        weight_map = {}
        for shard in shards:
            for name in self._open(shard).keys():
                weight_map[name] = shard
        return weight_map

    def _open(self, shard: str) -> Any:
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise CheckpointError(f"{self.path / shard}: damaged safetensors file ({e})") from None
        return self._handles[shard]

    # ---- queries ----------------------------------------------------------------------
    def has(self, name: str) -> bool:
        """Returns whether the checkpoint holds a tensor of this name."""
        return name in self.weight_map

    def file_of(self, name: str) -> Path:
        """Returns the shard path holding `name`."""
        if name not in self.weight_map:
            where = INDEX_FILE if (self.path / INDEX_FILE).exists() else "the *.safetensors files"
            raise CheckpointError(f"{self.path}: tensor '{name}' not found in {where}; "
                                  "the checkpoint is incomplete or not of the architecture its "
                                  "config.json names")
        return self.path / self.weight_map[name]

    def _slice(self, name: str) -> Any:
        """Returns the safetensors slice of `name`, or a CheckpointError when its shard lacks it."""
        path = self.file_of(name)
        try:
            return self._open(path.name).get_slice(name)
        except CheckpointError:
            raise
        except Exception:  # the index names this shard, but the shard does not hold the tensor
            raise CheckpointError(f"{path}: tensor '{name}' not found in this file, though "
                                  f"{INDEX_FILE} says it is there; the shard is damaged or from "
                                  "another checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Returns the stored shape of a tensor without reading it."""
        return tuple(self._slice(name).get_shape())

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Returns rows start..stop-1 of a stored tensor along its first dimension (one expert of a
        fused [E, ...] tensor, say), reading only those bytes from the memory-mapped shard."""
        path = self.file_of(name)
        rows = self.shape(name)[0]
        if not 0 <= start < stop <= rows:
            raise CheckpointError(f"{path}: tensor '{name}' has {rows} rows, asked for {start}..{stop - 1}")
        self._verify(path.name)
        if self.fp8_block is not None and self.has(name + fp8.SCALE_SUFFIX):
            raise CheckpointError(f"{path}: tensor '{name}' is stored in FP8 blocks and read whole only; "
                                  "convert the checkpoint to bf16 first")
        try:
            return self._slice(name)[start:stop]
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor '{name}' ({e}); "
                                  "the file is damaged or truncated") from None

    def dtype(self, name: str) -> torch.dtype:
        """Returns the torch dtype of a stored tensor (from its header)."""
        stored = self._slice(name).get_dtype()
        if stored not in _TORCH_DTYPES:
            raise CheckpointError(f"{self.file_of(name)}: tensor '{name}' has dtype {stored}, which moekit does not read")
        return _TORCH_DTYPES[stored]

    def itemsize(self, name: str) -> int:
        """Returns the bytes per element of a stored tensor (from its header)."""
        shard = self.file_of(name).name
        return _dtype_bytes(self._open(shard).get_slice(name).get_dtype())

    def names(self) -> Iterable[str]:
        return self.weight_map.keys()

    # ---- reads -------------------------------------------------------------------------
    def read(self, name: str, shape: tuple[int, ...] | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """Returns one tensor (on the CPU), checked against `shape` and cast to `dtype`."""
        path = self.file_of(name)
        if shape is not None:
            stored = self.shape(name)
            if stored != tuple(shape):
                raise CheckpointError(
                    f"{path}: tensor '{name}' has shape {list(stored)}, config.json implies "
                    f"{list(shape)}; the weights do not match the config")
        self._verify(path.name)
        try:
            tensor = self._open(path.name).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor '{name}' ({e}); "
                                  "the file is damaged or truncated") from None
        if tensor.dtype in fp8.FP8_DTYPES and self.fp8_block is not None and self.has(name + fp8.SCALE_SUFFIX):
            tensor = fp8.dequantize(tensor, self.read(name + fp8.SCALE_SUFFIX), self.fp8_block, name)
            dtype = dtype or self.dequantized_dtype
        return tensor if dtype is None else tensor.to(dtype)

    @property
    def dequantized_dtype(self) -> torch.dtype:
        """Returns the dtype FP8 weights read as when no dtype is asked: the config's torch_dtype,
        else bfloat16 (what FP8 checkpoints were trained in)."""
        name = self.config.get("torch_dtype") or self.config.get("dtype") or "bfloat16"
        return {"float32": torch.float32, "float16": torch.float16}.get(name, torch.bfloat16)

    def is_fp8_scale(self, name: str) -> bool:
        """Returns whether `name` is the block scales of an FP8 weight (read with it, not alone)."""
        return (self.fp8_block is not None and name.endswith(fp8.SCALE_SUFFIX)
                and self.has(name.removesuffix(fp8.SCALE_SUFFIX)))

    def _verify(self, shard: str) -> None:
        """Checks a shard against its recorded sha256 once, before its data is first used."""
        if shard in self._verified or shard not in self.checksums:
            return
        if sha256_file(self.path / shard) != self.checksums[shard]:
            raise CheckpointError(
                f"{self.path / shard}: sha256 does not match the one recorded in {INDEX_FILE}; "
                "the file is damaged or was changed after writing. Copy or re-create it")
        self._verified.add(shard)

    def total_bytes(self) -> int:
        """Returns the bytes of all tensors as stored (from the headers, nothing read)."""
        total = 0
        for name in self.weight_map:
            sl = self._slice(name)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            total += numel * _dtype_bytes(sl.get_dtype())
        return total


_TORCH_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                 "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _dtype_bytes(safetensors_dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(safetensors_dtype, 4)
