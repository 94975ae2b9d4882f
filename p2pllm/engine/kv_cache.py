"""The engine's one KV cache: sessions as rows of fixed-size blocks, allocated as tokens arrive.

Local generation, the speculative verifier and split shards all use :class:`KVCache`; the
attention in :mod:`.model` reads and writes it through a :class:`KVPlan` built once per
forward. This module is over 400 lines because the block allocator, the per-forward index
plan and the attention's read/write path are one data structure and only make sense together.

Design, and why it measures well on CPU at batch 1:

- **Blocks.** Every row (a session) owns a block table: the ids of the fixed-size blocks
  (``block_size`` positions of every layer) that hold its positions in order, position ``p``
  in block ``table[p // block_size]`` at offset ``p % block_size``. A row holds exactly
  ``ceil(length / block_size)`` blocks: growth takes blocks from the pool, rollback and reset
  give the tail back, removing a row gives all of it back. No other row's data moves.
- **Chunks.** Block storage is allocated on demand in chunks of ``chunk_blocks`` blocks,
  each one tensor ``(layers, 2, kv_heads, chunk_blocks * block_size, head_dim)``, created
  (``torch.empty``: never zero-filled) when the pool first needs a block in it and freed when
  its last block is freed. The pool never allocates past ``num_blocks`` (the total cap). By
  default a pool of up to ``CHUNK_BYTES`` is one chunk: batched forwards then gather with one
  ``index_select`` per layer (rows spread over several chunks cost two more ops per chunk
  and layer); on CPU its pages become resident only as blocks are first written, so memory
  still grows with the tokens. Bigger pools (and
  accelerators, where ``torch.empty`` is resident at once) grow chunk by chunk.
- **Head-major slots.** Inside a chunk, one layer's keys are ``(kv_heads, slots, head_dim)``:
  a run of consecutive blocks is then a plain strided view ``(1, kv_heads, S, head_dim)`` --
  exactly what SDPA reads today. Measured here (SDPA, one query, 12 heads x 64, fp32), the
  head-major view is as fast as or faster than a token-major one at S = 256..1024 (430 vs 592 us
  at 1024), and any gather costs a copy of every key per layer per token (~170 us at 1024).
- **Contiguous when possible.** The allocator extends a row with the block right after its
  last one when free, and starts a new row where it has the most room, so a row alone in the
  cache (local generation, the drafter, a shard serving one session) is always one run: its
  attention is zero-copy, as with the old preallocated slab. Rows that are not one run, and
  batches of several rows, are gathered per layer with one ``index_select`` per chunk into
  ``(B, kv_heads, S, head_dim)``; the old slab's batched path copied as much (``kc[rows]``).
  Padding past a shorter row's end points at that row's first slot, so nothing unwritten is
  ever read (no zero fill).

- **Budget.** A cache that serves peers (the verifier, shards) is given a :class:`KVBudget`
  and small chunks (:func:`grow_chunk_tokens`, ``GROW_CHUNK_BYTES``): every chunk it allocates
  is taken from the budget first (``KVBudgetError`` past it, before anything changes) and
  given back when freed, so the memory it holds follows the tokens its rows hold and never
  passes what the daemon allowed. Rows longer than a chunk span several (gathered per layer,
  as fragmented rows are).

For a paged scheduler (admission by free blocks, preemption by freeing a row's blocks,
chunked prefill = several forwards of one row) everything is here: ``blocks_free``,
``block_table``, ``remove_row``, ``rollback``; only the batching policy is not.

Thread safety: the bookkeeping (rows, blocks, chunks) is under one lock, so rows may be
added and removed from an event loop while a forward runs in a worker thread; the tensors of
the rows a forward uses must not be removed until it returns.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pllm.engine.errors import (
    KVBudgetError,
    KVCacheFullError,
    ModelError,
    SequenceTooLongError,
)

__all__ = ["DEFAULT_BLOCK_SIZE", "GROW_CHUNK_BYTES", "KVBudget", "KVCache", "KVPlan",
           "grow_chunk_tokens"]

DEFAULT_BLOCK_SIZE = 16
GROW_ROOM = 8  # blocks a new row would like free after its first ones before a new chunk is used
CHUNK_BYTES = 256 << 20  # default chunk size bound (a chunk always holds one full row)
GROW_CHUNK_BYTES = 16 << 20  # chunk size bound of caches that serve peers (grow_chunk_tokens)


def grow_chunk_tokens(position_bytes: int, max_len: int, block_size: int = DEFAULT_BLOCK_SIZE,
                      chunk_bytes: int = GROW_CHUNK_BYTES) -> int:
    """Positions per chunk for a cache whose memory must follow the tokens it holds: as many
    whole blocks as fit ``chunk_bytes`` (at least one block, at most ``max_len``)."""
    per = max(1, chunk_bytes // max(position_bytes, 1)) // block_size * block_size
    return max(block_size, min(per, -(-max_len // block_size) * block_size))


class KVBudget:
    """Bytes of KV storage the caches sharing this object may hold together (thread-safe).

    ``limit`` None = no limit. A cache takes a chunk's bytes before allocating it
    (:class:`~p2pllm.engine.errors.KVBudgetError` past the limit) and gives them back when
    the chunk is freed. The owner may move ``limit`` at any time (e.g. to what its daemon's
    memory budget still has room for); bytes already held stay held.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        with self._lock:
            limit = self.limit
            if limit is not None and self.used + nbytes > limit:
                free = max(limit - self.used, 0)
                raise KVBudgetError(
                    f"the KV cache needs {nbytes} more bytes, {free} of its memory budget "
                    f"{limit} are free", needed=nbytes, free=free, limit=limit)
            self.used += nbytes

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(self.used - nbytes, 0)


