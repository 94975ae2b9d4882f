"""`p2pllm chat`: talk to a chat model through its tokenizer's chat template.

Reads one user turn per line from stdin (interactive, or piped), streams each reply to stdout,
keeps the history (every turn sees the conversation so far), and stops each reply at the
template's end tokens (``<|im_end|>`` for ChatML models such as SmolLM2). ``/reset`` clears the
history, ``/exit`` (or end of input) quits. After each reply, stderr gets one line: prompt
tokens, generated tokens, decode tokens/s. ``--mode spec|split`` sends each turn to the local
daemon as a GENERATE job (the template is applied here: ``prompt_ids``; the replies end at the
model's end ids, which its config carries).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from p2pllm.cli.generate import QUANTS, _positive_int, add_sampling_arguments
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
    add_sampling_arguments(p)
    p.add_argument("--mode", choices=("local", "spec", "split"), default="local",
                   help="local: in this process; spec / split: each turn runs as a GENERATE job "
                        "on the daemon (default local)")
    p.add_argument("--draft-model", default=None, help="draft model for --mode spec "
                                                        "(default: the model itself)")
    p.add_argument("--shards", type=_positive_int, default=None,
                   help="number of shards for --mode split")
    p.add_argument("--daemon", metavar="HOST:PORT", default=None,
                   help="daemon to ask (default 127.0.0.1:7411 or $P2PLLM_DAEMON)")
    p.add_argument("--secret-file", default=None, help="shared secret file, if any")


def _tokenizer(args: argparse.Namespace) -> Any:
    """The model's tokenizer from this host's copy (--mode spec|split applies the template
    here)."""
    from p2pllm.engine.chat import has_chat_template
    from p2pllm.engine.errors import ModelError
    from p2pllm.engine.loader import load_tokenizer, resolve_model

    path = resolve_model(args.model, args.models_dir)
    tokenizer = load_tokenizer(path)
    if not has_chat_template(tokenizer):
        raise ModelError(f"{path} has no chat template (not a chat model): use "
                         f"`p2pllm generate` for plain continuation")
    return tokenizer


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


class _Remote:
    """One turn = one GENERATE job on the daemon (--mode spec|split)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self, ids: list[int]) -> dict[str, Any] | None:
        from p2pllm.cli.client import run_daemon_call
        from p2pllm.cli.remote import stream_generate
        from p2pllm.daemon.modelrefs import cli_model_ref

        a = self.args
        meta: dict[str, Any] = {"mode": a.mode, "model": cli_model_ref(a.model), "prompt_ids": ids,
                                "max_tokens": a.max_tokens, "temperature": a.temperature,
                                "top_k": a.top_k, "top_p": a.top_p,
                                "repetition_penalty": a.repetition_penalty}
        extra = {"seed": a.seed, "dtype": a.dtype, "shards": a.shards,
                 "draft_model": cli_model_ref(a.draft_model or a.model) if a.mode == "spec" else None}
        meta.update({k: v for k, v in extra.items() if v is not None})
        result, _ = run_daemon_call(stream_generate(a.daemon, a.secret_file, meta, True),
                                    "chat")
        return result


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
    remote = _Remote(args) if args.mode != "local" else None
    try:
        if remote is None:
            model, tokenizer = _load(args)
            stops = end_ids(tokenizer, model.config.eos_token_ids)
        else:
            tokenizer = _tokenizer(args)
    except ModelError as e:
        print(f"p2pllm chat: {e}", file=sys.stderr)
        return 1
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
            if remote is not None:  # streams the reply and its newline itself
                out = remote(ids)
                if out is None:
                    return 1
                history.add(user, str(out.get("text", "")).strip())
                print(f"[{out.get('prompt_tokens')} prompt tokens, "
                      f"{out.get('generated_tokens')} tokens, "
                      f"{float(out.get('tokens_per_s') or 0):.1f} tokens/s, "
                      f"{out.get('stop_reason')}, {args.mode}]", file=sys.stderr)
                continue
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
