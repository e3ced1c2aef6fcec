"""The expert seam: where expert weights live and in which form.

An MoE block routes tokens, then calls its expert source with the tokens and their routing;
the model never knows whether experts are resident, offloaded or paged, dense or compressed.
Every source is an ``nn.Module`` with

    forward(x [N, D], expert_ids [N, A], weights [N, A]) -> [N, D]

computing sum_a weights[n, a] * expert_{expert_ids[n, a]}(x[n]).
"""

from .resident import ResidentExperts
from .routing import group_by_expert

__all__ = ["ResidentExperts", "group_by_expert"]
