"""Rotary position embeddings: inverse frequencies (default, linear, llama3, yarn) and tables."""

from __future__ import annotations

import math

import torch

from p2pllm.engine.config import ModelConfig

__all__ = ["RotaryTable", "inv_freq"]


def inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies ``(head_dim/2,)`` fp32, attention scaling), as transformers computes."""
    dim, base = config.head_dim, config.rope_theta
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    params = config.rope_scaling or {}
    kind = config.rope_type
    if kind == "default":
        return freq, 1.0
    if kind == "linear":
        return freq / float(params["factor"]), 1.0
    if kind == "llama3":
        return _llama3(freq, params), 1.0
    return _yarn(config, params)


def _llama3(freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor = float(p["factor"])
    low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(config: ModelConfig, p: dict) -> tuple[torch.Tensor, float]:
    dim, base = config.head_dim, config.rope_theta
    orig = float(p["original_max_position_embeddings"])
    factor = p.get("factor") or config.max_position_embeddings / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
    ramp = torch.clamp((ramp - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return inter * (1 - keep) + extra * keep, float(attention)


class RotaryTable:
    """cos / sin tables indexed by absolute position, grown on demand.

    ``sin`` is stored sign-folded (first half negated) so that rotating ``x`` is
    ``x * cos + roll(x, head_dim/2) * sin`` — the half-split rotation transformers uses,
    in three ops.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        self.limit = config.max_position_embeddings
        self.dtype = dtype
        self.device = torch.device(device)
        freq, self.scaling = inv_freq(config)
        self.inv_freq = freq.to(self.device)
        self.cos = torch.empty(0, config.head_dim, dtype=dtype, device=self.device)
        self.sin = torch.empty(0, config.head_dim, dtype=dtype, device=self.device)
        self._cos4 = self.cos.view(1, 0, 1, config.head_dim)
        self._sin4 = self.sin.view(1, 0, 1, config.head_dim)

    def __len__(self) -> int:
        return int(self.cos.shape[0])

    def ensure(self, length: int) -> None:
        """Make the tables cover positions ``[0, length)`` (capped at the model's limit)."""
        if length <= len(self):
            return
        n = min(max(length, 2 * len(self), 256), self.limit)
        pos = torch.arange(n, dtype=torch.int64, device=self.device).float()
        freqs = pos[:, None] * self.inv_freq[None, :]  # (n, hd/2), as transformers multiplies
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.scaling
        sin = emb.sin() * self.scaling
        half = freqs.shape[1]
        sin[:, :half].neg_()
        self.cos = cos.to(self.dtype)
        self.sin = sin.to(self.dtype)
        self._cos4 = self.cos.view(1, n, 1, self.cos.shape[1])  # (1, n, 1, hd) for span()
        self._sin4 = self.sin.view(1, n, 1, self.sin.shape[1])

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin for ``positions`` (B, T) -> each (B, T, 1, head_dim)."""
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)

    def span(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin for positions ``start .. start+length-1`` -> each (1, T, 1, head_dim)."""
        return self._cos4.narrow(1, start, length), self._sin4.narrow(1, start, length)
