"""The hierarchical roofline picture of a plan (`moekit plan --plot FILE.svg`), as MoE-Lightning draws it.

Log-log axes: operational intensity (FLOPs per byte moved) against attainable FLOP/s. Roofs, each
min(peak FLOP/s, intensity x bandwidth) of one level of the machine:
  GPU from HBM          the GPU's GEMM peak and its memory
  GPU from host memory  the same peak fed over PCIe (pinned host-to-device copies)
  CPU from host memory  the host cores' peak and their memory
Points, for one decode layer of the plan at the workload's mean context:
  experts (PCIe)   the routed experts' FLOPs of the batch over the bytes streamed in a layer
  experts (HBM)    the same FLOPs over the bytes the expert kernels read on the device
  attention        the attention FLOPs over the KV bytes read, on the CPU or the GPU as planned
each at the FLOP/s the plan predicts for it (its FLOPs over the layer's predicted time), so a point's
distance below its roof is the share of that level the policy leaves unused.
Plain SVG text, no plotting library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .costs import ModelCosts
from .hrm import Plan, Workload, streamed_bytes
from .machine import Machine

WIDTH, HEIGHT = 760, 500
LEFT, RIGHT, TOP, BOTTOM = 80, 190, 30, 60  # margins: the roofs' labels go on the right
X_DECADES = (-2, 4)  # 0.01 .. 10,000 FLOPs per byte
COLOURS = {"GPU from HBM": "#1f77b4", "GPU from host memory": "#d62728", "CPU from host memory": "#2ca02c"}


@dataclass(frozen=True)
class Roof:
    name: str
    peak_flops: float
    bandwidth: float

    def at(self, intensity: float) -> float:
        """Returns the attainable FLOP/s at `intensity` FLOPs per byte."""
        return min(self.peak_flops, intensity * self.bandwidth)


@dataclass(frozen=True)
class Point:
    name: str
    roof: str  # the roof it is bound by
    intensity: float  # FLOPs per byte
    flops: float  # FLOP/s the plan predicts


def roofs(machine: Machine) -> list[Roof]:
    """Returns the machine's roofs whose levels are known."""
    out = []
    for name, peak, bandwidth in (("GPU from HBM", machine.gpu_flops, machine.gpu_bandwidth),
                                  ("GPU from host memory", machine.gpu_flops, machine.h2d_bandwidth),
                                  ("CPU from host memory", machine.host_flops, machine.host_bandwidth)):
        if peak and bandwidth:
            out.append(Roof(name, peak, bandwidth))
    return out


def points(costs: ModelCosts, plan: Plan, workload: Workload) -> list[Point]:
    """Returns the plan's decode-layer operations placed on the roofs (none with zero FLOPs or bytes)."""
    p, layer_s = plan.policy, plan.layer.time
    expert_flops = p.batch * costs.top_k * costs.expert_flops * costs.moe_fraction
    streamed = streamed_bytes(costs, p)  # an average layer's
    read = p.micro_batches * costs.touched(p.micro_batch) * costs.expert_bytes * costs.moe_fraction
    positions = costs.attended(workload.mean_context)
    attn_flops = p.batch * positions * costs.attention_flops_per_position
    kv_bytes = p.batch * positions * costs.kv_bytes_per_token
    where = "CPU from host memory" if p.attention == "cpu" else "GPU from HBM"
    out = []
    for name, roof, flops, nbytes in (("experts (PCIe)", "GPU from host memory", expert_flops, streamed),
                                      ("experts (HBM)", "GPU from HBM", expert_flops, read),
                                      (f"attention ({p.attention.upper()})", where, attn_flops, kv_bytes)):
        if flops > 0 and nbytes > 0 and layer_s > 0:
            out.append(Point(name, roof, flops / nbytes, flops / layer_s))
    return out


def render(machine: Machine, costs: ModelCosts, plan: Plan, workload: Workload, title: str) -> str:
    """Returns the SVG text of the plan's roofline picture."""
    lines, marks = roofs(machine), points(costs, plan, workload)
    if not lines:
        return _svg([_text(WIDTH / 2, HEIGHT / 2, "no machine levels known: nothing to draw", anchor="middle")])
    top = math.ceil(math.log10(max(r.peak_flops for r in lines)))
    low = min([math.log10(r.at(10 ** X_DECADES[0])) for r in lines] + [math.log10(m.flops) for m in marks])
    y_decades = (math.floor(low), top)

    def x_of(intensity: float) -> float:
        span = X_DECADES[1] - X_DECADES[0]
        return LEFT + (math.log10(intensity) - X_DECADES[0]) / span * (WIDTH - LEFT - RIGHT)

    def y_of(flops: float) -> float:
        span = y_decades[1] - y_decades[0]
        return HEIGHT - BOTTOM - (math.log10(flops) - y_decades[0]) / span * (HEIGHT - TOP - BOTTOM)

    parts = [(f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
              'fill="none" stroke="#888"/>'), _text(WIDTH / 2 - RIGHT / 2 + LEFT / 2, 18, title, anchor="middle")]
    for d in range(X_DECADES[0], X_DECADES[1] + 1):
        x = x_of(10.0 ** d)
        parts += [f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM}" stroke="#eee"/>',
                  _text(x, HEIGHT - BOTTOM + 16, f"1e{d}", anchor="middle")]
    for d in range(y_decades[0], y_decades[1] + 1):
        y = y_of(10.0 ** d)
        parts += [f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#eee"/>',
                  _text(LEFT - 6, y + 4, f"1e{d}", anchor="end")]
    parts += [_text(WIDTH / 2 - RIGHT / 2 + LEFT / 2, HEIGHT - 18, "operational intensity (FLOPs / byte)",
                    anchor="middle"),
              (f'<text x="18" y="{HEIGHT / 2}" font-size="12" transform="rotate(-90 18 {HEIGHT / 2})" '
               'text-anchor="middle">attainable FLOP/s</text>')]
    for roof in lines:
        knee = roof.peak_flops / roof.bandwidth
        xs = [10.0 ** X_DECADES[0]] + ([knee] if 10.0 ** X_DECADES[0] < knee < 10.0 ** X_DECADES[1] else []) + \
             [10.0 ** X_DECADES[1]]
        path = " ".join(f"{x_of(i):.1f},{y_of(roof.at(i)):.1f}" for i in xs)
        colour = COLOURS[roof.name]
        parts += [(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"><title>{roof.name}: '
                   f'{roof.peak_flops / 1e12:.2f} TFLOP/s, {roof.bandwidth / 1e9:.1f} GB/s</title></polyline>'),
                  _text(WIDTH - RIGHT + 6, y_of(roof.at(10.0 ** X_DECADES[1])) + 4, roof.name, fill=colour)]
    for i, mark in enumerate(marks):
        x, y = x_of(min(max(mark.intensity, 10.0 ** X_DECADES[0]), 10.0 ** X_DECADES[1])), y_of(mark.flops)
        colour = COLOURS[mark.roof]
        parts += [(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"><title>{mark.name}: '
                   f'{mark.intensity:.3g} FLOPs/byte, {mark.flops / 1e12:.3g} TFLOP/s</title></circle>'),
                  _text(x + 8, y - 6 - 12 * (i % 2), mark.name, fill=colour)]
    return _svg(parts)


def _text(x: float, y: float, text: str, anchor: str = "start", fill: str = "#222") -> str:
    safe = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="12" fill="{fill}" text-anchor="{anchor}">{safe}</text>'


def _svg(parts: list[str]) -> str:
    body = "\n".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">\n{body}\n</svg>\n')
