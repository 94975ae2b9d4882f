"""The torch side of split training: a trainable model slice and what trains it.

No sockets here. :class:`StageModel` is one contiguous slice of layers being trained
micro-batch by micro-batch: ``forward(mb, x)`` keeps what ``backward(mb, grad)`` needs,
gradients accumulate over the micro-batches of a step, ``step(lr, scale)`` applies AdamW.
A pipeline stage drives one; the single-process trainer drives one that holds the whole model,
so both run the same code on the same numbers.

Initialisation is a function of (seed, parameter name) only (:func:`init_weights`,
:func:`apply_lora`): a slice initialised alone gets exactly the values the same layers get
inside the whole model, so a split run and a one-process run start from the same weights.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import ModelError
from p2pllm.engine.model import ModelSlice, shadow_attributes
from p2pllm.pillars.training import DEFAULT_TARGETS, LoraSpec

__all__ = [
    "IGNORE_INDEX",
    "LORA_TARGETS",
    "LoraSpec",
    "OptimConfig",
    "StageModel",
    "apply_lora",
    "build_slice",
    "clip_scale",
    "init_weights",
    "lora_from_meta",
    "lora_meta",
    "lora_spec",
    "lora_state_dict",
    "save_adapter",
]

IGNORE_INDEX = -100  # labels with this value do not count in the loss
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR_DECAYS = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule.

    ``lr_at(step, total)``: linear warm-up over ``warmup_steps`` (from lr/warmup to lr), then
    ``decay`` ("constant", "cosine" or "linear") from ``lr`` to ``min_lr`` at the last step.
    ``grad_clip``: clip the global gradient norm (over every stage) to this value.
    ``decay_1d``: whether 1-D parameters (norm weights, biases) get weight decay too.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None
    warmup_steps: int = 0
    decay: str = "constant"
    min_lr: float = 0.0
    decay_1d: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
                or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.decay not in LR_DECAYS:
            raise ValueError(f"decay must be one of {', '.join(LR_DECAYS)}, got {self.decay!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr], got {self.min_lr!r}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of step ``step`` (0-based) of ``total_steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.lr
        span = max(1, total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "cosine":
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr - (self.lr - self.min_lr) * progress

    def to_meta(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_meta(cls, d: Mapping[str, Any]) -> OptimConfig:
        if not isinstance(d, Mapping):
            raise ValueError("optimizer config must be a map")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown optimizer settings: {', '.join(unknown)}")
        try:
            return cls(**dict(d))
        except TypeError as e:
            raise ValueError(f"bad optimizer config: {e}") from e


def lora_spec(r: int = 8, alpha: int = 16,
              targets: Sequence[str] = DEFAULT_TARGETS) -> LoraSpec:
    """Split training's LoRA (the shared :class:`LoraSpec`): adapters on the named linear layers
    of every decoder layer (among LORA_TARGETS), an int alpha, and no dropout, so that training
    stage by stage equals the one-process reference."""
    targets = tuple(targets)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int) or alpha < 1:
        raise ValueError(f"LoRA alpha must be an int >= 1, got {alpha!r}")
    bad = [t for t in targets if t not in LORA_TARGETS]
    if not targets or bad:
        raise ValueError(f"LoRA targets must be among {', '.join(LORA_TARGETS)}, "
                         f"got {list(targets)}")
    return LoraSpec(rank=r, alpha=alpha, dropout=0.0, target_modules=targets)


def lora_meta(spec: LoraSpec) -> dict[str, Any]:
    """Split training's wire form of a spec: ``{r, alpha, targets}`` (ASSIGN train-stage)."""
    return {"r": spec.rank, "alpha": spec.alpha, "targets": list(spec.target_modules)}


def lora_from_meta(d: Mapping[str, Any]) -> LoraSpec:
    """:func:`lora_meta`'s inverse; ValueError (with the reason) for anything malformed."""
    if not isinstance(d, Mapping):
        raise ValueError("LoRA config must be a map")
    try:
        return lora_spec(r=d.get("r", 8), alpha=d.get("alpha", 16),
                         targets=tuple(d.get("targets", DEFAULT_TARGETS)))
    except TypeError as e:
        raise ValueError(f"bad LoRA config: {e}") from e


# -- initialisation ----------------------------------------------------------------------------


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))


