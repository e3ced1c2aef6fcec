"""Train moekit's bundled tiny MoE: a mixtral-family model on the Python standard library's source.

    PYTHONPATH=src python3 examples/train_tiny.py --out examples/tiny-moe --device cuda --max-minutes 5
    python examples/train_tiny.py --out /tmp/tiny --device cpu --steps 30 --max-files 200 --batch 8 --seqlen 256

The corpus is the .py source of the running interpreter's standard library (files over 200 KB
and files that are not UTF-8 left out), sorted by relative path. About 3% of the files
(sha1(relative path) % 32 == 0) are held out: neither the tokenizer nor training sees them.
The output directory holds the bf16 weights, config, tokenizer, a model card (README.md) and
the loss curve (train_log.json): 8 files, at most 16 MB together.

The defaults come from a sweep on the H200 (python 3.12 stdlib: 2.7M training tokens, so the
data, not the time, is the limit; held-out perplexity after training): at ~7.4M parameters a
wide model with narrow experts generalises best (hidden 256/320/384 with 4 layers: 13.4 / 12.2 /
11.6; 320 x 6 layers: 12.5), about 7 epochs beat 9 (11.2 vs 11.6) and 15 over-fit (18.6),
batch 32 beat 64 for the same tokens, and weight decay 0.3 beat 0.1 (10.9 vs 11.6).

Everything follows from --seed (corpus order, tokenizer, initial weights, batch order); what
does not: the step at which --max-minutes stops, and the rounding order of some GPU kernels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moekit import load_model, load_tokenizer
from moekit.config import ModelConfig, RopeConfig
from moekit.model import MoEModel
from moekit.save import save_model
from moekit.train import evaluate_perplexity, init_weights, print_log, train

EOS = "<|endoftext|>"  # end of document: separates files in the token stream, stops generation
SIZE_CAP_BYTES = 16_000_000  # weights (bf16) + tokenizer files
MAX_FILE_BYTES = 200_000
HELD_OUT_MODULUS = 32  # a file is held out when sha1(relative path) % 32 == 0 (~3%)
EVAL_RESERVE_S = 45.0  # of --max-minutes, kept for saving, evaluation and samples
AUX_LOSS_COEF = 0.01
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n", "    def __init__(self, "]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output model directory (replaced if it holds an earlier run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps (at most)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget of the whole run; training stops early to fit, then saves")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files (quick tests)")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seqlen", type=int, default=512, help="tokens the model reads per sequence")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.3)
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps (at most a tenth of --steps)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=384, help="head dim 32: hidden/32 query heads")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--expert-ffn", type=int, default=112)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=300, help="held-out perplexity every N steps (on a sample)")
    return p.parse_args()


def python_paths(root: Path, skip_dirs: tuple[str, ...] = ("site-packages", "dist-packages", "__pycache__")) -> list[Path]:
    """Returns the .py files under root of at most MAX_FILE_BYTES, sorted by path relative to root
    (folders named in skip_dirs are not entered)."""
    paths = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip_dirs]
        paths += [Path(folder) / n for n in names if n.endswith(".py")]
    return [q for q in sorted(paths, key=lambda q: q.relative_to(root).as_posix())
            if q.is_file() and q.stat().st_size <= MAX_FILE_BYTES]


def read_source(path: Path) -> str | None:
    """Returns the file's text, or None when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def stdlib_files(max_files: int | None) -> tuple[Path, list[tuple[str, str]]]:
    """Returns (stdlib root, [(relative path, text)]) of the interpreter's stdlib .py files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in python_paths(root):
        text = read_source(path)
        if text is not None:
            files.append((path.relative_to(root).as_posix(), text))
    if not files:
        sys.exit(f"no .py files found under {root}; this interpreter ships without its stdlib source")
    return root, files[:max_files] if max_files else files


def is_held_out(relpath: str) -> bool:
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Returns a byte-level BPE tokenizer trained on texts, with EOS as its one special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def token_stream(tok: Tokenizer, texts: list[str], eos_id: int) -> torch.Tensor:
    """Returns the token ids [M] of texts, each followed by EOS."""
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    return torch.cat([torch.tensor(e.ids + [eos_id], dtype=torch.long) for e in encodings])


def batches(tokens: torch.Tensor, seqlen: int, batch: int, seed: int, device: torch.device):
    """Yields [batch, seqlen + 1] windows of the stream forever: each epoch starts at a random
    offset and visits every window once in a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    tokens = tokens.to(device)
    span = torch.arange(seqlen + 1, device=device)
    while True:
        offset = int(torch.randint(0, seqlen, (1,), generator=gen))
        count = (tokens.numel() - offset - 1) // seqlen
        if count < batch:
            sys.exit(f"the training stream ({tokens.numel()} tokens) is too short for --batch {batch} "
                     f"x --seqlen {seqlen}; use more files or smaller values")
        starts = offset + torch.randperm(count, generator=gen) * seqlen
        for i in range(0, count - batch + 1, batch):
            yield tokens[starts[i:i + batch].to(device)[:, None] + span]  # [B, seqlen + 1]


