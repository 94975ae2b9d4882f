"""`p2pllm chat`: talk to a chat model through its tokenizer's chat template.

Reads one user turn per line from stdin (interactive, or piped), streams each reply to stdout,
keeps the history (every turn sees the conversation so far), and stops each reply at the
template's end tokens (``<|im_end|>`` for ChatML models such as SmolLM2). ``/reset`` clears the
history, ``/exit`` (or end of input) quits. After each reply, stderr gets one line: prompt
tokens, generated tokens, decode tokens/s.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from p2pllm.cli.generate import QUANTS, _positive_int
from p2pllm.wire.tensors import COMPUTE_DTYPES

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_CHAT_MODEL,
                   help="a chat model: .gguf file, checkpoint directory, name under "
                        f"--models-dir or pulled (default {DEFAULT_CHAT_MODEL}; "
                        f"`p2pllm models pull {DEFAULT_CHAT_MODEL}` fetches it)")
    p.add_argument("--models-dir", default=None, help="directory of named models")
    p.add_argument("--system", default=None,
                   help="system message (default: the template's own, if it has one)")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None,
                   help="weight dtype (default float32)")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help="weight-only quantized linears (default none)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--max-tokens", type=_positive_int, default=512,
                   help="at most this many tokens per reply (default 512)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="penalise tokens already present (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from p2pllm.engine.loader import load_slice, load_tokenizer, resolve_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model, args.models_dir)
    tokenizer = load_tokenizer(path)
    from p2pllm.engine.chat import has_chat_template

    if not has_chat_template(tokenizer):
        from p2pllm.engine.errors import ModelError

        raise ModelError(f"{path} has no chat template (not a chat model): use "
                         f"`p2pllm generate` for plain continuation")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, args.dtype or "float32")}
    if args.quant not in (None, "none"):
        kwargs["quant"] = args.quant
    return load_slice(path, **kwargs), tokenizer


def run(args: argparse.Namespace) -> int:
    from p2pllm.engine.chat import ChatHistory, end_ids
    from p2pllm.engine.errors import ModelError, SequenceTooLongError
    from p2pllm.engine.generate import generate
    from p2pllm.engine.sampling import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as e:
        print(f"p2pllm chat: {e}", file=sys.stderr)
        return 2
    try:
        model, tokenizer = _load(args)
    except ModelError as e:
        print(f"p2pllm chat: {e}", file=sys.stderr)
        return 1
    stops = end_ids(tokenizer, model.config.eos_token_ids)
    history = ChatHistory(system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} (/reset clears the history, /exit quits)",
              file=sys.stderr)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        user = line.strip()
        if not user:
            continue
        if user in ("/exit", "/quit"):
            break
        if user == "/reset":
            history.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        try:
            ids = history.prompt(tokenizer, user)
            result = generate(model, tokenizer, ids, params, args.max_tokens, on_text=write,
                              stop_ids=stops)
        except ModelError as e:
            print(f"\np2pllm chat: {e}", file=sys.stderr)
            if isinstance(e, SequenceTooLongError):
                print("(the conversation is too long for the model: /reset starts over)",
                      file=sys.stderr)
            continue
        write("\n")
        history.add(user, result.text.strip())
        print(f"[{result.prompt_tokens} prompt tokens, {result.generated_tokens} tokens, "
              f"{result.tokens_per_s:.1f} tokens/s, {result.stop_reason}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2pllm chat", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
