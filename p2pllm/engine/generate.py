"""Local generation: one sequence on the batch scheduler (:mod:`.scheduler`, the API's too):
the prompt in one pass, then one token per step."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from p2pllm.engine.errors import ModelError, SequenceTooLongError
from p2pllm.engine.model import ModelSlice
from p2pllm.engine.sampling import SamplingParams

__all__ = ["GenerationResult", "TextStream", "generate", "generate_ids"]

# The fields of `p2pllm generate --json`, in order.
JSON_FIELDS = ("text", "prompt_tokens", "generated_tokens", "token_ids", "seconds",
               "tokens_per_s", "time_to_first_token_s", "mode")


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    generated_tokens: int
    token_ids: list[int]  # generated ids only (an EOS that ended generation included)
    seconds: float  # prefill + decode, excluding model loading
    tokens_per_s: float  # decode speed: tokens after the first / time after the first
    time_to_first_token_s: float
    mode: str = "local"
    stop_reason: str = "max_tokens"  # "eos" | "max_tokens" | "length"
    prefill_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The object ``p2pllm generate --json`` prints."""
        d = asdict(self)
        return {k: d[k] for k in JSON_FIELDS}


class TextStream:
    """Incremental detokenizer: feed ids one by one, get the new text each adds.

    Decodes a short window of context before the new ids, so sentencepiece leading spaces
    and multi-byte characters split over tokens come out as in the full decode.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids)
        self.read = len(self.ids)
        self.prefix = max(self.read - 6, 0)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))


def continuation_text(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text ``new_ids`` add after the prompt (with the spacing the full decode gives)."""
    full = str(tokenizer.decode(list(prompt_ids) + list(new_ids), skip_special_tokens=True))
    head = str(tokenizer.decode(list(prompt_ids), skip_special_tokens=True))
    if full.startswith(head):
        return full[len(head):]
    return str(tokenizer.decode(list(new_ids), skip_special_tokens=True))


def generation_limits(config: Any, n_prompt: int, max_tokens: int,
                      stop_ids: Iterable[int] | None) -> tuple[frozenset[int], int, int]:
    """Check a generation request against the model and size it: (stop ids -- default the
    config's EOS ids --, KV positions needed, tokens that may be drawn). Every generated
    token but the last is fed back, so the cache holds positions [0, max_len); the budget
    is max_tokens or what the model's maximum length leaves (then the stop is "length")."""
    if n_prompt == 0:
        raise ModelError("empty prompt")
    if max_tokens < 1:
        raise ModelError(f"max_tokens must be >= 1, got {max_tokens}")
    limit = config.max_position_embeddings
    if n_prompt > limit:
        raise SequenceTooLongError(f"the prompt has {n_prompt} tokens; the model takes at most "
                                   f"{limit}")
    stops = frozenset(config.eos_token_ids if stop_ids is None else stop_ids)
    return stops, min(n_prompt + max_tokens - 1, limit), min(max_tokens, limit - n_prompt + 1)


def generate_ids(model: ModelSlice, prompt_ids: Sequence[int],
                 params: SamplingParams | None = None, max_tokens: int = 128, *,
                 stop_ids: Iterable[int] | None = None,
                 on_token: Callable[[int], None] | None = None,
                 generator: torch.Generator | None = None) -> GenerationResult:
    """Generate up to ``max_tokens`` ids after ``prompt_ids`` with a whole model.

    Stops at any of ``stop_ids`` (default: the config's EOS ids), at ``max_tokens``, or at
    the model's maximum length. ``on_token`` is called with each id as soon as it is drawn.
    """
    params = params or SamplingParams()
    if not (model.has_embed and model.has_head and model.start == 0
            and model.end == model.config.num_layers):
        raise ModelError("local generation needs the whole model (embedding, all layers, head)")
    from p2pllm.engine.scheduler import Scheduler
    from p2pllm.engine.scheduler import Sequence as Seq

    n_prompt = len(prompt_ids)
    stops, max_len, budget = generation_limits(model.config, n_prompt, max_tokens, stop_ids)
    # the batch scheduler with one sequence: a KV pool of exactly its positions, the whole
    # prompt in one forward (chunks of it would round differently), then one token a step
    sched = Scheduler(model, max_total_tokens=max_len, max_step_tokens=n_prompt)
    times: list[float] = []

    def drawn(token: int) -> None:
        times.append(time.perf_counter())
        if on_token is not None:
            on_token(token)

    seq = sched.add(Seq(prompt_ids, params, budget, stop_ids=stops, on_token=drawn,
                        generator=generator))
    t0 = time.perf_counter()
    while sched.has_work():
        sched.step()
    t2 = time.perf_counter()
    if seq.error is not None:
        raise seq.error  # what on_token raised
    out = seq.out
    stop_reason = "eos" if seq.stop_reason == "eos" else (
        "max_tokens" if budget == max_tokens else "length")
    t1 = times[0] if times else t2
    decode_s = t2 - t1
    return GenerationResult(
        text="", prompt_tokens=n_prompt, generated_tokens=len(out), token_ids=out,
        seconds=t2 - t0, tokens_per_s=(len(out) - 1) / decode_s if len(out) > 1 else 0.0,
        time_to_first_token_s=t1 - t0, stop_reason=stop_reason, prefill_s=t1 - t0)


def generate(model: ModelSlice, tokenizer: Any, prompt: str | Sequence[int],
             params: SamplingParams | None = None, max_tokens: int = 128, *,
             on_text: Callable[[str], None] | None = None,
             stop_ids: Iterable[int] | None = None,
             generator: torch.Generator | None = None) -> GenerationResult:
    """Tokenize ``prompt``, generate, and detokenize; ``on_text`` gets text as it comes.

    Stop ids default to the config's EOS ids plus the tokenizer's EOS token.
    """
    prompt_ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    if stop_ids is None:
        stops = set(model.config.eos_token_ids)
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            stops.add(eos)
        stop_ids = stops
    stream = TextStream(tokenizer, prompt_ids) if on_text is not None else None
    streamed: list[str] = []

    def on_token(token: int) -> None:
        assert stream is not None and on_text is not None
        piece = stream.push(token)
        if piece:
            streamed.append(piece)
            on_text(piece)

    result = generate_ids(model, prompt_ids, params, max_tokens, stop_ids=stop_ids,
                          on_token=on_token if stream is not None else None, generator=generator)
    result.text = continuation_text(tokenizer, prompt_ids, result.token_ids)
    if on_text is not None:  # flush what the stream held back (e.g. a partial character)
        sent = "".join(streamed)
        if result.text.startswith(sent) and len(result.text) > len(sent):
            on_text(result.text[len(sent):])
    return result
