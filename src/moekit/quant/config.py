"""QuantConfig: how a checkpoint's experts were compressed, as written to config.json's
`quantization_config` (quant_method "moekit", with a format version)."""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import CheckpointError, MoekitError

QUANT_METHOD = "moekit"
FORMAT_VERSION = 2  # 2: ternary code rows keep their own chunk counts (quant.code)
INT, TERNARY_CODE = "int", "ternary_code"  # the stored forms


@dataclass(frozen=True)
class QuantConfig:
    """One compression recipe; its `form` decides the stored tensors (see quant.formats)."""

    bits: str = "ternary"  # "ternary" | "2" | "3" | "4"
    group_size: int | None = None  # columns per scale/zero group of the int grids (None = per row)
    method: str = "gptq"  # "gptq" | "rtn" (round to nearest, the baseline)
    damp: float = 0.01  # GPTQ damping, as a fraction of the mean Hessian diagonal
    max_tokens_per_expert: int | None = 4096  # cap on calibration tokens per expert (GPTQ)
    expert_batch: int = 16  # experts quantized together (stacked Hessians)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if str(self.bits) not in ("ternary", "2", "3", "4"):
            raise MoekitError(f"--bits must be ternary, 2, 3 or 4, got {self.bits!r}")
        object.__setattr__(self, "bits", str(self.bits))
        if self.method not in ("gptq", "rtn"):
            raise MoekitError(f"--method must be gptq or rtn, got {self.method!r}")
        if self.group_size is not None and (self.group_size <= 0 or self.bits == "ternary"):
            raise MoekitError("--group-size must be > 0, and applies to 2/3/4 bits only (ternary is per row)")
        if not 0 <= self.damp < 1:
            raise MoekitError(f"--damp must be in [0, 1), got {self.damp}")
        if self.max_tokens_per_expert is not None and self.max_tokens_per_expert <= 0:
            raise MoekitError(f"--max-tokens-per-expert must be > 0, got {self.max_tokens_per_expert}")
        if self.expert_batch <= 0:
            raise MoekitError(f"--expert-batch must be > 0, got {self.expert_batch}")

    def check_shapes(self, hidden: int, ffn: int) -> None:
        """Raises MoekitError when the group size does not divide the expert rows' lengths
        (gate/up rows have `hidden` columns, down rows `ffn`): the int form assumes equal groups."""
        g = self.group_size
        if g is not None and any(k % g and g < k for k in (hidden, ffn)):  # g >= k: one group per row
            raise MoekitError(f"--group-size {g} must divide the experts' row lengths (hidden {hidden}, expert "
                              f"ffn {ffn}); pick a common divisor such as {math.gcd(hidden, ffn, 128)}")

    @property
    def form(self) -> str:
        """The stored form: ternary experts are stored in the sub-1-bit code, others as int-N."""
        return TERNARY_CODE if self.bits == "ternary" else INT

    def to_dict(self) -> dict[str, Any]:
        """Returns the quantization_config entry of config.json."""
        return {"quant_method": QUANT_METHOD, "form": self.form, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config.json") -> "QuantConfig":
        """Returns the QuantConfig of a quantization_config dict, or a CheckpointError naming `where`."""
        if d.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(f"{where}: quantization_config.quant_method is {d.get('quant_method')!r}, "
                                  f"moekit reads only {QUANT_METHOD!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            fix = ("re-run moekit compress on the original model (older formats are not read)"
                   if isinstance(version, int) and version < FORMAT_VERSION else "re-run moekit compress, or upgrade moekit")
            raise CheckpointError(f"{where}: moekit compressed format version {version}; this moekit reads "
                                  f"version {FORMAT_VERSION}. To load it, {fix}")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        try:
            return cls(**fields)
        except MoekitError as e:
            raise CheckpointError(f"{where}: bad quantization_config ({e})") from None


def is_moekit_quantized(hf_config: dict[str, Any]) -> bool:
    """Returns whether a config.json dict describes a moekit-compressed checkpoint."""
    q = hf_config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD
