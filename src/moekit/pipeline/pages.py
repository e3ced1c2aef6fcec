"""Byte ranges of paged experts and the dense decode of a compressed stack (moekit.pipeline.paged's
helpers): the (slab view, store view) pairs a page copies, cut at expert boundaries where the
slots are wider than a layer's experts; a compressed stack decoded into a dense workspace; the
stored bits per weight of a layout.

Shapes: n experts of a stack, R rows, K columns of a matrix kind.
"""

from __future__ import annotations

import torch

from ..experts.forms import StoredForm, Tensors


def copy_range(dst: torch.Tensor, src: torch.Tensor, a: int, b: int, non_blocking: bool) -> None:
    """Copies elements [a, b) of src [n, ...] (contiguous, its experts flattened end to end) into
    the same elements of dst [n, ...], whose experts are as wide (one flat copy) or wider (packed
    slots sized for the largest layer: the range is cut at expert boundaries, each piece into the
    first elements of its slot)."""
    for d, s in range_views(dst, src, a, b):
        d.copy_(s, non_blocking=non_blocking)


def range_views(dst: torch.Tensor, src: torch.Tensor, a: int, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Returns the (dst view, src view) pairs copy_range copies."""
    n = src.shape[0]
    width = src[0].numel() if n else 0
    if dst[0].numel() == width and dst.is_contiguous():
        return [(dst.reshape(-1)[a:b], src.reshape(-1)[a:b])]
    flat_src, flat_dst = src.reshape(n, width), dst.reshape(n, -1)
    views = []
    for row in range(a // width, -(-b // width)):
        lo, hi = max(a - row * width, 0), min(b - row * width, width)
        if hi > lo:
            views.append((flat_dst[row, lo:hi], flat_src[row, lo:hi]))
    return views


def decode_into(form: StoredForm, kind: str, stack: Tensors, out: torch.Tensor) -> None:
    """Writes the dense matrices `kind` [k, R, K] of a stack of k experts of a compressed form
    (its stored tensors [k, ...] and tables, as form.one gives them for a slice) into `out`:
    the decode kernels write it directly where they run, else the form's decode is copied in."""
    from ..quant import ops
    from ..quant.config import TERNARY_CODE

    cols = form.cols(kind)
    parts = form._parts(kind, stack)  # the kernels' arguments in the form's order (quant.formats)
    if ops.use_kernels(out) and form.name == TERNARY_CODE:
        ops.code_weight_triton(*parts, cols, out.dtype, out=out)
    elif ops.use_kernels(out) and form.bits is not None and not ops.groups_split_words(form.bits, parts[1].shape[-1], cols):
        ops.int_weight_triton(*parts, form.bits, cols, out.dtype, out=out)
    else:
        out.copy_(form.weight(kind, stack, out.dtype))


def bits_per_weight(layout, form: StoredForm) -> float:
    """Returns the stored bits per expert weight of a layout's experts: bytes one expert moves (its
    layer's average, packing included; tables left out) over its 3 * D * I weights."""
    per_expert = sum(layout.layer_bytes(layer) for layer in layout.moe_layers) / max(1, len(layout.moe_layers))
    return 8 * per_expert / (3 * form.hidden * form.ffn)