def tokenizer_files(tok: Tokenizer, max_length: int) -> dict[str, str]:
    """Returns {file name: content} of tokenizer.json and tokenizer_config.json."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": EOS,
              "unk_token": None, "pad_token": None, "model_max_length": max_length,
              "add_bos_token": False, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def model_config(args: argparse.Namespace, vocab_size: int, eos_id: int) -> ModelConfig:
    heads = args.hidden // 32  # head dim 32, two query heads per key/value head
    return ModelConfig(
        family="mixtral", vocab_size=vocab_size, hidden_size=args.hidden, num_layers=args.layers,
        num_heads=heads, num_kv_heads=max(1, heads // 2), head_dim=32, num_experts=8, top_k=2,
        expert_ffn=args.expert_ffn, moe_layers=(True,) * args.layers, rms_norm_eps=1e-5,
        # declares the positions it is trained on, no more: past its --seqlen windows perplexity climbs
        rope=RopeConfig(theta=10000.0), max_position_embeddings=args.seqlen, tie_word_embeddings=True,
        eos_token_ids=(eos_id,), dtype="bfloat16")


def samples(out: Path, device: torch.device) -> list[str]:
    """Returns greedy continuations of PROMPTS by the saved model, read back from `out`."""
    model, tok = load_model(out, device=device), load_tokenizer(out)
    texts = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        texts.append(prompt + tok.decode(model.generate(ids, max_new_tokens=96)[0].tolist()))
    return texts


def model_card(facts: dict, cfg: ModelConfig, texts: list[str]) -> str:
    """Returns README.md: what the model is, what it was trained on, how well it does."""
    rows = [("family", "mixtral (MixtralForCausalLM layout)"), ("parameters", f"{facts['params']:,}"),
            ("hidden / layers", f"{cfg.hidden_size} / {cfg.num_layers}"),
            ("heads q / kv, head dim", f"{cfg.num_heads} / {cfg.num_kv_heads}, {cfg.head_dim}"),
            ("experts / top-k, expert ffn", f"{cfg.num_experts} / {cfg.top_k}, {cfg.expert_ffn}"),
            ("vocab (byte-level BPE)", str(cfg.vocab_size)), ("context", str(cfg.max_position_embeddings)),
            ("rope theta", f"{cfg.rope.theta:g}"), ("tied embeddings", str(cfg.tie_word_embeddings)),
            ("weights", f"bfloat16, {facts['weight_bytes']:,} bytes")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    shown = "\n\n".join(f"```python\n{t}\n```" for t in texts)
    return f"""# tiny-moe

moekit's bundled toy Mixture-of-Experts model: the default model of every moekit command and
test fixture. It writes Python-looking code and nothing else; it is for exercising the toolkit
(compression, pruning, offload, pipelining), not for use.

| config | value |
|---|---|
{table}

## Data

The `.py` source of the Python {facts['python']} standard library ({facts['stdlib']}), files over 200 KB
and non-UTF-8 files left out, sorted by path. Files with `sha1(relative path) % 32 == 0` are held
out (never seen by the tokenizer or training): {facts['train_files']} training files
({facts['train_tokens']:,} tokens), {facts['held_files']} held-out files ({facts['held_tokens']:,} tokens).
Files are joined with `{EOS}`.

## Training

`{facts['command']}`: {facts['steps']} AdamW steps of {facts['batch']} x {facts['seqlen']}
tokens ({facts['tokens_seen']:,} tokens seen, {facts['epochs']:.1f} epochs), lr {facts['lr']:g} with warm-up and
cosine decay, weight decay {facts['weight_decay']:g}, load-balancing loss x {AUX_LOSS_COEF}, on {facts['device']} in {facts['train_s']:.0f} s
(whole run {facts['wall_s']:.0f} s; stopped by: {facts['stop_reason']}). Loss curve: `train_log.json`.

## Quality (saved bf16 weights)

| split | tokens scored | perplexity |
|---|---|---|
| held-out | {facts['held_scored']:,} | {facts['held_ppl']:.2f} |
| train (first {facts['train_scored']:,} tokens) | {facts['train_scored']:,} | {facts['train_ppl']:.2f} |

## Greedy samples

