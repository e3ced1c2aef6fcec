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

from moekit import fused, sinks
from moekit.kv_cache import KVCache
from test_fused_sinks import _layer as layer  # the tests' layer: random weights, sinks of either sign

VARIANTS = {
    "kernel": {},
    "upcast": {"UPCAST": True, "DOT_PRECISION": "ieee"},
    "tile16": {"BLOCK_S": 16},
    "warps1": {"num_warps": 1},
    "stages1": {"num_stages": 1},
    "dhpad2x": {"DH_PAD": 0},  # twice the head dim's padding
}


def model_mode(device: torch.device) -> None:
    """The tiny gpt-oss model of tests/test_fused.py decoding 4 steps after a 6-token prompt with the
    kernel on: every fused_decode call is checked against sink_attention over a copy of the cache
    written by hand (so a wrong kernel and a wrong reference path of the model are told apart)."""
    import tempfile

    from conftest import build_hf_model, token_ids

    import moekit
    from moekit.kv_cache import KVCache as Cache

    root = Path(tempfile.mkdtemp())
    build_hf_model("gpt_oss").save_pretrained(root)
    model = moekit.load_model(root).to(device, torch.bfloat16)
    real = sinks.fused_decode

    def spy(q, k, v, sk, keys, values, start, window, store=True, splits=None):
        kc, vc = keys.clone(), values.clone()
        out = real(q, k, v, sk, keys, values, start, window, store, splits)
        st, t = int(start), q.shape[2]
        kc[:, :, st:st + t], vc[:, :, st:st + t] = k, v
        pos = torch.arange(kc.shape[2], device=q.device)[None]
        qpos = st + torch.arange(t, device=q.device)[:, None]
        mask = (pos <= qpos) & ((pos > qpos - window) if window is not None else True)
        ref = sinks.sink_attention(q, kc, vc, sk, mask).transpose(1, 2).reshape(out.shape)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"call start={st} t={t} window={window} S={kc.shape[2]} q{tuple(q.stride())} k{tuple(k.stride())} "
              f"cache_equal={torch.equal(kc, keys) and torch.equal(vc, values)} err={err:.4f} "
              f"|q|max={q.float().abs().max().item():.2f} |k|max={k.float().abs().max().item():.2f}", flush=True)
        return out

    sinks.fused_decode = spy
    prompt = token_ids(1, 6).to(device)
    for flag in ("0", "1"):
        os.environ["MOEKIT_FUSED"] = flag
        cache = Cache(model.config, 1, 10, device, torch.bfloat16)
        outs = []
        with torch.inference_mode():
            logits = model(prompt, cache=cache, start=0, last_only=True)
            for i in range(4):
                tok = torch.tensor([[int(logits[0, -1].argmax()) if flag == "0" else fed[i]]], device=device)
                outs.append(tok.item())
                logits = model(tok, cache=cache, start=torch.tensor(6 + i, device=device))
                print(f"MOEKIT_FUSED={flag} step {i}: logits[:4] {logits[0, -1, :4].float().tolist()}", flush=True)
        fed = outs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--model", action="store_true", help="the tiny gpt-oss model, every kernel call checked")
    args = p.parse_args()
    if args.model:
        fused.ALLOW_INTERPRETER = True
        model_mode(torch.device(args.device))
        return
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
