"""Locates the windowed sinks-decode defect seen on the H200 (tiny gpt-oss: head dim 8, window 5, a cache
exactly as long as the context; bf16 off ~8-12% at steps whose window starts at an odd position).

    PYTHONPATH=src python3 benchmarks/probes/diag_sink_window.py            # H200, ~20 s
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/probes/diag_sink_window.py --device cpu

For each (head dim, cached positions, capacity = cached + 1 or + 4) it prints the relative error of
fused_decode against SinkAttention's reference, under the kernel's own launch and under variants of it
(float32 dots, 16-position tiles, one warp, one stage, the window off), so the column that stays clean
names the cause.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from moekit import fused, sinks  # noqa: E402
from moekit.config import ModelConfig  # noqa: E402
from moekit.kv_cache import KVCache  # noqa: E402
from moekit.model import SinkAttention  # noqa: E402

VARIANTS = {
    "kernel": {},
    "upcast": {"UPCAST": True, "DOT_PRECISION": "ieee"},
    "tile16": {"BLOCK_S": 16},
    "warps1": {"num_warps": 1},
    "stages1": {"num_stages": 1},
    "dhpad2x": {"DH_PAD": 0},  # twice the head dim's padding
}


def layer(heads, kv_heads, head_dim, window, dtype, device):
    cfg = ModelConfig(family="gpt_oss", vocab_size=64, hidden_size=32, num_layers=1, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, num_experts=2, top_k=1, expert_ffn=8,
                      moe_layers=(True,), qkv_bias=True, o_bias=True, sliding_window=window, attention_sinks=True)
    attn = SinkAttention(cfg, 0)
    g = torch.Generator().manual_seed(heads * head_dim + (window or 0))
    with torch.no_grad():
        attn.sinks.copy_(3 * torch.randn(heads, generator=g))
    return attn.to(device, dtype)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--window", type=int, default=5)
    args = p.parse_args()
    fused.ALLOW_INTERPRETER = True
    sinks.PLAIN_DECODE_WINDOWED = True
    device, dtype = torch.device(args.device), torch.bfloat16
    real_launch = sinks.sink_launch
    print("dh cached cap | " + " ".join(f"{v:>8}" for v in VARIANTS) + " | nowindow")
    for dh in (8, 16, 64):
        attn = layer(4, 2, dh, args.window, dtype, device)
        whole = layer(4, 2, dh, None, dtype, device)  # the same sinks, no window
        with torch.no_grad():
            whole.sinks.copy_(attn.sinks)
        cfg = attn.cfg
        for cached in range(4, 14):
            for extra in (1, 4):
                g = torch.Generator().manual_seed(11)
                q = torch.randn(1, 1, 4, dh, generator=g).to(device, dtype).transpose(1, 2)
                k, v = (torch.randn(1, 1, 2, dh, generator=g).to(device, dtype).transpose(1, 2) for _ in range(2))
                start = torch.tensor(cached, device=device)

                def cache():
                    c = KVCache(cfg, 1, cached + extra, device, dtype)
                    gg = torch.Generator().manual_seed(7)
                    c.keys[0][:, :, :cached] = torch.randn(1, 2, cached, dh, generator=gg).to(device, dtype)
                    c.values[0][:, :, :cached] = torch.randn(1, 2, cached, dh, generator=gg).to(device, dtype)
                    return c

                os.environ["MOEKIT_FUSED"] = "0"
                with torch.inference_mode():
                    ref = attn.attend(q, k, v, cache(), start).float()
                os.environ["MOEKIT_FUSED"] = "1"
                errs = []
                for over in VARIANTS.values():
                    def launch(*a, _o=over, **kw):
                        d = {**real_launch(*a, **kw), **_o}
                        if "DH_PAD" in _o:
                            d["DH_PAD"] = 2 * real_launch(*a, **kw)["DH_PAD"]
                        return d
                    sinks.sink_launch = launch
                    try:
                        with torch.inference_mode():
                            got = attn.attend(q, k, v, cache(), start).float()
                        errs.append(f"{((got - ref).norm() / ref.norm()).item():8.4f}")
                    except Exception as e:  # a variant the compiler refuses
                        errs.append(f"{type(e).__name__[:8]:>8}")
                    finally:
                        sinks.sink_launch = real_launch
                # window off in both: is it the window at all?
                os.environ["MOEKIT_FUSED"] = "0"
                with torch.inference_mode():
                    ref2 = whole.attend(q, k, v, cache(), start).float()
                os.environ["MOEKIT_FUSED"] = "1"
                with torch.inference_mode():
                    got2 = whole.attend(q, k, v, cache(), start).float()
                print(f"{dh:2d} {cached:6d} {cached + extra:3d} | " + " ".join(errs)
                      + f" | {((got2 - ref2).norm() / ref2.norm()).item():8.4f}", flush=True)


if __name__ == "__main__":
    main()
