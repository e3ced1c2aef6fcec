"""`moekit plan`: the chosen policy, its throughput and bound as a table and as JSON, for the
bundled model and for a config.json alone; bad input gets one clear line."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main

MIXTRAL_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}


@pytest.fixture
def mixtral_dir(tmp_path):
    d = tmp_path / "mixtral-8x7b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(MIXTRAL_CONFIG))
    return d


def test_plan_json_for_a_config_only_model(mixtral_dir, capsys):
    assert main(["plan", str(mixtral_dir), "--machine", "h200", "--device-memory", "16GiB",
                 "--host-memory", "131.4GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = out["plan"]
    assert out["expert_bytes"] == 3 * 4096 * 14336 * 2
    # not one more expert in every layer (32 x 352 MB), but some over the layers: R of 256, spread
    assert plan["policy"]["attention"] == "cpu" and 0 < plan["policy"]["resident_experts"] < 32
    assert plan["policy"]["resident_share"] == plan["policy"]["resident_experts"] / 256
    assert plan["memory"]["device"] <= 16 * 2**30
    assert out["bound"] == "PCIe host-to-device" and plan["limited_by"] == "host memory"
    assert 700 < plan["decode_tok_s"] * (256 - plan["policy"]["resident_experts"]) / 256 < 950  # every expert streamed
    (gpu,) = out["alternatives"]  # the best with attention on the GPU: the KV cache must fit in 16 GiB
    assert gpu["policy"]["attention"] == "gpu" and gpu["tok_s"] < plan["tok_s"]


def test_plan_table_and_expert_bits(mixtral_dir, capsys):
    assert main(["plan", str(mixtral_dir), "--machine", "h200", "--device-memory", "16GiB",
                 "--host-memory", "131.4GB", "--gen-len", "32"]) == 0
    text = capsys.readouterr().out
    for row in ("policy", "throughput", "bound by", "batch limited by", "PCIe host-to-device", "attention on the GPU"):
        assert row in text
    assert " of 256 experts resident (1 in " in text  # R spread: some layers hold one, the rest none
    assert main(["plan", str(mixtral_dir), "--machine", "h200", "--device-memory", "16GiB",
                 "--host-memory", "131.4GB", "--expert-bits", "4", "--json"]) == 0
    four_bit = json.loads(capsys.readouterr().out)
    assert four_bit["expert_bytes"] == 3 * 4096 * 14336 // 2
    assert four_bit["plan"]["tok_s"] > 3 * 700  # a quarter of the bytes over PCIe, more KV room


def test_plan_counts_a_stored_forms_bytes_and_kernels(mixtral_dir, capsys):
    """Ternary-code experts (0.6 bits a weight, as RTN gives Mixtral's): ~27x fewer bytes over PCIe,
    so a larger batch (~3x); PCIe no longer bounds the step (their kernels or the host's CPU
    attention do, depending on the decode costs the HRM is given), and the plan generates > 2x the
    bf16 plan's tokens per second (32 layers, gen 128)."""
    base = ["plan", str(mixtral_dir), "--machine", "h200", "--device-memory", "16GiB", "--host-memory", "131.4GB",
            "--json"]
    assert main(base) == 0
    dense = json.loads(capsys.readouterr().out)
    assert dense["expert_form"] == "dense" and dense["bits_per_weight"] == 16
    assert main(base + ["--expert-bits", "0.6", "--expert-form", "ternary_code"]) == 0
    ternary = json.loads(capsys.readouterr().out)
    assert ternary["expert_form"] == "ternary_code" and ternary["bits_per_weight"] == pytest.approx(0.6)
    assert dense["bound"] == "PCIe host-to-device" and ternary["bound"] != dense["bound"]
    assert ternary["plan"]["layer"]["h2d"] < dense["plan"]["layer"]["h2d"] / 10
    assert ternary["plan"]["policy"]["batch"] > 2 * dense["plan"]["policy"]["batch"]
    assert ternary["plan"]["tok_s"] > 2 * dense["plan"]["tok_s"]
    # the same bytes as if they multiplied like dense ones: the kernels' cost is what bounds it
    assert main(base + ["--expert-bits", "0.6", "--expert-form", "dense"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["tok_s"] > ternary["plan"]["tok_s"]


def test_plan_reads_a_compressed_checkpoints_form(tiny, tmp_path, capsys):
    from moekit.quant.compress import compress
    from moekit.quant.config import QuantConfig

    path = tmp_path / "int4"
    compress(tiny("mixtral").path, path, QuantConfig(bits="4", group_size=16, method="rtn"), progress=False)
    assert main(["plan", str(path), "--machine", "h200", "--json", "--num-prompts", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["expert_form"] == "int4" and 5.0 < out["bits_per_weight"] < 6.0  # codes + fp16 scale, uint8 zero per 16


def test_plan_bundled_model_reads_its_stored_bytes(capsys):
    assert main(["plan", "--machine", "h200", "--json", "--num-prompts", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["expert_bytes"] == 3 * 384 * 112 * 2  # the tiny model's bf16 experts, from its safetensors headers
    assert out["plan"]["policy"]["batch"] <= 64


@pytest.mark.parametrize("argv,message", [
    (["--gen-len", "0"], "--gen-len must be >= 1"),
    (["--prompt-len", "-3"], "--prompt-len must be >= 1"),
    (["--device-memory", "lots"], "--device-memory: cannot read size 'lots'"),
    (["--host-memory", "0"], "--host-memory must be > 0"),
    (["--expert-bits", "0"], "--expert-bits must be in"),
    (["--machine", "nowhere.json"], "neither a preset"),
    (["--device-memory", "1GB"], "no policy fits"),
    (["--device-memory", "200GB"], "more than machine 'h200' has"),
])
def test_plan_bad_input_is_one_line(mixtral_dir, capsys, argv, message):
    args = ["plan", str(mixtral_dir)] + (argv if "--machine" in argv else ["--machine", "h200", *argv])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_plan_without_gpu_levels_says_how_to_give_them(mixtral_dir, tmp_path, capsys, monkeypatch):
    from moekit.pipeline import machine as mm

    monkeypatch.setattr(mm, "this_machine", lambda refresh=False: mm.Machine(
        name="laptop", host_flops=1e11, host_bandwidth=2e10, host_memory=256 * 2**30))
    assert main(["plan", str(mixtral_dir)]) == 2
    assert "lacks gpu_flops" in capsys.readouterr().err
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"gpu_flops": 1e14, "gpu_bandwidth": 3e11, "gpu_memory": 24 * 2**30,
                               "h2d_bandwidth": 1.6e10, "d2h_bandwidth": 1.6e10}))
    assert main(["plan", str(mixtral_dir), "--machine", str(gpu), "--host-memory", "200GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["machine"]["name"] == "gpu" and out["machine"]["host_bandwidth"] == 2e10


def test_plot_draws_the_roofs_and_the_plan_under_them(mixtral_dir, tmp_path, capsys):
    """--plot writes an SVG: one roof per machine level, the plan's experts and attention as points,
    each at or under its own roof (the HRM predicts no level faster than its peak)."""
    import math
    import xml.etree.ElementTree as ET

    from moekit.pipeline.roofline import Roof

    out = tmp_path / "roofline.svg"
    assert main(["plan", str(mixtral_dir), "--machine", "h200", "--device-memory", "16GiB",
                 "--host-memory", "131.4GB", "--plot", str(out)]) == 0
    svg = ET.fromstring(out.read_text())
    ns = {"s": "http://www.w3.org/2000/svg"}
    roof_titles = [p.find("s:title", ns).text for p in svg.findall("s:polyline", ns)]
    assert [t.split(":")[0] for t in roof_titles] == ["GPU from HBM", "GPU from host memory", "CPU from host memory"]
    marks = {c.find("s:title", ns).text.split(":")[0]: c for c in svg.findall("s:circle", ns)}
    assert set(marks) == {"experts (PCIe)", "experts (HBM)", "attention (CPU)"}
    by_name = {}  # each roof as the picture states it: "NAME: X TFLOP/s, Y GB/s"
    for t in roof_titles:
        name, levels = t.split(": ")
        peak, bandwidth = (float(v.split()[0]) for v in levels.split(", "))
        by_name[name] = Roof(name, peak * 1e12, bandwidth * 1e9)
    for name, roof in (("experts (PCIe)", "GPU from host memory"), ("experts (HBM)", "GPU from HBM"),
                       ("attention (CPU)", "CPU from host memory")):
        intensity, flops = (float(v.split()[0]) for v in marks[name].find("s:title", ns).text.split(": ")[1].split(", "))
        assert flops * 1e12 <= by_name[roof].at(intensity) * 1.001, (name, intensity, flops)
        assert math.isfinite(intensity) and intensity > 0
    assert not list(tmp_path.glob(".roofline.svg.tmp-*"))


def test_plot_refuses_a_path_it_cannot_write(mixtral_dir, tmp_path, capsys):
    for bad in (tmp_path / "roofline.png", tmp_path / "missing" / "roofline.svg"):
        assert main(["plan", str(mixtral_dir), "--machine", "h200", "--plot", str(bad)]) == 2
        assert not bad.exists()
        assert "--plot" in capsys.readouterr().err


def test_plan_on_this_machine_holds_the_host_memory_available_now(mixtral_dir, capsys, monkeypatch):
    """Without --machine or --host-memory the plan holds what this host has available now less a
    reserve, not 80% of its memory: on the H200's 135 GB host 80% capped Mixtral's 32 bf16 layers at
    N=512, where the KV of ~1000 sequences fit beside the 93 GB of weights."""
    from moekit.pipeline import cli as plan_cli
    from moekit.pipeline import machine as machine_mod

    h200 = machine_mod.PRESETS["h200"]
    monkeypatch.setattr(plan_cli, "resolve_machine", lambda args: h200)
    free = int(125e9)
    monkeypatch.setattr(machine_mod, "free_host_budget", lambda held=0: free)
    args = ["plan", str(mixtral_dir), "--device-memory", "16GiB", "--num-prompts", "2048", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["host_budget"] == free and out["host_budget_from"] == "the memory available now less a reserve"
    assert out["plan"]["memory"]["host"] <= free and out["plan"]["limited_by"] == "host memory"
    assert out["plan"]["policy"]["batch"] > 512  # the KV room beside the weights
    assert main([*args, "--host-memory", "100GB"]) == 0  # the flag wins
    given = json.loads(capsys.readouterr().out)
    assert given["host_budget"] == 100e9 and given["plan"]["memory"]["host"] <= 100e9
    assert given["plan"]["policy"]["batch"] < out["plan"]["policy"]["batch"]
    monkeypatch.setattr(machine_mod, "free_host_budget", lambda held=0: None)  # no /proc/meminfo
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["host_budget_from"] == "80% of the machine's"