{shown}
"""


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but this PyTorch sees no CUDA device; use --device cpu")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "train_log.json").exists():
        sys.exit(f"{out}: exists and is not an earlier output of this script; choose another --out")

    root, files = stdlib_files(args.max_files)
    train_files = [(r, t) for r, t in files if not is_held_out(r)]
    held_files = [(r, t) for r, t in files if is_held_out(r)]
    if not held_files:
        sys.exit(f"none of the {len(files)} files is held out; use more files (--max-files)")
    tok = train_tokenizer([t for _, t in train_files], args.vocab)
    eos_id = tok.token_to_id(EOS)
    train_ids = token_stream(tok, [t for _, t in train_files], eos_id)
    held_ids = token_stream(tok, [t for _, t in held_files], eos_id)
    print(f"corpus: {len(train_files)} train files ({train_ids.numel():,} tokens), {len(held_files)} "
          f"held out ({held_ids.numel():,} tokens); tokenizer vocab {tok.get_vocab_size()}; "
          f"{time.perf_counter() - t_start:.0f}s", flush=True)

    cfg = model_config(args, tok.get_vocab_size(), eos_id)
    model = init_weights(MoEModel(cfg), seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    extra = tokenizer_files(tok, cfg.max_position_embeddings)
    total_bytes = 2 * params + sum(len(v.encode()) for v in extra.values())
    print(f"model: {params:,} parameters, {2 * params:,} bytes in bf16, {total_bytes:,} with tokenizer", flush=True)
    if total_bytes > SIZE_CAP_BYTES:
        sys.exit(f"{total_bytes:,} bytes is over the {SIZE_CAP_BYTES:,}-byte cap; lower --hidden, "
                 "--layers or --expert-ffn")

    model.to(device)
    max_seconds = None
    if args.max_minutes is not None:
        max_seconds = args.max_minutes * 60 - (time.perf_counter() - t_start) - EVAL_RESERVE_S
        if max_seconds <= 0:
            sys.exit(f"--max-minutes {args.max_minutes} leaves no time to train; give more")
    held_sample = held_ids[: 128 * args.seqlen + 1]

    def on_log(record: dict) -> None:
        if record["step"] % args.eval_every == 0:  # watch for over-fitting: the data is repeated
            record["held_out_ppl"] = evaluate_perplexity(model, held_sample, args.seqlen, args.batch)[0]
        print_log(record)

    result = train(model, batches(train_ids, args.seqlen, args.batch, args.seed, device), args.steps,
                   args.lr, warmup_steps=min(args.warmup, max(1, args.steps // 10)),
                   weight_decay=args.weight_decay, aux_loss_coef=AUX_LOSS_COEF, log_every=args.log_every, on_log=on_log,
                   max_seconds=max_seconds)
    generation = {"eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}
    save_model(model, out, dtype=torch.bfloat16, generation_config=generation, extra_files=extra, overwrite=True)
    del model

    saved = load_model(out, device=device)
    held_ppl, held_scored = evaluate_perplexity(saved, held_ids, args.seqlen, args.batch)
    train_sample = train_ids[: min(train_ids.numel(), held_ids.numel())]
    train_ppl, train_scored = evaluate_perplexity(saved, train_sample, args.seqlen, args.batch)
    del saved
    texts = samples(out, device)
    facts = dict(
        params=params, weight_bytes=2 * params, python=platform.python_version(), stdlib=str(root),
        train_files=len(train_files), held_files=len(held_files), train_tokens=train_ids.numel(),
        held_tokens=held_ids.numel(), command=" ".join(["python", *sys.argv]), steps=result.steps,
        batch=args.batch, seqlen=args.seqlen, tokens_seen=result.tokens, epochs=result.tokens / train_ids.numel(),
        lr=args.lr, weight_decay=args.weight_decay, train_s=result.seconds, stop_reason=result.stop_reason,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        held_ppl=held_ppl, held_scored=held_scored, train_ppl=train_ppl, train_scored=train_scored,
        wall_s=time.perf_counter() - t_start)
    (out / "README.md").write_text(model_card(facts, cfg, texts), encoding="utf-8")
    log = {"settings": vars(args), "facts": facts, "history": result.history}
    (out / "train_log.json").write_text(json.dumps(log, indent=1), encoding="utf-8")

    print("\n" + texts[0] + "\n")
    rows = [("parameters", f"{params:,}"), ("bytes (weights + tokenizer)", f"{total_bytes:,}"),
            ("train / held-out tokens", f"{train_ids.numel():,} / {held_ids.numel():,}"),
            ("steps x batch x seqlen", f"{result.steps} x {args.batch} x {args.seqlen}"),
            ("tokens seen", f"{result.tokens:,} ({facts['epochs']:.1f} epochs)"),
            ("train time / wall time", f"{result.seconds:.0f} s / {facts['wall_s']:.0f} s ({result.stop_reason})"),
            ("final train loss", f"{result.final_loss:.3f}"),
            ("held-out / train perplexity", f"{held_ppl:.2f} / {train_ppl:.2f}"), ("saved to", str(out))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
