"""Which pieces of a manifest a model slice needs: what :func:`p2pllm.engine.loader.load_slice`
reads for layers ``[a, b)`` with or without the embedding and the head, and nothing more.

Tensors are told apart by name: GGUF ``blk.N.*``, ``token_embd.weight``, ``output_norm.weight``,
``output.weight``; Hugging Face ``model.layers.N.*``, ``model.embed_tokens.weight``,
``model.norm.weight``, ``lm_head.weight``. A head whose model stores no output / lm_head tensor
(tied embeddings), or one with the embedding's very bytes (a tied model saved with both, whose
config makes the loader read the embedding), reads the embedding. A tensor matching none of these is always included, so
are the head pieces of every file and every non-tensor file (config, tokenizer). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pllm.weights.manifest import Manifest

__all__ = ["Need", "pieces_for", "slice_bytes", "tensor_part"]

_EMBED = frozenset({"token_embd.weight", "model.embed_tokens.weight"})
_HEAD = frozenset({"output_norm.weight", "output.weight", "model.norm.weight", "lm_head.weight"})
_OUTPUT = frozenset({"output.weight", "lm_head.weight"})


@dataclass(frozen=True)
class Need:
    """What a role loads: layers ``[a, b)`` (None: every layer), the embedding, the head."""

    layers: tuple[int, int] | None = None
    embed: bool = True
    head: bool = True

    def __post_init__(self) -> None:
        if self.layers is not None:
            a, b = self.layers
            if type(a) is not int or type(b) is not int or not 0 <= a <= b:
                raise ValueError(f"layers {self.layers!r} is not a range [a, b) with 0 <= a <= b")
            object.__setattr__(self, "layers", (a, b))

    @classmethod
    def whole(cls) -> Need:
        """The whole model."""
        return cls(None, True, True)

    @classmethod
    def for_layers(cls, start: int, end: int, num_layers: int) -> Need:
        """Layers ``[start, end)`` of a ``num_layers``-layer model with the embedding when it
        starts at 0 and the head when it ends at the last layer (``load_slice``'s defaults)."""
        return cls((start, end), start == 0, end == num_layers)

    def wants_layer(self, n: int) -> bool:
        return self.layers is None or self.layers[0] <= n < self.layers[1]


def tensor_part(name: str) -> tuple[str, int | None]:
    """("layer", N), ("embed", None), ("head", None) or ("other", None) for a tensor name."""
    if name in _EMBED:
        return "embed", None
    if name in _HEAD:
        return "head", None
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
        return "layer", int(parts[1])
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return "layer", int(parts[2])
    return "other", None


def pieces_for(manifest: Manifest, need: Need) -> list[int]:
    """Ids of the pieces ``need`` reads (sorted): head pieces and non-tensor files always,
    then the tensors of its layers, embedding and head (see the module doc)."""
    tensors = manifest.tensor_names()
    tied = _tied(manifest)
    wanted: set[str] = set()
    for t in tensors:
        part, layer = tensor_part(t)
        if (part == "other"
                or (part == "layer" and layer is not None and need.wants_layer(layer))
                or (part == "embed" and (need.embed or (need.head and tied)))
                or (part == "head" and need.head)):
            wanted.add(t)
    return [p.id for p in manifest.pieces if p.tensor is None or p.tensor in wanted]


def _tied(manifest: Manifest) -> bool:
    """Whether a head reads the embedding: no output tensor is stored, or one is stored with
    the embedding's very bytes (a tied model saved with both: the loader reads the
    embedding, as its config ties them)."""
    def shas(names: frozenset[str]) -> list[list[str]]:
        return [[manifest.pieces[i].sha256 for i in manifest.tensor_pieces(t)]
                for t in sorted(names) if manifest.tensor_pieces(t)]

    out = shas(_OUTPUT)
    return not out or any(o in shas(_EMBED) for o in out)


def slice_bytes(manifest: Manifest, need: Need) -> int:
    """Bytes of :func:`pieces_for` (what a fetch of the slice moves)."""
    return manifest.nbytes(pieces_for(manifest, need))