@torch.no_grad()
def init_weights(model: ModelSlice, seed: int, std: float = 0.02) -> None:
    """Random initialisation that depends only on (seed, Hugging Face parameter name).

    Linear and embedding weights ~ N(0, std) (the residual projections o_proj and down_proj
    scaled by 1/sqrt(2 * num_layers)), norm weights 1, biases 0.
    """
    residual_std = std / math.sqrt(2 * model.config.num_layers)
    for name, p in model.named_parameters():
        key = model.hf_name(name)
        if name.endswith(".bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            w = torch.randn(p.shape, generator=_generator(seed, key), dtype=torch.float32) * s
            p.copy_(w.to(p.dtype))


def apply_lora(model: ModelSlice, spec: LoraSpec, seed: int) -> ModelSlice:
    """Wrap the target linears with peft LoRA (only the adapters train); A is drawn like
    peft's default (kaiming-uniform, bound 1/sqrt(fan_in)) but from (seed, name), B = 0."""
    from p2pllm.engine.loader import model_build

    if spec.dropout:
        raise ValueError(f"split training's LoRA has no dropout, got {spec.dropout} (lora_spec)")
    with model_build():  # peft's layers: transformers' imports and torch's default dtype
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha,  # type: ignore[arg-type]
                         target_modules=list(spec.target_modules), lora_dropout=0.0, bias="none")
        inject_adapter_in_model(cfg, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(p.shape[1])
                u = torch.rand(p.shape, generator=_generator(seed, _adapter_key(name)))
                p.copy_(((u * 2 - 1) * bound).to(p.dtype))
            elif ".lora_B." in name:
                p.zero_()
            p.requires_grad_(".lora_" in name)
    shadow_attributes(model)
    return model


def _adapter_key(name: str) -> str:
    """peft parameter name of a slice -> the key a peft adapter of the HF model stores it as."""
    return "base_model.model.model." + name.replace(".default.", ".")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a slice, keyed as in a peft adapter of the HF model (detached)."""
    return {_adapter_key(n): p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def save_adapter(tensors: Mapping[str, torch.Tensor], spec: LoraSpec, out_dir: str | Path,
                 base_model: str = "") -> Path:
    """Write a peft adapter directory (adapter_config.json, adapter_model.safetensors)."""
    import json

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(
        json.dumps(spec.peft_config_dict(base_model), indent=2, default=str) + "\n",
        encoding="utf-8")
    return out


def build_slice(source: str | Path | ModelConfig, layers: tuple[int, int] | None = None, *,
                init: str = "checkpoint", seed: int = 0, lora: LoraSpec | None = None,
                models_dir: str | Path | None = None) -> ModelSlice:
    """A float32 slice ready to train: layers ``[a, b)`` (all when None) of a checkpoint
    (``init="checkpoint"``) or freshly initialised from a config or a checkpoint's config
    (``init="random"``, :func:`init_weights`), with LoRA adapters if ``lora``."""
    from p2pllm.engine.loader import load_slice, model_build, resolve_model

    if init not in ("checkpoint", "random"):
        raise ModelError(f"init must be 'checkpoint' or 'random', got {init!r}")
    if isinstance(source, ModelConfig):
        if init != "random":
            raise ModelError("a bare ModelConfig has no weights: use init='random'")
        config = source
        path = None
    else:
        path = resolve_model(source, models_dir)
        config = ModelConfig.from_dir(path)
    start, end = layers if layers is not None else (0, config.num_layers)
    with model_build():  # one model build at a time in the process (engine.loader)
        if init == "checkpoint":
            assert path is not None
            model = load_slice(path, layers=(start, end), dtype=torch.float32, pack=False)
        else:
            model = ModelSlice(config, start, end)
            init_weights(model, seed)
        if lora is not None:
            apply_lora(model, lora, seed)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
    model.train()
    return model


def clip_scale(total_sq: float, max_norm: float | None) -> float:
    """The factor that clips gradients whose global squared norm is ``total_sq``."""
    if max_norm is None:
        return 1.0
    norm = math.sqrt(total_sq)
    return min(1.0, max_norm / (norm + 1e-6))


# -- training a slice --------------------------------------------------------------------------


class StageModel:
    """A slice under training: per-micro-batch forward/backward, accumulation, AdamW.

    ``tied`` is the parameter this slice shares with another stage (the embedding on the first
    stage, the head on the last, when the model ties them, they are trainable, and they sit on
    different stages); its gradient must be summed with the other copy's before a step.
    """

    def __init__(self, model: ModelSlice, optim: OptimConfig) -> None:
        self.model = model
        self.optim = optim
        self.config = model.config
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ModelError("the slice has no trainable parameters")
        self.params = [p for _, p in named]
        decay = [p for n, p in named if optim.decay_1d or p.dim() > 1]
        no_decay = [p for n, p in named if not (optim.decay_1d or p.dim() > 1)]
        groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": optim.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                     weight_decay=optim.weight_decay)
        self.tied = self._tied_param()
        self._saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def _tied_param(self) -> torch.Tensor | None:
        m = self.model
        if not self.config.tie_word_embeddings or (m.has_embed and m.has_head):
            return None
        if m.has_embed and m.embed_tokens is not None:
            p = m.embed_tokens.weight
        elif m.has_head and m.lm_head is not None:
            p = m.lm_head.weight
        else:
            return None
        return p if p.requires_grad else None

    @property
    def first(self) -> bool:
        return self.model.has_embed

    @property
    def last(self) -> bool:
        return self.model.has_head

    @property
    def in_flight(self) -> int:
        return len(self._saved)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def forward(self, mb: int, x: torch.Tensor, labels: torch.Tensor | None = None,
                denom: int | None = None) -> torch.Tensor:
        """Run micro-batch ``mb``: token ids (B, T) on the first stage, hidden (B, T, H)
        otherwise. Returns the output hidden states (detached), or on the last stage the
        micro-batch's share of the step loss: sum of token losses / ``denom``."""
        if mb in self._saved:
            raise ModelError(f"micro-batch {mb} was already run forward")
        inp: torch.Tensor | None = None
        if not self.first:
            inp = x.detach().to(self.model.dtype).requires_grad_(True)
            x = inp
        b, t = x.shape[0], x.shape[1]
        positions = torch.arange(t).expand(b, t)
        with torch.enable_grad():
            out = self.model(x, positions)  # (B, T, H) or logits (B, T, V)
            if self.last:
                if labels is None or denom is None:
                    raise ModelError("the last stage needs labels and a token count")
                loss = F.cross_entropy(out.float().reshape(-1, out.shape[-1]),
                                       labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                       reduction="sum") / denom
                out = loss
        self._saved[mb] = (inp, out)
        return out.detach()

    def backward(self, mb: int, grad: torch.Tensor | None = None) -> torch.Tensor | None:
        """Backward of micro-batch ``mb`` (the gradient of its output, except on the last
        stage); gradients accumulate. Returns the gradient of the input hidden states, or None
        on the first stage."""
        saved = self._saved.pop(mb, None)
        if saved is None:
            raise ModelError(f"micro-batch {mb} has no pending forward")
        inp, out = saved
        if self.last:
            out.backward()
        else:
            if grad is None or grad.shape != out.shape:
                raise ModelError(f"micro-batch {mb}: gradient of shape "
                                 f"{None if grad is None else tuple(grad.shape)}, the output "
                                 f"has {tuple(out.shape)}")
            out.backward(grad.to(out.dtype))
        if inp is None:
            return None
        assert inp.grad is not None
        return inp.grad

    def tied_grad(self) -> torch.Tensor:
        """This copy's gradient of the tied embedding/head (zeros if it got none)."""
        assert self.tied is not None
        g = self.tied.grad
        return torch.zeros_like(self.tied) if g is None else g

    def set_tied_grad(self, total: torch.Tensor) -> None:
        assert self.tied is not None
        self.tied.grad = total

    def grad_sq(self, exclude_tied: bool = False) -> float:
        """Sum of squared gradients (float64) of this slice's trainable parameters."""
        total = 0.0
        for p in self.params:
            if p.grad is None or (exclude_tied and p is self.tied):
                continue
            total += float(p.grad.detach().double().pow(2).sum())
        return total

    def step(self, lr: float, scale: float = 1.0) -> None:
        """One AdamW step on the accumulated gradients (multiplied by ``scale`` first)."""
        if self._saved:
            raise ModelError(f"{len(self._saved)} micro-batches still await their backward")
        if scale != 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def reset(self) -> None:
        """Forget pending micro-batches and gradients (after a failed step)."""
        self._saved.clear()
        self.opt.zero_grad(set_to_none=True)

    def state_tensors(self, lora: bool) -> dict[str, torch.Tensor]:
        """What a checkpoint of this slice holds: HF-named weights, or the LoRA tensors."""
        if lora:
            return lora_state_dict(self.model)
        return self.model.hf_state_dict()

    def memory_bytes(self) -> int:
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return weights + 3 * sum(p.numel() * p.element_size() for p in self.params)
