"""A batch-decoding policy of the MoE-Lightning pipeline: what the HRM (moekit.pipeline.hrm) searches
over and the batch runtime (pipeline.batch) runs. Its own module so that the residency spread
(pipeline.residency) and the HRM can both name it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoekitError

ATTENTION_PLACES = ("cpu", "gpu")


@dataclass(frozen=True)
class Policy:
    """One way to run the batch: N sequences in micro-batches of mu, R experts resident (r_w of them)."""

    batch: int  # N: sequences decoded together
    micro_batch: int  # mu: sequences per micro-batch (N / mu of them per layer)
    resident_share: float = 0.0  # r_w: share of the routed experts held on the GPU (R / (L_moe E) where R is given)
    attention: str = "cpu"  # where decode attention runs: "cpu" (KV in host memory) | "gpu" (KV on the GPU)
    # R: routed experts held on the GPU over all MoE layers, spread evenly (resident_layers);
    # None (policies before it): round(r_w E) in every layer
    resident_experts: int | None = None

    def __post_init__(self) -> None:
        if self.batch < 1 or not 1 <= self.micro_batch <= self.batch:
            raise MoekitError(f"a policy needs 1 <= micro_batch ({self.micro_batch}) <= batch ({self.batch})")
        if not 0 <= self.resident_share <= 1:
            raise MoekitError(f"resident_share must be in [0, 1], got {self.resident_share}")
        if self.resident_experts is not None and (isinstance(self.resident_experts, bool) or not isinstance(
                self.resident_experts, int) or self.resident_experts < 0):
            raise MoekitError(f"resident_experts must be a whole count >= 0, got {self.resident_experts!r}")
        if self.attention not in ATTENTION_PLACES:
            raise MoekitError(f"attention must be one of {', '.join(ATTENTION_PLACES)}, got {self.attention!r}")

    @property
    def micro_batches(self) -> float:
        return self.batch / self.micro_batch
