"""Chat templates: a conversation rendered to prompt ids with the tokenizer's own template, the
ids that end a reply, and a history that grows turn by turn. Pure (no I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from p2pllm.engine.errors import ModelError

__all__ = ["ChatHistory", "end_ids", "has_chat_template", "render"]

_PROBE = "\u2063p2pllm-reply\u2063"  # a reply no real template rewrites


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, messages: Sequence[dict[str, str]],
           add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids of ``messages`` ([{"role", "content"}]) through the tokenizer's chat
    template, as ``apply_chat_template(tokenize=True)`` gives them."""
    if not has_chat_template(tokenizer):
        raise ModelError("this model's tokenizer has no chat template (not a chat model?): "
                         "use plain generation instead")
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template can raise on a conversation it does not accept
        raise ModelError(f"the chat template rejects this conversation: {e}") from e
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_ids(tokenizer: Any, eos_ids: Iterable[int] = ()) -> tuple[int, ...]:
    """The ids that end an assistant turn: the special tokens the template writes right after
    a reply (``<|im_end|>`` for ChatML), the tokenizer's EOS, and ``eos_ids`` (the config's)."""
    out: list[int] = []

    def add(i: Any) -> None:
        if isinstance(i, int) and i not in out:
            out.append(i)

    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            special.add(int(i))
    if has_chat_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                tokenize=False)
        except Exception:
            text = ""
        if _PROBE in text:
            tail = text.split(_PROBE, 1)[1]
            for i in tokenizer(tail, add_special_tokens=False)["input_ids"]:
                if i not in special:
                    break
                add(int(i))
    add(getattr(tokenizer, "eos_token_id", None))
    for i in eos_ids:
        add(int(i))
    return tuple(out)


@dataclass
class ChatHistory:
    """The conversation so far; ``prompt(user)`` renders it with the next user turn."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def conversation(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages + [{"role": "user", "content": user}]

    def prompt(self, tokenizer: Any, user: str) -> list[int]:
        return render(tokenizer, self.conversation(user))

    def add(self, user: str, reply: str) -> None:
        self.messages += [{"role": "user", "content": user},
                          {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.messages.clear()

    @property
    def turns(self) -> int:
        return len(self.messages) // 2
