"""Evaluation: held-out perplexity of a model directory (dense or compressed) on a text file,
JSONL file or folder (`moekit eval`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import load_text, text_tokens
from .errors import MoekitError
from .load import default_model_path, load_model
from .tokenizer import load_tokenizer
from .train import evaluate_perplexity


@dataclass
class EvalReport:
    model: str
    data: str
    perplexity: float
    tokens_scored: int
    seqlen: int
    seconds: float
    quantization: dict | None  # the model's quantization_config, if compressed

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(model_path: str | Path | None, data: str | Path, seqlen: int | None = None, device: str = "cpu",
             dtype: str | None = None, max_tokens: int | None = None, progress: bool = False,
             dense: str = "bf16") -> EvalReport:
    """Returns the perplexity report of the model at model_path (default: the bundled tiny MoE) on
    the text at `data`, scored in windows of seqlen tokens (see train.evaluate_perplexity).

    seqlen defaults to 512, or the model's context when that is shorter; a seqlen beyond the
    context is refused (never silently shortened, so the report states what was scored).
    `progress` shows the scoring on stderr (moekit.progress). `dense` "int8" scores the model with its
    projections as `--quantize-dense int8` holds them (linear.Int8Linear, on any device here)."""
    from .progress import heartbeat

    path = Path(model_path) if model_path is not None else default_model_path()
    if seqlen is not None and seqlen < 1:
        raise MoekitError(f"--seqlen must be >= 1, got {seqlen}")
    if max_tokens is not None and max_tokens < 2:
        raise MoekitError(f"--max-tokens must be >= 2, got {max_tokens}")
    t0 = time.perf_counter()
    with heartbeat("loading the model", enabled=progress):
        model = load_model(path, device=device, dtype=dtype, dense=dense)
    context = model.config.max_position_embeddings
    if seqlen is None:
        seqlen = min(512, context)
    elif seqlen > context:
        raise MoekitError(f"--seqlen {seqlen} exceeds the model's context ({context} positions); "
                          f"give --seqlen {context} or less")
    tokens = text_tokens(load_text(data), load_tokenizer(path))
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    ppl, scored = evaluate_perplexity(model, tokens, seqlen=seqlen, progress=progress)
    quant = None
    from .checkpoint import read_json
    cfg = read_json(path / "config.json")
    if isinstance(cfg.get("quantization_config"), dict):
        quant = cfg["quantization_config"]
    if dense != "bf16":
        quant = {**(quant or {}), "dense": dense}
    return EvalReport(str(path), str(data), ppl, scored, seqlen, round(time.perf_counter() - t0, 2), quant)
