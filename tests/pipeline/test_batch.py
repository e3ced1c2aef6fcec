"""run_plan (moekit.pipeline.batch): a plan's policy run end to end on the bundled tiny model --
paged experts with the plan's resident count, its micro-batches -- tokens equal to generate,
the measurement reported next to the prediction."""

from __future__ import annotations

import pytest

from moekit import native

from moekit.errors import MoekitError
from moekit.generate import generate_ragged
from moekit.load import default_model_path, load_model, read_config
from moekit.pipeline.batch import run_plan, synthetic_prompts
from moekit.pipeline.hrm import Policy, Workload, evaluate, model_costs
from moekit.pipeline.machine import PRESETS


def tiny_plan(policy: Policy, gen_len: int):
    cfg = read_config(default_model_path())[2]
    costs = model_costs(cfg, 3 * cfg.hidden_size * cfg.expert_ffn * 4, act_dtype_bytes=4)
    return evaluate(costs, PRESETS["h200"], policy, Workload(6, gen_len))


def test_run_plan_equals_generate_and_reports_the_prediction():
    prompts = synthetic_prompts(6, 6, 4096, seed=3)
    plan = tiny_plan(Policy(batch=6, micro_batch=2, resident_share=0.25), gen_len=4)
    result = run_plan(default_model_path(), plan, prompts, 4, device="cpu", dtype="float32", h2d_bandwidth=55e9,
                      profile=True)
    model = load_model(device="cpu", dtype="float32")
    expected = generate_ragged(model, prompts, max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    assert result.tokens == [e.tolist() for e in expected]
    assert result.resident_per_layer == 2 and result.micro_batch == 2 and result.sequences == 6
    assert result.tok_s > 0 and result.predicted_tok_s == plan.tok_s and result.pcie_ceiling_decode_tok_s > 0
    assert result.pages_loaded > 0
    steps = result.step_profile  # three decode steps, the first left out
    assert steps["steps"] == 2 and steps["step_ms"] > 0 and steps["worker_attention_ms"] > 0
    assert 0 <= steps["launch_blocked_ms"] <= steps["step_ms"]
    # the worker's time inside the native call is part of its attention time, and its read rate shown
    assert 0 < steps["worker_kernel_ms"] <= steps["worker_attention_ms"] * (1 + 1e-9)
    if native.library() is not None:
        assert steps["worker_kernel_gb_s"] > 0
    assert steps["launch_issuing_ms"] == pytest.approx(steps["step_ms"] - steps["launch_blocked_ms"])
    # the issuing by part: each measured, together at most the issuing (the rest: the prologue, the loop)
    parts = [steps[f"issue_{part}_ms"] for part in ("pre", "loadh", "pages", "post")]
    assert all(ms >= 0 for ms in parts) and steps["issue_post_ms"] > 0
    assert sum(parts) <= steps["launch_issuing_ms"] * (1 + 1e-9)


def test_run_plan_refuses_gpu_attention_and_a_wrong_count():
    with pytest.raises(MoekitError, match="attention on the GPU"):
        run_plan(default_model_path(), tiny_plan(Policy(2, 1, 0.0, "gpu"), 2), [[1], [2]], 2)
    with pytest.raises(MoekitError, match="for 2 sequences, 1 prompts"):
        run_plan(default_model_path(), tiny_plan(Policy(2, 1, 0.0), 2), [[1]], 2)


def test_launch_task_seconds_measures_one_task():
    """The launch-cost probe runs one task of a paged model (positive seconds, the model still
    decodes the same tokens after it)."""
    from moekit.pipeline.batch import load_paged
    from moekit.pipeline.timeline import launch_task_seconds

    model = load_paged(default_model_path(), 2, device="cpu", dtype="float32")
    seconds = launch_task_seconds(model, micro_batch=2, reps=2, trials=1)
    assert 0 < seconds < 5
    prompts = synthetic_prompts(4, 5, 4096, seed=1)
    plan = tiny_plan(Policy(batch=4, micro_batch=2, resident_share=0.25), gen_len=3)
    result = run_plan(default_model_path(), plan, prompts, 3, device="cpu", dtype="float32", model=model)
    expected = generate_ragged(load_model(device="cpu", dtype="float32"), prompts, max_new_tokens=3,
                               temperature=0.0, stop_at_eos=False)
    assert result.tokens == [e.tolist() for e in expected]


def test_run_plan_with_uneven_residency_equals_generate():
    """R = 10 resident experts over the 4 MoE layers of 8: layers hold 3, 3, 2, 2, and the batch
    engine's tokens still equal generate's (float32 CPU), its pages carrying the other 22."""
    from moekit.pipeline.batch import resident_experts

    prompts = synthetic_prompts(4, 5, 4096, seed=5)
    plan = tiny_plan(Policy(batch=4, micro_batch=2, resident_share=10 / 32, resident_experts=10), gen_len=4)
    assert resident_experts(default_model_path(), plan) == (3, 3, 2, 2)
    result = run_plan(default_model_path(), plan, prompts, 4, device="cpu", dtype="float32")
    expected = generate_ragged(load_model(device="cpu", dtype="float32"), prompts, max_new_tokens=4,
                               temperature=0.0, stop_at_eos=False)
    assert result.tokens == [e.tolist() for e in expected]
    cfg = read_config(default_model_path())[2]
    expert_bytes = 3 * cfg.hidden_size * cfg.expert_ffn * 4
    assert result.resident_per_layer == (3, 3, 2, 2) and result.streamed_bytes_per_step == 22 * expert_bytes
    assert result.pages_loaded > 0


def test_policy_json_old_and_new():
    """--policy takes the old JSON (r_w of every layer), R alone, and a plan's policy with both;
    the old one still means round(r_w E) in every layer; a bad R gets one line."""
    from types import SimpleNamespace

    from moekit.pipeline.batch import resident_experts
    from moekit.pipeline.batch_cli import read_policy

    old = read_policy('{"batch": 4, "micro_batch": 2, "resident_share": 0.25}')
    assert old == Policy(4, 2, 0.25) and old.resident_experts is None
    assert resident_experts(default_model_path(), SimpleNamespace(policy=old)) == 2
    new = read_policy('{"batch": 4, "micro_batch": 2, "resident_experts": 9}')
    assert resident_experts(default_model_path(), SimpleNamespace(policy=new)) == (3, 2, 2, 2)
    both = read_policy('{"policy": {"batch": 4, "micro_batch": 2, "resident_share": 0.25, "attention": "cpu", '
                       '"resident_experts": 8}}')
    assert resident_experts(default_model_path(), SimpleNamespace(policy=both)) == 2
    with pytest.raises(MoekitError, match="missing resident_share or resident_experts"):
        read_policy('{"batch": 4, "micro_batch": 2}')
    with pytest.raises(MoekitError, match="resident_experts must be a whole count, got 2.5"):
        read_policy('{"batch": 4, "micro_batch": 2, "resident_experts": 2.5}')
    with pytest.raises(MoekitError, match="33 asked, the MoE layers hold 32"):
        resident_experts(default_model_path(), SimpleNamespace(policy=Policy(4, 2, resident_experts=33)))
