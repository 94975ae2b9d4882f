"""GGUF model files (llama.cpp's format): config, tokenizer and tensors for the engine.
(Over ~400 lines: one file format, its header parser, dequantizers and mappings belong
together, and the quantization code reads this one file for the raw-block contract.)

A GGUF model is either a ``.gguf`` file or a folder holding exactly one ``.gguf`` file (and no
config.json); :func:`find_gguf` says which file a path stands for. The header is parsed here
with ``struct`` over a memory map, using the ``gguf`` package (ggml's own) for the type ids and
block sizes: ``gguf.GGUFReader`` builds numpy views for every vocabulary string and takes ~7 s
on SmolLM2's 98k-string header, this ~0.1 s. Tensor data is read lazily from the map: a layer
slice touches only its own tensors' bytes.

API (what :mod:`p2pllm.engine.loader` and :mod:`p2pllm.engine.quant` use):

- ``GGUFFile(path)``: the parsed header; ``.metadata`` (key -> value), ``.tensors``
  (GGUF name -> :class:`TensorInfo`), ``.architecture``; a context manager (closes the map).
- ``hf_config(path) -> (config.json dict, extra stop ids)``; ``ModelConfig.from_dir`` uses it.
- ``gguf_name(hf_name)``: the GGUF tensor name of an engine/HF name (``model.layers.3.self_attn
  .q_proj.weight`` -> ``blk.3.attn_q.weight``); ``GGUFFile.hf_names()`` the other way.
- ``GGUFFile.raw(hf_name) -> RawTensor(ggml_type, shape, blocks)``: a tensor as stored, for
  keeping Q8_0/Q4_0/Q4_1 quantized. ``shape`` is in torch order ``(out_features,
  in_features)``; ``blocks`` a C-contiguous ``uint8`` numpy array ``(rows, bytes_per_row)``
  (a copy, not a view of the map), whose rows are in the engine's order: llama.cpp's q/k row
  permutation (llama files only) is already undone (it moves whole rows, blocks untouched). Block layouts
  (32 elements per block along a row, little-endian):
  Q8_0 34 bytes = f16 scale d, 32 x int8 q; x = d * q.
  Q4_0 18 bytes = f16 d, 16 bytes; element j < 16 is the low nibble of byte j, element j + 16
  its high nibble; x = d * (q - 8).
  Q4_1 20 bytes = f16 d, f16 m, 16 bytes as Q4_0; x = d * q + m.
  F32/F16/BF16: ``blocks`` holds the values' bytes, one row of ``in_features`` values each.
- ``dequantize(raw) -> torch.float32 tensor`` of ``raw.shape`` (vectorized torch).
- ``GGUFCheckpoint(path)``: the loader's reader (same interface as its safetensors reader).
- ``load_tokenizer(path)``: a transformers fast tokenizer from the vocabulary, merges, special
  tokens and chat template in the metadata (transformers' own GGUF converter).

Architectures: llama (Mistral files say llama too), qwen2, qwen3. Anything else (another
tensor type, another architecture, a corrupt or truncated file) raises a
:class:`~p2pllm.engine.errors.ModelError` naming the file, and the tensor and type where one is
at fault.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from p2pllm.engine.errors import CheckpointError, ModelError, UnsupportedModelError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TYPES",
    "GGUFCheckpoint",
    "GGUFFile",
    "RawTensor",
    "TensorInfo",
    "dequantize",
    "find_gguf",
    "gguf_name",
    "hf_config",
    "load_tokenizer",
]

T = GGMLQuantizationType
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0,
                                                     T.Q4_1)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3")  # mistral files say llama
_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
_VERSIONS = (2, 3)
# metadata value type id -> (struct format, width); 8 is a string, 9 an array
_SCALARS: dict[int, tuple[str, int]] = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2),
                                        4: ("I", 4), 5: ("i", 4), 6: ("f", 4), 7: ("?", 1),
                                        10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
               10: "<u8", 11: "<i8", 12: "<f8"}
_LAYER_NAMES = {  # HF module suffix of a decoder layer -> GGUF tensor base name
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_HF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HF_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file ``path`` stands for: itself if it is a ``.gguf`` file, the one ``.gguf``
    in a folder without config.json; None when it is no GGUF model (a ModelError when a
    folder holds several)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.resolve() if p.suffix.lower() == ".gguf" else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
    if len(files) > 1:
        raise ModelError(f"{p} holds {len(files)} .gguf files ({', '.join(f.name for f in files)})"
                         f": a model folder holds one; pass the file itself as --model")
    return files[0].resolve() if files else None


def gguf_name(hf_name: str) -> str:
    """GGUF tensor name of an engine (Hugging Face) tensor name."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        module, kind = ".".join(parts[3:-1]), parts[-1]
        if module in _LAYER_NAMES:
            return f"blk.{parts[2]}.{_LAYER_NAMES[module]}.{kind}"
    raise ModelError(f"tensor {hf_name!r} has no GGUF counterpart")