@dataclass(eq=False)
class _Row:
    blocks: list[int] = field(default_factory=list)  # global block ids, in position order
    length: int = 0
    contiguous: bool = True  # blocks are consecutive ids inside one chunk


class KVPlan:
    """Where one forward's rows read and write: built by :meth:`KVCache.plan`.

    ``rows``/``starts``: the cache rows and their lengths before the forward; ``t`` new
    positions each; ``kv_len`` = max(starts) + t. ``span`` = (chunk, first slot) when the
    forward is one row whose blocks are one run (zero-copy path); else ``writes`` and the
    ``reads`` (per first key position, for sliding windows) are index lists per chunk.
    """

    __slots__ = ("_chunks", "_lens", "_slot", "kv_len", "reads", "rows", "span", "starts", "t",
                 "uniform", "writes")

    def __init__(self, rows: list[int], starts: list[int], t: int, kv_len: int,
                 span: tuple[int, int] | None) -> None:
        self.rows, self.starts, self.t, self.kv_len, self.span = rows, starts, t, kv_len, span
        self.uniform = len(rows) == 1 or min(starts) == max(starts)
        self.writes: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self.reads: dict[int, list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}
        self._slot: torch.Tensor | None = None  # (B, S) global slot of every key position
        self._chunks: list[int] = []  # chunks holding the rows' blocks
        self._lens: torch.Tensor | None = None  # (B,) int64 keys per row (attend_paged)


