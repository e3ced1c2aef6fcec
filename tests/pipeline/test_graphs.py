"""CGOPipe's tasks through moekit.pipeline.graphs: on the CPU every part runs eagerly through the
graphs' bookkeeping (the paged runtime's begin_call / external_call / end_call around the part)
and gives the tokens of moekit.generate; on a GPU (marked gpu) the captured graphs give the
tokens of the eager engine, every key captured, none left eager."""

from __future__ import annotations

import pytest
import torch

from moekit.generate import generate_ragged
from moekit.load import load_model
from moekit.pipeline.cgopipe import PipelinedDecoder, generate_pipelined
from moekit.pipeline.graphs import TaskGraphs, graphs_wanted, stand_in_graphs
from moekit.pipeline.paged import PagedLoader

PROMPTS = [[5, 17, 300, 42, 9, 11, 7], [1000, 3], [77] * 20, [8, 9, 10, 11, 12], [2048, 1, 4095, 31]]


def test_graphs_are_on_for_cuda_unless_the_environment_or_the_caller_says_otherwise(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("MOEKIT_PIPELINE_GRAPHS", raising=False)
    assert graphs_wanted(cuda, None) and not graphs_wanted(cpu, None)
    assert not graphs_wanted(cuda, False) and graphs_wanted(cpu, True)
    monkeypatch.setenv("MOEKIT_PIPELINE_GRAPHS", "0")
    assert not graphs_wanted(cuda, None) and graphs_wanted(cuda, True)


@pytest.mark.parametrize("resident", [None, 3])
def test_graph_bookkeeping_on_the_cpu_gives_the_tokens_of_generate(resident):
    experts = None if resident is None else PagedLoader(resident=resident)
    model = load_model(device="cpu", dtype="float32", experts=experts)
    expected = generate_ragged(model, PROMPTS, max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    runtime = model.expert_runtime
    pages, whole = (runtime.pages_loaded, runtime.whole_loads) if resident is not None else (0, 0)
    got = generate_pipelined(model, PROMPTS, max_new_tokens=6, micro_batch=2, graphs=True)
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    graphs = model._pipeline_graphs
    assert isinstance(graphs, TaskGraphs) and not graphs.capturable and graphs.replays == 0
    layers = model.config.num_layers
    assert {k[0] for k in graphs.seen} == {"pre", "post"} and len([k for k in graphs.seen if k[0] == "pre"]) == 2 * layers
    if resident is not None:
        # pages arrive with the micro-batches: no layer loaded whole at its call but the prefill's
        assert runtime.pages_loaded > pages and runtime.whole_loads - whole <= len(runtime.layers)


@pytest.mark.parametrize("resident", [None, 2])
def test_replays_give_the_tokens_of_generate(resident, monkeypatch):
    """The replay plumbing on the CPU (static inputs copied in, outputs copied into the micro-batch's
    buffers, one graph per part/layer/size/buffer half, the paged bookkeeping around PostAttn) with
    a stand-in graph that re-runs the captured part: the tokens of moekit.generate."""

    experts = None if resident is None else PagedLoader(resident=resident)
    model = load_model(device="cpu", dtype="float32", experts=experts)
    expected = generate_ragged(model, PROMPTS, max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    graphs = stand_in_graphs(model, monkeypatch.setattr)
    got = generate_pipelined(model, PROMPTS, max_new_tokens=6, micro_batch=2, graphs=True)
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    layers = model.config.num_layers
    assert graphs.failed == {} and graphs.replays > 0
    assert len([k for k in graphs.graphs if k[0] == "pre"]) == 2 * layers  # micro-batches of 2 and of 1
    if resident is not None:  # a paged layer's graph per buffer half its experts were in
        assert {k[3] for k in graphs.graphs if k[0] == "post"} <= {0, 1}


def test_eager_decoder_has_no_graphs_on_the_cpu():
    from moekit.kv_cache import PagedKVCache

    model = load_model(device="cpu", dtype="float32")
    decoder = PipelinedDecoder(model, PagedKVCache(model.config, 4, 16, "cpu", torch.float32), 2)
    assert decoder.graphs is None
    decoder.close()


@pytest.mark.gpu
@pytest.mark.parametrize("resident,micro_batch", [(None, 2), (3, 2), (0, 5)])
def test_cuda_graphs_give_the_eager_tokens(resident, micro_batch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    experts = None if resident is None else PagedLoader(resident=resident)
    model = load_model(device="cuda", dtype="float32", experts=experts)
    eager = generate_pipelined(model, PROMPTS, max_new_tokens=8, micro_batch=micro_batch, graphs=False)
    graphed = generate_pipelined(model, PROMPTS, max_new_tokens=8, micro_batch=micro_batch, graphs=True)
    report = model._pipeline_graphs.report()
    print(f"CUDA graphs (resident {resident}, micro-batch {micro_batch}): {report}")
    assert report["failed"] == {} and report["captured"] > 0 and report["replays"] > 0
    assert [g.tolist() for g in graphed] == [e.tolist() for e in eager]
    torch.cuda.synchronize()