def _hf_name(name: str) -> str | None:
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _HF_LAYER:
        return f"model.layers.{parts[1]}.{_HF_LAYER[parts[2]]}.{parts[3]}"
    return None


def _type_name(type_id: int) -> str:
    try:
        return T(type_id).name
    except ValueError:
        return f"unknown type id {type_id}"


class TensorInfo(NamedTuple):
    """One tensor of the file: GGUF name, torch-order shape, ggml type id, absolute byte
    offset, byte size."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return _type_name(self.type_id)


class RawTensor(NamedTuple):
    """A tensor as stored: ggml type, torch-order shape, ``uint8`` rows (see the module doc)."""

    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    blocks: np.ndarray


class _Reader:
    """Little-endian cursor over the mapped header, raising CheckpointError past the end."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(f"{self.path} is truncated or corrupt: {what} runs past the "
                                  f"end of the {self.size}-byte file")

    def scalar(self, fmt: str, width: int, what: str) -> Any:
        self.need(width, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += width
        return v

    def string(self, what: str) -> str:
        n = self.scalar("Q", 8, what)
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path} is corrupt: {what} is not UTF-8 ({e})") from e

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype != 9:
            raise CheckpointError(f"{self.path} is corrupt: {what} has value type {vtype}")
        etype = self.scalar("I", 4, what)
        count = self.scalar("Q", 8, what)
        if etype in _NP_SCALARS:
            width = _SCALARS[etype][1]
            self.need(count * width, what)
            arr = np.frombuffer(self.buf, dtype=_NP_SCALARS[etype], count=count, offset=self.pos)
            self.pos += count * width
            return arr.tolist()
        if etype == 8:
            self.need(count * 8, what)  # each string takes at least its 8-byte length
            buf, pos, size, out = self.buf, self.pos, self.size, []
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                if pos + n > size:
                    self.pos = pos
                    self.need(n, what)
                out.append(buf[pos:pos + n])
                pos += n
            self.pos = pos
            try:
                return [b.decode("utf-8") for b in out]
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{self.path} is corrupt: {what} holds a string that is "
                                      f"not UTF-8 ({e})") from e
        if etype == 9:
            return [self.value(9, what) for _ in range(count)]
        raise CheckpointError(f"{self.path} is corrupt: {what} is an array of type {etype}")


