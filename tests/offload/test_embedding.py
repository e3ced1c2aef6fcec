"""The input embedding table in page-locked host memory: the in-place row gather equals a plain
lookup (under the Triton interpreter here, on the GPU for real), and an offloaded model keeps
its outputs with the table moved (GPU)."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.experts.triton_ops import triton_usable
from moekit.offload import OffloadConfig, load_offloaded
from moekit.offload.embedding import HostEmbedding

from conftest import token_ids


@pytest.mark.skipif(not triton_usable(torch.empty(0)), reason="needs TRITON_INTERPRET=1 (or CUDA: test below)")
def test_row_gather_equals_lookup():
    weight = torch.randn(50, 1500, generator=torch.Generator().manual_seed(0))  # two column blocks
    embed = HostEmbedding(weight, torch.device("cpu"))
    ids = torch.tensor([[3, 49, 0], [7, 7, 12]])
    assert torch.equal(embed(ids), torch.nn.functional.embedding(ids, weight))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_model_reads_its_embedding_from_host_memory(tiny):
    ckpt = tiny("olmoe")  # untied embeddings
    resident = moekit.load_model(ckpt.path, device="cuda", dtype="float32")
    model = load_offloaded(ckpt.path, device="cuda", dtype="float32", offload=OffloadConfig(predictor="none"))
    assert isinstance(model.embed, HostEmbedding) and not model.embed.weight.is_cuda
    assert model.offload.plan.host_embedding_bytes == model.embed.weight.numel() * 4
    ids = token_ids(1, 6)
    want = resident.generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=()), want)