class KVCache:
    """K and V of layers ``[start, start + num_layers)`` for rows of up to ``max_len`` positions.

    max_len: cap on one row's positions (``SequenceTooLongError`` past it).
    max_total_tokens: cap on all rows together, counted in whole blocks
    (``KVCacheFullError`` when the pool has no block left); default ``max_len`` per row of
    ``rows`` (at least one).
    rows: rows to create up front (ids 0..rows-1); :meth:`add_row` makes more.
    chunk_tokens: positions per storage chunk (default: the whole pool when it takes at most
    ``CHUNK_BYTES``, else as many positions as fit that, at least ``max_len``, so that any row
    fits one run).
    """

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int,
                 max_total_tokens: int | None = None, rows: int = 0,
                 block_size: int = DEFAULT_BLOCK_SIZE, chunk_tokens: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 start: int = 0) -> None:
        if max_len <= 0 or num_layers < 0 or rows < 0 or block_size <= 0:
            raise ValueError(f"bad KV cache shape: max_len={max_len} num_layers={num_layers} "
                             f"rows={rows} block_size={block_size}")
        total = max_len * max(rows, 1) if max_total_tokens is None else max_total_tokens
        if total <= 0:
            raise ValueError(f"bad KV cache total: {total} tokens")
        self.start, self.num_layers = start, num_layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.max_len, self.block_size = max_len, block_size
        self.num_blocks = -(-total // block_size)
        per_chunk = chunk_tokens
        if per_chunk is None:  # the whole pool in one chunk unless that is over CHUNK_BYTES
            per_chunk = max(max_len, min(total, CHUNK_BYTES // max(self.position_bytes(), 1)))
        self.chunk_blocks = max(1, min(-(-per_chunk // block_size), self.num_blocks))
        self._chunk_slots = self.chunk_blocks * block_size
        n_chunks = -(-self.num_blocks // self.chunk_blocks)
        self._chunks: list[torch.Tensor | None] = [None] * n_chunks
        # per chunk, per layer: (K, V) as (1, kv_heads, slots, head_dim) views
        self._views: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_chunks)]
        self._chunk_used = [0] * n_chunks
        self._used = bytearray(self.num_blocks)
        self._blocks_used = 0
        self._rows: list[_Row | None] = [_Row() for _ in range(rows)]
        self._lock = threading.Lock()
        self._no_chunk = torch.empty(0, dtype=dtype, device=self.device)  # attend_paged
        self.budget: KVBudget | None = None  # set by the owner: chunks are taken from it

    # -- rows ---------------------------------------------------------------------------------

    def add_row(self) -> int:
        """A new empty row (the lowest free id); it takes blocks only as tokens arrive."""
        with self._lock:
            for i, r in enumerate(self._rows):
                if r is None:
                    self._rows[i] = _Row()
                    return i
            self._rows.append(_Row())
            return len(self._rows) - 1

    def remove_row(self, row: int) -> None:
        """Free a row and all its blocks; no other row is touched."""
        with self._lock:
            self._truncate(self._row(row), 0)
            self._rows[row] = None

    def rollback(self, row: int, length: int) -> None:
        """Forget everything of ``row`` past its first ``length`` positions (frees tail blocks)."""
        with self._lock:
            r = self._row(row)
            if not 0 <= length <= r.length:
                raise ValueError(f"cannot roll row {row} back to {length}: "
                                 f"it holds {r.length} positions")
            self._truncate(r, length)

    def reset(self, row: int | None = None) -> None:
        """Empty one row, or every row when ``row`` is None (rows stay, blocks are freed)."""
        with self._lock:
            for r in ([self._row(row)] if row is not None else self._live()):
                self._truncate(r, 0)

    def length(self, row: int) -> int:
        return self._row(row).length

    def remaining(self, row: int) -> int:
        """How many more positions ``row`` may take (its cap; the pool may run out first)."""
        return self.max_len - self._row(row).length

    def block_table(self, row: int) -> list[int]:
        return list(self._row(row).blocks)

    @property
    def lengths(self) -> list[int]:
        """Length of every row id (0 for a removed id): a snapshot, not for writing."""
        return [0 if r is None else r.length for r in self._rows]

    @property
    def rows(self) -> list[int]:
        """Ids of the live rows."""
        return [i for i, r in enumerate(self._rows) if r is not None]

    @property
    def batch(self) -> int:
        """Number of live rows."""
        return sum(r is not None for r in self._rows)

    def has_row(self, row: int) -> bool:
        return 0 <= row < len(self._rows) and self._rows[row] is not None

    # -- accounting ---------------------------------------------------------------------------

    @property
    def blocks_used(self) -> int:
        return self._blocks_used

    @property
    def blocks_free(self) -> int:
        return self.num_blocks - self._blocks_used

    @property
    def chunks_allocated(self) -> int:
        return sum(c is not None for c in self._chunks)

    def position_bytes(self) -> int:
        """Bytes one position of one row takes over all layers (K and V)."""
        return (self.num_layers * 2 * self.num_kv_heads * self.head_dim
                * torch.empty((), dtype=self.dtype).element_size())

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.position_bytes()

    @property
    def bytes_in_use(self) -> int:
        """Bytes of the blocks rows hold now."""
        return self._blocks_used * self.block_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of the chunks allocated now."""
        return sum(c.numel() * c.element_size() for c in self._chunks if c is not None)

    def read(self, row: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of (K, V) of ``row`` at global ``layer``, each (kv_heads, length, head_dim)."""
        r, i = self._row(row), self._layer(layer)
        n, bs = r.length, self.block_size
        ks, vs = [], []
        for j, b in enumerate(r.blocks):
            c, off = divmod(b, self.chunk_blocks)
            kc, vc = self._views[c][i]
            m = min(bs, n - j * bs)
            ks.append(kc[0, :, off * bs:off * bs + m])
            vs.append(vc[0, :, off * bs:off * bs + m])
        if not ks:
            empty = torch.empty(self.num_kv_heads, 0, self.head_dim, dtype=self.dtype,
                                device=self.device)
            return empty, empty.clone()
        return torch.cat(ks, 1), torch.cat(vs, 1)

    # -- the forward: plan, update every layer, commit (or abort) ------------------------------

    def plan(self, rows: list[int], t: int) -> KVPlan:
        """Reserve the blocks for ``t`` new positions of each row and index where they go.

        Raises SequenceTooLongError (a row past ``max_len``) or KVCacheFullError (not enough
        free blocks) before changing anything. Pair with :meth:`commit` or :meth:`abort`.
        """
        with self._lock:
            rs = [self._row(r) for r in rows]
            starts = [r.length for r in rs]
            end = max(starts) + t
            if end > self.max_len:
                raise SequenceTooLongError(f"sequence of {end} positions exceeds the KV "
                                           f"cache's maximum length ({self.max_len})")
            bs = self.block_size
            need = sum(max(0, -(-(r.length + t) // bs) - len(r.blocks)) for r in rs)
            if need:
                if need > self.num_blocks - self._blocks_used:
                    raise KVCacheFullError(
                        f"the KV cache needs {need} more blocks of {bs} positions, "
                        f"{self.num_blocks - self._blocks_used} of {self.num_blocks} are free",
                        needed=need, free=self.num_blocks - self._blocks_used)
                try:
                    for r in rs:
                        self._grow(r, r.length + t)
                except KVBudgetError:  # over the memory budget: give back what was taken
                    for r, n in zip(rs, starts, strict=True):
                        self._truncate(r, n)
                    raise
            if len(rs) == 1 and rs[0].contiguous:
                b0 = rs[0].blocks[0]
                return KVPlan(rows, starts, t, end,
                              (b0 // self.chunk_blocks, (b0 % self.chunk_blocks) * bs))
            p = KVPlan(rows, starts, t, end, None)
            self._index(p, rs)
            return p

    def commit(self, plan: KVPlan) -> None:
        """The forward wrote its positions: the rows now hold them."""
        t = plan.t
        for i in plan.rows:
            r = self._rows[i]
            if r is not None:
                r.length += t

    def abort(self, plan: KVPlan) -> None:
        """The forward failed: give back what :meth:`plan` reserved."""
        with self._lock:
            for i, n in zip(plan.rows, plan.starts, strict=True):
                r = self._rows[i]
                if r is not None:
                    self._truncate(r, n)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: KVPlan,
               window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (B, T, kv_heads, hd) of global ``layer`` and return the
        keys/values to attend to, (B, kv_heads, S', hd). With one new position per row at a
        shared length and a sliding ``window`` shorter than S, only the window is returned
        (S' = window); otherwise S' = S = ``plan.kv_len``."""
        i = layer - self.start
        s, t = plan.kv_len, plan.t
        lo = s - window if window is not None and t == 1 and plan.uniform and s > window else 0
        span = plan.span
        if span is not None:  # one row, one run: in place and zero-copy
            kc, vc = self._views[span[0]][i]  # (1, kv_heads, slots, hd)
            first = span[1]
            kc.narrow(2, first + plan.starts[0], t).copy_(k.transpose(1, 2))
            vc.narrow(2, first + plan.starts[0], t).copy_(v.transpose(1, 2))
            return kc.narrow(2, first + lo, s - lo), vc.narrow(2, first + lo, s - lo)
        b, nkv, hd = k.shape[0], self.num_kv_heads, self.head_dim
        self._write(i, k, v, plan)
        reads = plan.reads.get(lo)
        if reads is None:
            reads = plan.reads[lo] = self._read_index(plan, lo)
        if len(reads) == 1 and reads[0][2] is None:
            kc, vc = self._views[reads[0][0]][i]
            keys, values = kc[0].index_select(1, reads[0][1]), vc[0].index_select(1, reads[0][1])
        else:
            keys = k.new_empty(nkv, b * (s - lo), hd)
            values = v.new_empty(nkv, b * (s - lo), hd)
            for c, src, dst in reads:
                assert dst is not None
                kc, vc = self._views[c][i]
                keys.index_copy_(1, dst, kc[0].index_select(1, src))
                values.index_copy_(1, dst, vc[0].index_select(1, src))
        # (kv_heads, B*S', hd) -> (B, kv_heads, S', hd)
        return (keys.view(nkv, b, s - lo, hd).transpose(0, 1),
                values.view(nkv, b, s - lo, hd).transpose(0, 1))

    def attend_paged(self, kern: Any, layer: int, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, plan: KVPlan, window: int | None,
                     scale: float) -> torch.Tensor:
        """One new position per row (``plan.t == 1``) of a gathered plan (no ``span``):
        write the new keys/values (B, 1, kv_heads, hd) of global ``layer``, then attend the
        queries ``q`` (B, heads, hd) to every row's keys where they lie, in the native
        kernel ``kern.paged_attention`` (no gather, no padding mask: each row reads only its
        own positions, the last ``window`` of them with a sliding window). Returns the
        attention output (B, heads, hd) float32."""
        assert plan.t == 1 and plan._slot is not None
        i = layer - self.start
        self._write(i, k, v, plan)
        if plan._lens is None:
            plan._lens = torch.tensor([n + 1 for n in plan.starts], dtype=torch.int64)
            plan._slot = plan._slot.contiguous()
        last = plan._chunks[-1] + 1
        none = self._no_chunk
        ks = [self._views[c][i][0] if self._views[c] else none for c in range(last)]
        vs = [self._views[c][i][1] if self._views[c] else none for c in range(last)]
        return kern.paged_attention(q, ks, vs, plan._slot, plan._lens, self._chunk_slots,
                                    window or 0, scale)

    def _write(self, i: int, k: torch.Tensor, v: torch.Tensor, plan: KVPlan) -> None:
        """A gathered plan's new keys/values (B, T, kv_heads, hd) into layer ``i``'s slots."""
        b, t, nkv, hd = k.shape[0], plan.t, self.num_kv_heads, self.head_dim
        ks = k.reshape(b * t, nkv, hd).transpose(0, 1)  # (kv_heads, B*T, hd)
        vs = v.reshape(b * t, nkv, hd).transpose(0, 1)
        for c, slots, pick in plan.writes:
            kc, vc = self._views[c][i]
            kc[0].index_copy_(1, slots, ks if pick is None else ks.index_select(1, pick))
            vc[0].index_copy_(1, slots, vs if pick is None else vs.index_select(1, pick))

    def span_views(self, plan: KVPlan) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """For a plan with a ``span`` (one row, one run): every layer's (K, V) storage of
        that run's chunk, each (1, kv_heads, slots, hd), and the row's first slot in it
        (what :meth:`update` writes and reads there, for callers that do it themselves)."""
        assert plan.span is not None
        return self._views[plan.span[0]], plan.span[1]

    # -- internals ----------------------------------------------------------------------------

    def _index(self, p: KVPlan, rs: list[_Row]) -> None:
        """Slot indices of a gathered forward: every key position of every row, the writes."""
        bs, t, s = self.block_size, p.t, p.kv_len
        nb = -(-s // bs)
        table = torch.tensor([r.blocks + [r.blocks[0]] * (nb - len(r.blocks)) for r in rs])
        pos = torch.arange(s)
        slot = table.index_select(1, pos // bs) * bs + pos % bs  # (B, S) global slots
        ends = torch.tensor([n + t for n in p.starts])
        slot = torch.where(pos < ends[:, None], slot, slot[:, :1])  # padding: a written slot
        p._slot = slot
        cb = self.chunk_blocks
        p._chunks = sorted({b // cb for r in rs for b in r.blocks})
        wpos = torch.tensor(p.starts)[:, None] + torch.arange(t)  # (B, T)
        p.writes = self._by_chunk(slot.gather(1, wpos).reshape(-1), p._chunks)

    def _read_index(self, p: KVPlan, lo: int) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        assert p._slot is not None
        return self._by_chunk(p._slot[:, lo:].reshape(-1), p._chunks)

    def _by_chunk(self, slots: torch.Tensor,
                  chunks: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Global slots -> [(chunk, local slots, positions in ``slots`` or None = all)]."""
        cs = self._chunk_slots
        if len(chunks) == 1:
            c = chunks[0]
            return [(c, slots - c * cs, None)]
        which = slots // cs
        out: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        for c in chunks:
            sel = (which == c).nonzero().squeeze(1)
            if sel.numel():
                out.append((c, slots.index_select(0, sel) - c * cs, sel))
        return out

    def _grow(self, r: _Row, length: int) -> None:
        """Give ``r`` the blocks for ``length`` positions (the caller checked they exist)."""
        need = -(-length // self.block_size) - len(r.blocks)
        if need <= 0:
            return
        cb, used = self.chunk_blocks, self._used
        if r.blocks:
            nxt = r.blocks[-1] + 1
            if ((nxt + need - 1) // cb == (nxt - 1) // cb and nxt + need <= self.num_blocks
                    and not any(used[nxt:nxt + need])):
                self._take(range(nxt, nxt + need))
                r.blocks.extend(range(nxt, nxt + need))
                return
        new = self._place(need, room=need + GROW_ROOM)
        r.contiguous = not r.blocks and _is_run(new, cb)
        r.blocks.extend(new)

    def _place(self, need: int, room: int) -> list[int]:
        """``need`` free blocks: a run with the most room after it in an allocated chunk, a
        new chunk when none has ``room``, else whatever blocks are free (fragmented)."""
        cb, used = self.chunk_blocks, self._used
        best: tuple[int, int] | None = None  # (room, first block)
        for c, chunk in enumerate(self._chunks):
            if chunk is None:
                continue
            lo, hi = c * cb, min((c + 1) * cb, self.num_blocks)
            b = lo
            while b < hi:
                if used[b]:
                    b += 1
                    continue
                e = b
                while e < hi and not used[e]:
                    e += 1
                n = e - b
                if n >= need:
                    # after another row's blocks: leave it half the gap to grow into
                    off = min(n // 2, n - need) if b > lo else 0
                    if best is None or n - off > best[0]:
                        best = (n - off, b + off)
                b = e
        if best is None or best[0] < min(room, cb):
            for c, chunk in enumerate(self._chunks):
                lo, hi = c * cb, min((c + 1) * cb, self.num_blocks)
                if chunk is None and hi - lo >= need:
                    blocks = list(range(lo, lo + need))
                    self._take(blocks)
                    return blocks
        if best is not None:
            blocks = list(range(best[1], best[1] + need))
            self._take(blocks)
            return blocks
        free = [b for b in range(self.num_blocks)
                if not used[b] and self._chunks[b // cb] is not None][:need]
        c = 0
        while len(free) < need:  # the total was checked: unallocated chunks have the rest
            if self._chunks[c] is None:
                free += list(range(c * cb, min((c + 1) * cb, self.num_blocks)))[:need - len(free)]
            c += 1
        self._take(free)
        return free

    def _take(self, blocks: range | list[int]) -> None:
        cb = self.chunk_blocks
        new = sorted({b // cb for b in blocks if self._chunks[b // cb] is None})
        for i, c in enumerate(new):  # storage first: a budget refusal leaves nothing taken
            try:
                self._alloc_chunk(c)
            except KVBudgetError:
                for d in new[:i]:
                    self._free_chunk(d)
                raise
        for b in blocks:
            c = b // cb
            self._used[b] = 1
            self._chunk_used[c] += 1
        self._blocks_used += len(blocks)

    def _truncate(self, r: _Row, length: int) -> None:
        keep = -(-length // self.block_size)
        cb = self.chunk_blocks
        for b in r.blocks[keep:]:
            c = b // cb
            self._used[b] = 0
            self._chunk_used[c] -= 1
            if self._chunk_used[c] == 0:
                self._free_chunk(c)
        self._blocks_used -= len(r.blocks) - min(keep, len(r.blocks))
        del r.blocks[keep:]
        r.length = min(r.length, length)
        if not r.contiguous:
            r.contiguous = _is_run(r.blocks, cb)

    def _free_chunk(self, c: int) -> None:
        chunk = self._chunks[c]
        if chunk is not None:
            self._chunks[c] = None
            self._views[c] = []
            if self.budget is not None:
                self.budget.give(chunk.numel() * chunk.element_size())

    def clear(self) -> None:
        """Remove every row and free all storage (given back to the budget)."""
        with self._lock:
            for i, r in enumerate(self._rows):
                if r is not None:
                    self._truncate(r, 0)
                    self._rows[i] = None
            for c in range(len(self._chunks)):
                self._free_chunk(c)

    def _alloc_chunk(self, c: int) -> None:
        slots = self._chunk_slots
        budget = self.budget
        nbytes = slots * self.position_bytes()
        if budget is not None:
            budget.take(nbytes)
        try:
            # (layers, 2, kv_heads, slots, hd); empty, not zeros: nothing unwritten is read
            data = torch.empty(self.num_layers, 2, self.num_kv_heads, slots, self.head_dim,
                               dtype=self.dtype, device=self.device)
        except BaseException:
            if budget is not None:
                budget.give(nbytes)
            raise
        self._chunks[c] = data
        self._views[c] = [(data[i, 0].unsqueeze(0), data[i, 1].unsqueeze(0))
                          for i in range(self.num_layers)]

    def _row(self, row: int) -> _Row:
        if not 0 <= row < len(self._rows):
            raise IndexError(f"cache row {row} out of range [0, {len(self._rows)})")
        r = self._rows[row]
        if r is None:
            raise IndexError(f"cache row {row} was removed")
        return r

    def _live(self) -> list[_Row]:
        return [r for r in self._rows if r is not None]

    def _layer(self, index: int) -> int:
        i = index - self.start
        if not 0 <= i < self.num_layers:
            raise ModelError(f"layer {index} is not in this cache "
                             f"[{self.start}, {self.start + self.num_layers})")
        return i

    def __repr__(self) -> str:
        return (f"KVCache(layers=[{self.start}, {self.start + self.num_layers}), "
                f"rows={self.batch}, max_len={self.max_len}, blocks={self.blocks_used}/"
                f"{self.num_blocks} of {self.block_size}, lengths={self.lengths})")


def _is_run(blocks: list[int], chunk_blocks: int) -> bool:
    """Whether ``blocks`` are consecutive ids inside one chunk (one strided view)."""
    return not blocks or (all(b - a == 1 for a, b in itertools.pairwise(blocks))
                          and blocks[0] // chunk_blocks == blocks[-1] // chunk_blocks)