class GGUFFile:
    """A GGUF file's header (metadata and tensor table) over a read-only memory map."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                self._map: mmap.mmap | None = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file
            raise CheckpointError(f"cannot read {self.path}: {e}") from e
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        assert self._map is not None
        r = _Reader(self._map, self.path)
        if r.size < 24 or self._map[:4] != b"GGUF":
            raise CheckpointError(f"{self.path} is not a GGUF file (no GGUF magic at its start)")
        r.pos = 4
        version = r.scalar("I", 4, "the version")
        if version not in _VERSIONS:
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported "
                                  f"(versions {', '.join(map(str, _VERSIONS))})")
        n_tensors = r.scalar("Q", 8, "the tensor count")
        n_kv = r.scalar("Q", 8, "the metadata count")
        if n_tensors > r.size // 24 or n_kv > r.size // 12:
            raise CheckpointError(f"{self.path} is truncated or corrupt: it claims {n_tensors} tensors and "
                                  f"{n_kv} metadata entries in {r.size} bytes")
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = r.string(f"metadata key #{i}")
            vtype = r.scalar("I", 4, f"metadata {key!r}")
            self.metadata[key] = r.value(vtype, f"metadata {key!r}")
        entries = []
        for i in range(n_tensors):
            name = r.string(f"tensor name #{i}")
            n_dims = r.scalar("I", 4, f"tensor {name!r}")
            if n_dims > 8:
                raise CheckpointError(f"{self.path} is corrupt: tensor {name!r} has {n_dims} "
                                      f"dimensions")
            r.need(8 * n_dims + 12, f"tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", self._map, r.pos)
            r.pos += 8 * n_dims
            type_id, offset = struct.unpack_from("<IQ", self._map, r.pos)
            r.pos += 12
            entries.append((name, tuple(reversed(dims)), type_id, offset))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0:
            raise CheckpointError(f"{self.path} is corrupt: general.alignment is {align!r}")
        start = (r.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, offset in entries:
            if type_id not in T._value2member_map_:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {_type_name(type_id)}, "
                                      f"which no GGUF reader knows (supported: "
                                      f"{', '.join(t.name for t in SUPPORTED_TYPES)})")
            block, block_bytes = GGML_QUANT_SIZES[T(type_id)]
            n = prod(shape)
            if shape and shape[-1] % block:
                raise CheckpointError(f"{self.path} is corrupt: tensor {name!r} ({T(type_id).name})"
                                      f" has rows of {shape[-1]} elements, not a multiple of "
                                      f"its block of {block}")
            nbytes = n // block * block_bytes
            lo = start + offset
            if lo + nbytes > r.size:
                raise CheckpointError(f"{self.path} is truncated or corrupt: tensor {name!r} "
                                      f"lies at bytes [{lo}, {lo + nbytes}) of a {r.size}-byte "
                                      f"file")
            self.tensors[name] = TensorInfo(name, shape, type_id, lo, nbytes)
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path} has no general.architecture in its metadata")
        self.architecture = arch

    # -- access -------------------------------------------------------------------------------

    def close(self) -> None:
        m = getattr(self, "_map", None)
        if m is not None:
            self._map = None
            try:
                m.close()
            except BufferError:  # a view is still alive (an exception's frame): the GC unmaps
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hf_names(self) -> dict[str, str]:
        """Engine (HF) name -> GGUF name of every tensor the engine knows."""
        out = {}
        for name in self.tensors:
            hf = _hf_name(name)
            if hf is not None:
                out[hf] = name
        return out

    def info(self, hf_name: str) -> TensorInfo:
        name = gguf_name(hf_name)
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} ({hf_name}) is missing")
        return self.tensors[name]

    def raw(self, hf_name: str) -> RawTensor:
        """The tensor as stored (see the module doc), q/k rows in the engine's order."""
        info = self.info(hf_name)
        qtype = T(info.type_id)
        if qtype not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{self.path}: tensor {info.name!r} is stored as {qtype.name}, which is not "
                f"supported (supported: {', '.join(t.name for t in SUPPORTED_TYPES)}); "
                f"requantize the file, e.g. llama-quantize --allow-requantize IN OUT Q8_0")
        if self._map is None:
            raise ModelError(f"{self.path} is closed")
        rows = prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        blocks = data.reshape(rows, info.nbytes // rows)
        heads = self._permuted_heads(hf_name)
        if heads:
            blocks = _unpermute_rows(blocks, heads)
        return RawTensor(qtype, info.shape, np.array(blocks, order="C", copy=True))

    def _permuted_heads(self, hf_name: str) -> int:
        """Heads of llama.cpp's rotary row permutation on this tensor (0 when none)."""
        if self.architecture != "llama":
            return 0
        p = "llama.attention."
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return int(self.metadata[p + "head_count"])
        if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return int(self.metadata.get(p + "head_count_kv", self.metadata[p + "head_count"]))
        return 0

    def tensor(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor dequantized, in ``dtype``."""
        t = dequantize(self.raw(hf_name))
        return t if dtype == torch.float32 else t.to(dtype)


def _unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` (convert_hf_to_gguf.py) on the rows of a q/k projection."""
    n = rows.shape[0]
    if n % (2 * heads):
        raise CheckpointError(f"a q/k projection of {n} rows does not split into {heads} heads")
    return rows.reshape(heads, n // heads // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)


def dequantize(raw: RawTensor) -> torch.Tensor:
    """The float32 values of a stored tensor (one vectorized numpy pass per step; numpy's
    single thread measured no slower than torch's ops here, and steadier on a busy host)."""
    q, blocks = raw.ggml_type, raw.blocks
    if q == T.F32:
        return torch.from_numpy(blocks.view(np.float32).reshape(raw.shape))
    if q == T.F16:
        return torch.from_numpy(blocks.view(np.float16).astype(np.float32).reshape(raw.shape))
    if q == T.BF16:
        return torch.from_numpy(blocks).view(torch.bfloat16).float().reshape(raw.shape)
    b = blocks.reshape(blocks.shape[0], -1, GGML_QUANT_SIZES[q][1])
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
    if q == T.Q8_0:
        out = b[..., 2:].view(np.int8).astype(np.float32)
        out *= d
    else:  # nibbles written straight into the float output: low ones first, then high
        qs = b[..., 4:] if q == T.Q4_1 else b[..., 2:]
        out = np.empty((*qs.shape[:2], 32), np.float32)
        np.bitwise_and(qs, 0x0F, out=out[..., :16], casting="unsafe")
        np.right_shift(qs, 4, out=out[..., 16:], casting="unsafe")
        if q == T.Q4_0:
            out -= 8.0
            out *= d
        else:
            out *= d
            out += b[..., 2:4].copy().view(np.float16).astype(np.float32)
    return torch.from_numpy(out.reshape(raw.shape))


# -- config ----------------------------------------------------------------------------------


def hf_config(path: str | Path, file: GGUFFile | None = None) -> tuple[dict[str, Any],
                                                                        tuple[int, ...]]:
    """(the Hugging Face config.json this GGUF's metadata amounts to, extra stop ids such as
    the end-of-turn token)."""
    if file is None:
        with GGUFFile(path) as f:
            return hf_config(path, f)
    md, arch = file.metadata, file.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{file.path}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if "rope_freqs.weight" in file.tensors:
        raise UnsupportedModelError(f"{file.path}: tensor 'rope_freqs.weight' (llama3-style "
                                    f"rope scaling stored as frequencies) is not supported")

    def key(name: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"{file.path}: metadata {arch}.{name} is missing")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    embed = file.tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{file.path}: tensor 'token_embd.weight' is missing")
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = int(md.get(f"{arch}.vocab_size") or embed.shape[0])
    raw: dict[str, Any] = {
        "architectures": [_HF_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", key("rope.dimension_count", hidden // heads))),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "attention_bias": "blk.0.attn_q.bias" in file.tensors,
        "mlp_bias": arch == "llama" and "blk.0.ffn_up.bias" in file.tensors,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    scaling = md.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        factor = md.get(f"{arch}.rope.scaling.factor")
        if scaling == "linear" and factor:
            raw["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        else:
            raise UnsupportedModelError(f"{file.path}: rope scaling {scaling!r} is not supported")
    for name, k in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
        v = md.get(f"tokenizer.ggml.{k}")
        if isinstance(v, int) and (tokens is None or 0 <= v < len(tokens)):
            raw[name] = v
    extra = tuple(int(md[f"tokenizer.ggml.{k}"]) for k in ("eot_token_id", "eom_token_id")
                  if isinstance(md.get(f"tokenizer.ggml.{k}"), int))
    return raw, extra


# -- the loader's reader -----------------------------------------------------------------------


@dataclass
class GGUFCheckpoint:
    """The loader's view of a GGUF file: byte sizes by engine name, and tensors by name."""

    path: Path

    def __post_init__(self) -> None:
        with GGUFFile(self.path) as f:
            self.names = f.hf_names()
            self.nbytes = {hf: f.tensors[g].nbytes for hf, g in self.names.items()}

    def tensors(self, names: Iterable[str], aliases: dict[str, str] | None = None,
                dtype: torch.dtype | None = None, raw: Iterable[str] = (),
                into: Mapping[str, torch.Tensor] | None = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the named tensors dequantized to ``dtype`` (float32 for those in ``raw`` or
        when None), one at a time, reading only their bytes; names in ``into`` are written
        into that tensor."""
        names = list(names)
        keep = set(raw)
        with GGUFFile(self.path) as f:
            stored: dict[str, str] = {}
            for n in names:  # check every name and type before reading anything
                s = n
                if gguf_name(n) not in f.tensors and aliases and n in aliases:
                    s = aliases[n]
                info = f.info(s)
                if T(info.type_id) not in SUPPORTED_TYPES:
                    f.raw(s)  # raises the error naming the tensor and its type
                stored[n] = s
            for n in names:
                t = f.tensor(stored[n])
                want = torch.float32 if n in keep or dtype is None else dtype
                if t.dtype != want:
                    t = t.to(want)
                out = None if into is None or n in keep else into.get(n)
                if out is not None:
                    if tuple(out.shape) != tuple(t.shape):
                        raise CheckpointError(f"{self.path}: tensor {gguf_name(stored[n])!r} "
                                              f"has shape {tuple(t.shape)}, the config implies "
                                              f"{tuple(out.shape)}")
                    with torch.no_grad():
                        out.copy_(t)
                    t = out
                yield n, t


# -- tokenizer ----------------------------------------------------------------------------------


def load_tokenizer(path: str | Path) -> Any:
    """A transformers fast tokenizer built from the file's metadata (vocabulary, merges,
    special tokens, chat template), as ``AutoTokenizer.from_pretrained(gguf_file=...)`` builds
    it, without re-reading the header with transformers' slower reader."""
    file = find_gguf(path) or Path(path)
    with GGUFFile(file) as f:
        md, arch = f.metadata, f.architecture
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            _SPECIAL_TOKENS,
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # another transformers layout: its own (slower) path
        return _auto_tokenizer(file)
    grouped = {group: {name: md[f"tokenizer.{k}"] for k, name in renames.items()
                       if f"tokenizer.{k}" in md}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    tokens = tok_dict.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelError(f"{file} has no tokenizer (no tokenizer.ggml.tokens in its metadata)")
    if tok_dict.get("tokenizer_type") == "llama":
        tok_config.setdefault("add_bos_token", True)
    for name, k in _SPECIAL_TOKENS.items():
        token_id = md.get(f"tokenizer.ggml.{k}")
        tok_config[name] = tokens[token_id] if isinstance(token_id, int) and \
            0 <= token_id < len(tokens) else None
    try:
        backend, extra = convert_gguf_tokenizer(arch, tok_dict)
        tok_config.update(extra)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config)
    except Exception as e:
        raise ModelError(f"cannot build a tokenizer from {file}: {type(e).__name__}: {e}") from e


def _auto_tokenizer(file: Path) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name,
                                             local_files_only=True)
    except Exception as e:
        raise ModelError(f"cannot build a tokenizer from {file}: {type(e).__name__}: {e}") from e
