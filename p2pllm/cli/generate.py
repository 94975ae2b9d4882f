"""`p2pllm generate`: generate text locally (in this process) or across hosts via the daemon.

``--mode local`` loads the model here and streams tokens as they come; ``--mode spec`` and
``--mode split`` hand the same arguments to the local daemon (:mod:`p2pllm.cli.remote`).
"""

from __future__ import annotations

import argparse
import json
import sys

from p2pllm.wire.tensors import COMPUTE_DTYPES

DEFAULT_MODEL = "shakespeare"
DEFAULT_DRAFT_MODEL = "shakespeare-draft"
QUANTS = ("none", "int8", "int4")  # p2pllm.engine.quant.QUANT_MODES (no torch import here)


def _draft_tokens(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("--draft-tokens must be >= 1")
    return n


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The sampling flags every generating command takes (generate, chat)."""
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="penalise tokens already present (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--mode", choices=("local", "spec", "split", "tp"), default="local",
                   help="local: in this process; spec: speculative decoding (drafter + "
                        "verifier peers); split: layers sharded across peers; tp: every "
                        "layer split over --tp peers (tensor parallelism) (default local)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint directory, name under --models-dir, bundled model name, or "
                        f"Hugging Face hub id (default {DEFAULT_MODEL})")
    p.add_argument("--models-dir", default=None, help="directory of named checkpoints")
    p.add_argument("--adapter", default=None, help="peft LoRA adapter directory, merged at load")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None,
                   help="weight dtype (default float32 on CPU)")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help="weight-only quantized linears for inference: int8 (per channel) or "
                        "int4 (groups of 32; GGUF Q4_0/Q4_1/Q8_0 blocks kept as stored) "
                        "(default none)")
    p.add_argument("--draft-quant", choices=QUANTS, default=None,
                   help="spec mode: quantized linears of the draft model (default none; e.g. "
                        "the target itself with --draft-quant int4 as its own draft)")
    p.add_argument("--draft-dtype", choices=COMPUTE_DTYPES, default=None,
                   help="spec mode: weight dtype of the draft model (default: --dtype; e.g. "
                        "bfloat16 for a half-size copy of the target as its own draft)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads for local mode (default: torch's choice)")
    p.add_argument("--max-tokens", type=_positive_int, default=128,
                   help="stop after this many new tokens (default 128)")
    add_sampling_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the text, token ids and timings")
    p.add_argument("--chat", action="store_true",
                   help="the prompt is a user message: wrap it in the tokenizer's chat template "
                        "and stop at the template's end tokens (every mode; the tokenizer is "
                        "read here)")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at end tokens: generate exactly --max-tokens (every mode; "
                        "for benchmarks, as llama.cpp's --ignore-eos)")
    spec = p.add_argument_group("speculative decoding (--mode spec)")
    spec.add_argument("--draft-model", default=None,
                      help=f"draft model (default {DEFAULT_DRAFT_MODEL} with the default model)")
    spec.add_argument("--draft-tokens", type=_draft_tokens, default=None,
                      help="draft window length, or 'auto' to adapt it to the acceptance rate")
    spec.add_argument("--verifier", default=None, help="pin the verifier to this peer")
    spec.add_argument("--drafter", default=None, help="pin the drafter to this peer")
    split = p.add_argument_group("split inference (--mode split)")
    split.add_argument("--shards", type=_positive_int, default=None, help="number of shards")
    split.add_argument("--layers", default=None,
                       help="explicit layer ranges, e.g. 0-7,7-16 (default: planned by memory)")
    split.add_argument("--wire-dtype", choices=COMPUTE_DTYPES, default=None,
                       help="dtype of hidden states between shards (default float32)")
    split.add_argument("--batch-decode", action="store_const", const=True, default=None,
                       help="batch decode steps of concurrent sessions on each shard (faster "
                       "with many sessions; greedy ids equal in practice, not by construction)")
    split.add_argument("--keep-alive", type=float, default=None, metavar="SECONDS",
                       help="keep the shards loaded this long after the last request (default 30)")
    tp = p.add_argument_group("tensor parallelism (--mode tp)")
    tp.add_argument("--tp", type=_positive_int, default=None,
                    help="ranks (daemons that have the model); must divide the attention heads, "
                         "KV heads and MLP width (default 2)")
    remote = p.add_argument_group("daemon (--mode spec|split|tp)")
    remote.add_argument("--daemon", metavar="HOST:PORT", default=None,
                        help="daemon to ask (default 127.0.0.1:7411 or $P2PLLM_DAEMON)")
    remote.add_argument("--secret-file", default=None,
                        help="shared secret file, if the cluster uses one")


def run(args: argparse.Namespace) -> int:
    if args.mode == "local":
        return run_local(args)
    if args.mode == "spec" and args.draft_model is None and args.model == DEFAULT_MODEL:
        args.draft_model = DEFAULT_DRAFT_MODEL
    if getattr(args, "chat", False):
        return run_remote_chat(args)
    from p2pllm.cli.remote import run_generate

    return int(run_generate(args) or 0)


def chat_prompt(args: argparse.Namespace, tokenizer: object) -> list[int]:
    """The prompt as one user turn (after --system) through the chat template."""
    from p2pllm.engine.chat import render

    head = [{"role": "system", "content": args.system}] if args.system else []
    return render(tokenizer, [*head, {"role": "user", "content": args.prompt}])


def run_remote_chat(args: argparse.Namespace) -> int:
    """--chat with --mode spec|split: the template is applied here (with the local copy of the
    model's tokenizer) and the daemon gets ``prompt_ids``; the reply ends at the model's end
    ids, which the shards and the verifier take from its config (a GGUF's eos / eot)."""
    from p2pllm.cli.client import run_daemon_call
    from p2pllm.cli.remote import generate_meta, stream_generate
    from p2pllm.engine.chat import end_ids
    from p2pllm.engine.errors import ModelError
    from p2pllm.engine.loader import load_config, load_tokenizer, resolve_model

    try:
        path = resolve_model(args.model, args.models_dir)
        tokenizer = load_tokenizer(path)
        ids = chat_prompt(args, tokenizer)
        config_ends = set(load_config(path).eos_token_ids)
    except ModelError as e:
        print(f"p2pllm generate: --chat needs the model's tokenizer on this host: {e}",
              file=sys.stderr)
        return 1
    missing = set(end_ids(tokenizer)) - config_ends - {getattr(tokenizer, "eos_token_id", None)}
    if missing:
        print(f"p2pllm generate: warning: the chat template ends replies with ids "
              f"{sorted(missing)}, which the model's config does not list as end ids; the "
              f"daemon stops only at {sorted(config_ends)}", file=sys.stderr)
    meta = generate_meta(args)
    meta.pop("prompt", None)
    meta["prompt_ids"] = ids
    result, rc = run_daemon_call(stream_generate(args.daemon, args.secret_file, meta,
                                                 not args.json), "generate")
    if result is None:
        return rc
    if args.json:
        print(json.dumps(result))
    return 0


def run_local(args: argparse.Namespace) -> int:
    """Load the model in this process and generate; 0 on success, 1 model error, 2 usage."""
    import torch

    from p2pllm.engine.errors import ModelError
    from p2pllm.engine.generate import generate
    from p2pllm.engine.loader import load_slice, load_tokenizer, resolve_model
    from p2pllm.engine.sampling import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as e:
        print(f"p2pllm generate: {e}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or "float32")
    try:
        path = resolve_model(args.model, args.models_dir)
        model = load_slice(path, dtype=dtype, adapter=args.adapter, quant=args.quant)
        tokenizer = load_tokenizer(path)
        prompt: str | list[int] = args.prompt
        stops: tuple[int, ...] | None = None  # generate()'s default: config + tokenizer EOS
        if getattr(args, "chat", False):
            from p2pllm.engine.chat import end_ids

            prompt = chat_prompt(args, tokenizer)
            stops = end_ids(tokenizer, model.config.eos_token_ids)
        if getattr(args, "ignore_eos", False):
            stops = ()
        on_text = None
        if not args.json:
            if isinstance(prompt, str):
                sys.stdout.write(prompt)
                sys.stdout.flush()

            def on_text(piece: str) -> None:
                sys.stdout.write(piece)
                sys.stdout.flush()

        result = generate(model, tokenizer, prompt, params, args.max_tokens, on_text=on_text,
                          stop_ids=stops)
    except ModelError as e:
        if not args.json:
            sys.stdout.write("\n")
        print(f"p2pllm generate: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"{result.generated_tokens} tokens, {result.tokens_per_s:.1f} tokens/s, "
              f"first token {result.time_to_first_token_s * 1000:.0f} ms", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2pllm generate", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
