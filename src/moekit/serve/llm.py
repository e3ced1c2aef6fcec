"""An offline entry point for many prompts at once, on the continuous-batching scheduler:
`LLM(model).generate(prompts, params)` returns one Completion per prompt (what users of
vllm.LLM.generate expect)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MoekitError
from .scheduler import SamplingParams, Scheduler, SchedulerConfig


@dataclass(frozen=True)
class Completion:
    """One prompt's result."""

    prompt_token_ids: list[int]
    token_ids: list[int]  # new tokens (a stop token included)
    text: str | None  # the new tokens decoded (None without a tokenizer)
    finish_reason: str  # "stop" or "length"


class LLM:
    """A model (and its tokenizer) behind a scheduler, for batch generation in one call."""

    def __init__(self, model=None, tokenizer=None, config: SchedulerConfig | None = None, **load_kwargs):
        """`model` is a loaded MoEModel, or a model folder (None: the bundled tiny MoE) loaded with
        `load_kwargs` (device, dtype); `tokenizer` defaults to the folder's."""
        from ..load import default_model_path, load_model
        from ..tokenizer import load_tokenizer

        if model is None or isinstance(model, (str, Path)):
            path = Path(model) if model is not None else default_model_path()
            model = load_model(path, **load_kwargs)
            tokenizer = tokenizer or load_tokenizer(path)
        self.model, self.tokenizer = model, tokenizer
        self.config = config or SchedulerConfig()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Returns one Completion per prompt (text, or token ids), all run together; stop tokens
        default to the model's eos ids."""
        params = params or SamplingParams(stop_token_ids=tuple(self.model.generation_defaults.get("eos_token_ids", ())))
        scheduler = Scheduler(self.model, self.config)
        ids = [self._encode(p) for p in prompts]
        requests = [scheduler.add(p, params) for p in ids]
        scheduler.run()
        return [Completion(r.prompt, r.output, self._decode(r.output, params), r.finish_reason) for r in requests]

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise MoekitError("text prompts need a tokenizer: give LLM(..., tokenizer=...) or token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _decode(self, ids: list[int], params: SamplingParams) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([t for t in ids if t not in params.stop_token_ids])
