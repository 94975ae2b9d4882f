"""A byte-level BPE tokenizer trained with the ``tokenizers`` library, saved so that
``transformers.AutoTokenizer`` loads it (``PreTrainedTokenizerFast``).

No normaliser and a byte-level pre-tokenizer/decoder without a prefix space: ``decode(encode(s))``
gives back ``s`` exactly, for any string. Encoding prepends ``<s>`` (BOS); documents end with
``</s>`` (EOS) in the training stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["BOS", "EOS", "TOKENIZER_FILES", "train_tokenizer"]

BOS, EOS = "<s>", "</s>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path,
                    model_max_length: int, min_frequency: int = 2) -> Path:
    """Train on ``texts`` and write the tokenizer files into ``out_dir``; ``out_dir``.

    BPE training in ``tokenizers`` is deterministic for a given input (no seed involved).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                                   encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n",
                                                     encoding="utf-8")
    return out_dir
