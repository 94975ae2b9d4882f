"""Preallocated key/value cache for the layers of one model slice."""

from __future__ import annotations

import torch

from p2pllm.engine.errors import ModelError

__all__ = ["KVCache"]


class KVCache:
    """K and V of the layers ``[start, start + num_layers)`` for ``batch`` rows of ``max_len``.

    One tensor is allocated up front, ``(num_layers, 2, batch, kv_heads, max_len, head_dim)``;
    decoding writes into it in place. Row ``r`` holds one sequence whose first
    ``lengths[r]`` positions are valid; position ``p`` of a sequence lives at index ``p``.
    Rows are independent: they may hold sequences of different lengths, be rolled back
    (rejected draft tokens) or reset (a new session) on their own.
    """

    def __init__(self, *, num_layers: int, batch: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", start: int = 0) -> None:
        if batch <= 0 or max_len <= 0 or num_layers < 0:
            raise ValueError(f"bad KV cache shape: batch={batch} max_len={max_len} "
                             f"num_layers={num_layers}")
        self.start = start
        self.num_layers = num_layers
        # Zeros, not empty: masked-out slots of shorter rows must hold finite values.
        self.data = torch.zeros(num_layers, 2, batch, num_kv_heads, max_len, head_dim,
                                dtype=dtype, device=device)
        self._keys = [self.data[i, 0] for i in range(num_layers)]  # each (batch, kvh, S, hd)
        self._values = [self.data[i, 1] for i in range(num_layers)]
        self.lengths: list[int] = [0] * batch

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return int(self.data.shape[4])

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) views of global layer ``index``, each ``(batch, kv_heads, max_len, head_dim)``."""
        i = index - self.start
        if not 0 <= i < self.num_layers:
            raise ModelError(f"layer {index} is not in this cache "
                             f"[{self.start}, {self.start + self.num_layers})")
        return self._keys[i], self._values[i]

    def rollback(self, row: int, length: int) -> None:
        """Forget everything of ``row`` past its first ``length`` positions."""
        self._check_row(row)
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot roll row {row} back to {length}: "
                             f"it holds {self.lengths[row]} positions")
        self.lengths[row] = length

    def reset(self, row: int | None = None) -> None:
        """Empty one row, or all rows when ``row`` is None."""
        if row is None:
            self.lengths = [0] * self.batch
            return
        self._check_row(row)
        self.lengths[row] = 0

    def remaining(self, row: int) -> int:
        """How many more positions ``row`` can take."""
        self._check_row(row)
        return self.max_len - self.lengths[row]

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.batch:
            raise IndexError(f"cache row {row} out of range [0, {self.batch})")

    def __repr__(self) -> str:
        return (f"KVCache(layers=[{self.start}, {self.start + self.num_layers}), "
                f"batch={self.batch}, max_len={self.max_len}, lengths={self.lengths})")
