"""The expert seam: where expert weights live and in which form.

An MoE block routes tokens, then calls its expert source with the tokens and their routing;
the model never knows whether experts are resident, offloaded or paged, dense or compressed.
Every source is an ``nn.Module`` with

    forward(x [N, D], expert_ids [N, A], weights [N, A]) -> [N, D]

computing sum_a weights[n, a] * expert_{expert_ids[n, a]}(x[n]). How an expert is stored and how
it multiplies is its stored form's (experts.forms; quant.formats adds the compressed forms):
sources only hold stacked tensors and call the form. A model whose sources share a runtime (an
offloaded model) exposes it as `model.expert_runtime` (experts.runtime: what the engines may
ask of it).
"""

from .forms import DenseForm, StoredForm
from .resident import ResidentExperts
from .routing import group_by_expert

__all__ = ["DenseForm", "ResidentExperts", "StoredForm", "group_by_expert"]
