"""Errors the engine raises for anything a user or a peer can get wrong.

Every user-facing engine failure is a :class:`ModelError` (or a subclass), with a message
that says what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "KVBudgetError",
    "KVCacheFullError",
    "ModelError",
    "ModelNotFoundError",
    "SequenceTooLongError",
    "UnsupportedModelError",
]


class ModelError(Exception):
    """A model could not be found, loaded or run with the given inputs."""


class ModelNotFoundError(ModelError):
    """No local directory, models-dir entry, bundled model or hub snapshot matched a name."""


class UnsupportedModelError(ModelError):
    """The checkpoint is of an architecture or variant the engine does not implement."""


class CheckpointError(ModelError):
    """A checkpoint file is missing, corrupt, or lacks a tensor the slice needs."""


class SequenceTooLongError(ModelError):
    """A prompt or generation exceeds the model's or the KV cache's maximum length."""


class KVCacheFullError(ModelError):
    """The KV cache's pool has no free block for a step (its total-token cap is reached).

    Not the caller's fault: a role answers it with a refusal (try later, or elsewhere).
    """

    def __init__(self, message: str, *, needed: int = 0, free: int = 0) -> None:
        super().__init__(message)
        self.needed, self.free = needed, free


class KVBudgetError(KVCacheFullError):
    """Growing the KV cache's storage would take it past the memory budget it was given
    (:class:`~p2pllm.engine.kv_cache.KVBudget`): a cap, not a full pool."""

    def __init__(self, message: str, *, needed: int = 0, free: int = 0, limit: int = 0) -> None:
        super().__init__(message, needed=needed, free=free)
        self.limit = limit  # the budget's bytes
