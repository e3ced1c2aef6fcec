"""Every placement x every stored form, on a plain and a globally pruned model (issue 11).

Each cell loads one checkpoint (dense float32, int-4, int-2 or the ternary code; pruned with
scope "global" or not) in one placement (resident, or offloaded with misses fetch - from the host
or the disk store -, cpu, auto or mapped) and either generates the same 8 greedy tokens as the resident run of that checkpoint, or
refuses - at load or at generation - with a one-line MoekitError that says which --misses to use
instead. resident and fetch must always run, and cpu too where the native CPU kernels build (every
form: compressed ones decode in the matvec, native/compressed.cpp); a placement that silently
serves another misses mode than the one asked fails (only auto may choose). Offloaded cells run with a cache of 3
experts (of 24, or of the pruned model's fewer), and check that misses really happened.

The reference is built here (pruned_models.StoredFormLoader: each layer's stored tensors with its
own expert count), so it does not depend on the loaders under test. On the CPU, mapped misses run
the slot kernels under the Triton interpreter only (TRITON_INTERPRET=1, which conftest sets
without a GPU); elsewhere those cells are skipped.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import moekit
from moekit import native
from moekit.errors import MoekitError
from moekit.experts import triton_ops
from moekit.load import read_config
from moekit.offload import OffloadConfig, load_offloaded
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig

from conftest import token_ids
from pruned_models import MATRIX_SHAPE, greedy, prune_globally, reference_model, save_tiny

CONTEXT = 40  # KV positions planned: the 12-token prompt and 8 new tokens fit
SLOTS = 3  # experts the cache holds: top-2 plus one, far fewer than any layer's experts
QUANT = {
    "int4": QuantConfig(bits="4", group_size=16, method="rtn"),
    "int2": QuantConfig(bits="2", group_size=16, method="rtn"),
    "ternary": QuantConfig(bits="ternary", method="rtn"),
}
FORMS = ["dense", *QUANT]
# placement -> (misses, store); both stores are covered: host (the GPU default, and what mapped reads in
# place) and disk (the CPU default, which "auto" picks here)
PLACEMENTS = {"resident": None, "fetch": ("fetch", "host"), "fetch-disk": ("fetch", "disk"),
              "cpu": ("cpu", "host"), "auto": ("auto", "auto"), "mapped": ("mapped", "host")}
MODELS = ["plain", "pruned"]
# where a misses mode cannot serve a form it may refuse; resident and fetch serve everything, and cpu
# does too where the native CPU kernels build (dense, and compressed forms decoded in the matvec)
MAY_REFUSE = {"auto", "mapped"} | (set() if native.library() is not None else {"cpu"})
REFUSAL = re.compile(r"\buse\b.*(--misses|misses=)")  # names the misses mode to use instead


class Checkpoints:
    """The 8 checkpoints (model x form), compressed once per module, and their reference tokens."""

    def __init__(self, root):
        plain = save_tiny(root / "plain", **MATRIX_SHAPE)
        pruned, self.pruned_counts = prune_globally(plain, root / "pruned")
        self.paths = {("plain", "dense"): plain, ("pruned", "dense"): pruned}
        self.errors: dict[tuple[str, str], Exception] = {}
        for model, src in (("plain", plain), ("pruned", pruned)):
            for form, quant in QUANT.items():
                out = root / f"{model}-{form}"
                try:
                    compress(src, out, quant, progress=False)
                    self.paths[(model, form)] = out
                except MoekitError as e:  # reported by every cell of this checkpoint
                    self.errors[(model, form)] = e
        self.ids = token_ids(1, 12, seed=3)
        self._reference: dict[tuple[str, str], torch.Tensor] = {}

    def path(self, model: str, form: str):
        if (model, form) in self.errors:
            raise self.errors[(model, form)]
        return self.paths[(model, form)]

    def reference(self, model: str, form: str) -> torch.Tensor:
        """Returns the greedy tokens of the checkpoint with every expert resident in its stored form."""
        if (model, form) not in self._reference:
            self._reference[(model, form)] = greedy(reference_model(self.path(model, form)), self.ids)
        return self._reference[(model, form)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("placement_matrix"))


def budget_for(path, config: OffloadConfig) -> int:
    """Returns the budget that leaves exactly SLOTS experts of cache: what the plan of an unbudgeted
    load (every expert cached) reserves besides its cache, plus SLOTS experts."""
    plan = load_offloaded(path, offload=dataclasses.replace(config, device_memory=None)).offload.plan
    return plan.planned_bytes - plan.cache_bytes + SLOTS * plan.expert_bytes


def run_cell(path, misses: str, store: str, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Returns (greedy tokens, offload report) of the checkpoint offloaded with `misses` and `store`."""
    config = OffloadConfig(context_tokens=CONTEXT, store=store, misses=misses)
    config = dataclasses.replace(config, device_memory=budget_for(path, config))
    model = load_offloaded(path, offload=config)
    runtime = model.offload
    if misses in ("cpu", "mapped") and runtime.misses != misses:
        pytest.fail(f"asked for misses={misses}, runs misses={runtime.misses} instead of refusing: "
                    f"{runtime.misses_note}")
    return greedy(model, ids), runtime.report()


