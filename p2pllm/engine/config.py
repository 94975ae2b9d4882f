"""Model configuration: the architecture facts the engine needs, read from a HF config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pllm.engine.errors import ModelError, UnsupportedModelError

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig"]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")

# Per-architecture defaults of the fields a config.json may omit (those of the transformers
# config classes, so an abbreviated config means what it means to transformers).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2,
                "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768},
    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (llama, mistral, qwen2, qwen3).

    ``qkv_bias``/``o_bias`` say which attention projections carry a bias (qwen2: q, k, v only;
    llama/qwen3 ``attention_bias``: all four). ``sliding_windows`` holds, per layer, the
    attention window in tokens or None for full attention.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    sliding_windows: tuple[int | None, ...] = ()
    torch_dtype: str | None = None
    # Extra stop ids from generation_config.json (from_dir only).
    generation_eos_token_ids: tuple[int, ...] = ()
    # The config.json this was built from, for writing a checkpoint back.
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(_unsupported(self.model_type))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"num_attention_heads ({self.num_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ModelError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ModelError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ModelError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if len(self.sliding_windows) not in (0, self.num_layers):
            raise ModelError("sliding_windows must have one entry per layer")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}")

    # -- derived ------------------------------------------------------------------------------

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return str(scaling.get("rope_type", scaling.get("type", "default")))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All ids that end a generation: config eos plus generation_config eos."""
        eos = self.eos_token_id
        ids: list[int] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        for extra in self.generation_eos_token_ids:
            if extra not in ids:
                ids.append(extra)
        return tuple(ids)

    def layer_param_count(self) -> int:
        """Parameters of one decoder layer."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        n = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h
        if self.attention_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += h
        if self.mlp_bias:
            n += 2 * self.intermediate_size + h
        if self.qk_norm:
            n += 2 * d
        return n

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (and ``generation_config.json`` if present) from a directory,
        or the metadata of a GGUF model (a ``.gguf`` file, or a folder holding one)."""
        path = Path(path)
        if path.suffix.lower() == ".gguf" or not (path / "config.json").is_file():
            from p2pllm.engine.gguf import find_gguf, hf_config

            gguf_file = find_gguf(path)
            if gguf_file is not None:
                raw_cfg, stops = hf_config(gguf_file)
                return cls.from_dict(raw_cfg, generation_eos_token_ids=stops)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        raw = _read_json(cfg_file)
        gen_eos: tuple[int, ...] = ()
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            try:
                gen = _read_json(gen_file)
            except ModelError:
                gen = {}
            eos = gen.get("eos_token_id")
            if isinstance(eos, int):
                gen_eos = (eos,)
            elif isinstance(eos, list):
                gen_eos = tuple(int(e) for e in eos if isinstance(e, int))
        return cls.from_dict(raw, generation_eos_token_ids=gen_eos)

    @classmethod
    def from_dict(cls, raw: dict[str, Any],
                  generation_eos_token_ids: tuple[int, ...] = ()) -> ModelConfig:
        """Build from the parsed content of a Hugging Face ``config.json``."""
        if not isinstance(raw, dict):
            raise ModelError("config.json must hold a JSON object")
        model_type = raw.get("model_type")
        if model_type is None:
            raise ModelError("config.json has no required field 'model_type'")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(_unsupported(model_type))
        d = {**_DEFAULTS[model_type], **raw}
        if d.get("max_position_embeddings") is None:
            d["max_position_embeddings"] = _DEFAULTS[model_type]["max_position_embeddings"]
        for name in _REQUIRED:
            if d.get(name) is None:
                raise ModelError(f"config.json has no required field {name!r}")
        act = d.get("hidden_act") or "silu"
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")

        heads = _int(d, "num_attention_heads")
        hidden = _int(d, "hidden_size")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ModelError(f"hidden_size ({hidden}) is not a multiple of "
                                 f"num_attention_heads ({heads}) and head_dim is not given")
            head_dim = hidden // heads
        num_layers = _int(d, "num_hidden_layers")
        theta, scaling = _rope(d)

        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        elif model_type == "mistral":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))

        return cls(
            model_type=model_type,
            vocab_size=_int(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps") or 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_int(d, "max_position_embeddings"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            sliding_windows=_sliding_windows(model_type, d, num_layers),
            torch_dtype=d.get("torch_dtype", d.get("dtype")),
            generation_eos_token_ids=generation_eos_token_ids,
            source=dict(raw),
        )


def _unsupported(model_type: object) -> str:
    return (f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object")
    return data


def _int(d: dict[str, Any], name: str) -> int:
    value = d[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelError(f"config field {name!r} must be an integer, got {value!r}")
    return value


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either the v4 or the v5 config layout."""
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = d.get(key)
        if isinstance(value, dict):
            params.update(value)
        elif value is not None:
            raise ModelError(f"config field {key!r} must be an object or null")
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    if not isinstance(theta, int | float) or isinstance(theta, bool):
        raise ModelError(f"rope_theta must be a number, got {theta!r}")
    theta = float(theta)
    if "partial_rotary_factor" in params or "partial_rotary_factor" in d:
        factor = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        if factor not in (None, 1, 1.0):
            raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = d.get(
            "original_max_position_embeddings", d["max_position_embeddings"])
    return theta, params


def _sliding_windows(model_type: str, d: dict[str, Any], n: int) -> tuple[int | None, ...]:
    window = d.get("sliding_window")
    if model_type == "mistral":
        return (int(window) if window else None,) * n
    if model_type in ("qwen2", "qwen3"):
        if not d.get("use_sliding_window", False) or not window:
            return (None,) * n
        types = d.get("layer_types")
        if isinstance(types, list) and len(types) == n:
            return tuple(int(window) if t == "sliding_attention" else None for t in types)
        first = int(d.get("max_window_layers", n))
        return tuple(int(window) if i >= first else None for i in range(n))
    return (None,) * n