def check_misses(misses: str, report: dict, total_experts: int) -> None:
    """Checks that the cache was smaller than the model's experts and that misses were served."""
    assert report["cache_slots"] == SLOTS < total_experts, report["cache_slots"]
    planned = report["plan"]["total_experts"]
    assert planned == total_experts, f"the budget plan counts {planned} experts, the model has {total_experts}"
    served = {"fetch": report["demand_fetches"], "cpu": report["cpu_experts"],
              "auto": report["demand_fetches"] + report["cpu_experts"], "mapped": report["mapped_reads"]}
    assert served[misses] > 0, f"no misses served by {misses}: {report}"


def test_global_pruning_leaves_layers_with_different_counts(checkpoints):
    counts = checkpoints.pruned_counts
    assert len(set(counts)) > 1, counts
    cfg = read_config(checkpoints.path("pruned", "dense"))[2]
    assert cfg.num_experts == max(counts) and [cfg.experts_in(i) for i in range(cfg.num_layers)] == counts


def cells() -> list:
    """Returns every (model, form, placement) cell. plain-dense-mapped (~10 s interpreted) is slow:
    tests/offload/test_mapped.py runs mapped misses on a plain dense model in the default set, and
    pruned-dense-mapped (per-layer expert counts in the offsets table) stays here."""
    return [pytest.param(m, f, p, marks=pytest.mark.slow if (m, f, p) == ("plain", "dense", "mapped") else ())
            for m in MODELS for f in FORMS for p in PLACEMENTS]


@pytest.mark.parametrize("model, form, placement", cells())
def test_cell(checkpoints, model, form, placement, record_property):
    if placement == "mapped" and not (triton_ops.HAVE_TRITON and triton_ops.triton_usable(torch.empty(0))):
        pytest.skip("this matrix runs on the CPU, where mapped misses run the slot kernels only under the "
                    "Triton interpreter (TRITON_INTERPRET=1 before moekit is imported; conftest sets it without a GPU)")
    path = checkpoints.path(model, form)
    expected = checkpoints.reference(model, form)
    if PLACEMENTS[placement] is None:
        assert torch.equal(greedy(moekit.load_model(path), checkpoints.ids), expected)
        record_property("outcome", "token-equal")
        return
    misses, store = PLACEMENTS[placement]
    try:
        tokens, report = run_cell(path, misses, store, checkpoints.ids)
    except MoekitError as e:
        if misses not in MAY_REFUSE or not REFUSAL.search(str(e)):
            raise  # not a refusal: the error itself is the failure
        assert "\n" not in str(e).strip(), f"the refusal is not one line: {str(e)!r}"
        record_property("outcome", f"refused: {e}")
        return
    assert torch.equal(tokens, expected), (tokens.tolist(), expected.tolist())
    cfg = read_config(path)[2]
    check_misses(misses, report, sum(cfg.experts_in(i) for i in range(cfg.num_layers)))
    record_property("outcome", f"token-equal, misses={report['misses_used']}")
