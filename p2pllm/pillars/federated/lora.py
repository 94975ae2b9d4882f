"""LoRA on a Hugging Face causal LM with peft: config, the base model, adapter tensors, files.

Adapter tensors are named as peft's ``get_peft_model_state_dict`` names them
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``): the same names go on the
wire, into checkpoints and into ``adapter_model.safetensors``, so ``PeftModel.from_pretrained``
and the engine's ``--adapter`` read the files the coordinator writes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# The spec is shared with split training (pillars/training.py); re-exported here.
from p2pllm.pillars.training import DEFAULT_TARGETS as DEFAULT_TARGETS
from p2pllm.pillars.training import LoraSpec as LoraSpec

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("4bit",)


def quantize_refusal(quantize: str | None, device: str) -> str | None:
    """Why a 4-bit (QLoRA) base cannot be used here, or None when it can (or is not asked)."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_CHOICES:
        return f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}"
    if device != "cuda":
        return (
            f"QLoRA (a 4-bit quantized base model) needs a CUDA GPU with bitsandbytes; this host "
            f"runs on {device}, so it refuses instead of silently training in full precision"
        )
    try:
        import bitsandbytes  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return "QLoRA (a 4-bit quantized base model) needs bitsandbytes: pip install bitsandbytes"
    return None


def load_base_model(path: str | Path, *, device: str = "cpu", quantize: str | None = None) -> Any:
    """The base causal LM, frozen, on ``device`` (4-bit NF4 via bitsandbytes when asked).
    Built under the process-wide model-build lock (:func:`p2pllm.engine.loader.model_build`)."""
    from p2pllm.engine.loader import model_build

    reason = quantize_refusal(quantize, device)
    if reason:
        raise ValueError(reason)
    with model_build():
        return _load_base_model(path, device, quantize)


def _load_base_model(path: str | Path, device: str, quantize: str | None) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no tqdm bars in daemon logs
    if quantize == "4bit":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        qmodel = AutoModelForCausalLM.from_pretrained(
            str(path), quantization_config=bnb, device_map={"": 0}, local_files_only=True
        )
        return prepare_model_for_kbit_training(qmodel, use_gradient_checkpointing=False)
    from p2pllm.engine.gguf import find_gguf

    gguf = find_gguf(path)
    model: Any = (_gguf_base_model(gguf) if gguf is not None else AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, local_files_only=True))
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _gguf_base_model(file: Path) -> Any:
    """A float32 transformers model of a GGUF file: the config its metadata amounts to, the
    tensors dequantized by the engine's reader (q/k un-permuted), tied weights tied. The same
    weights as ``from_pretrained(dir, gguf_file=...)`` loads, in a fraction of its time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]

    from p2pllm.engine.gguf import GGUFCheckpoint, hf_config

    raw, _ = hf_config(file)
    with no_init_weights():  # every weight is overwritten below
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw), dtype=torch.float32)
    ckpt = GGUFCheckpoint(file)
    result = model.load_state_dict(dict(ckpt.tensors(ckpt.names)), strict=False)
    tied = {"lm_head.weight"} if raw.get("tie_word_embeddings") else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"{file}: GGUF tensors do not fit the model: missing "
                         f"{sorted(set(result.missing_keys) - tied)[:4]}, unexpected "
                         f"{sorted(result.unexpected_keys)[:4]}")
    model.tie_weights()
    return model


def wrap(model: Any, spec: LoraSpec, seed: int, base_model_path: str | None = None) -> Any:
    """peft-wrap ``model`` with the spec; the LoRA A matrices are drawn from ``seed``
    (under the process-wide model-build lock)."""
    from p2pllm.engine.loader import model_build

    with model_build(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        from peft import get_peft_model

        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations peft trips
        torch.manual_seed(seed)
        return get_peft_model(model, spec.peft_config(base_model_path))


def adapter_tensors(peft_model: Any) -> dict[str, Tensor]:
    """The adapter's tensors (CPU copies), by peft state-dict name."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}


def set_adapter_tensors(peft_model: Any, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` into the peft model; keys, shapes and dtypes must match exactly."""
    from peft import set_peft_model_state_dict

    check_same_layout(tensors, adapter_tensors_meta(peft_model))
    result = set_peft_model_state_dict(peft_model, dict(tensors))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"adapter tensors the model does not have: {unexpected[:4]}")


def adapter_tensors_meta(peft_model: Any) -> dict[str, Tensor]:
    """Shape/dtype templates of the adapter (meta device: no data)."""
    from peft import get_peft_model_state_dict

    return {
        k: torch.empty(v.shape, dtype=v.dtype, device="meta")
        for k, v in get_peft_model_state_dict(peft_model).items()
    }


def check_same_layout(tensors: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> None:
    """Same names, shapes and dtypes as ``reference``, else ValueError naming the difference."""
    missing = sorted(set(reference) - set(tensors))
    extra = sorted(set(tensors) - set(reference))
    if missing or extra:
        raise ValueError(f"adapter layout differs: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, ref in reference.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
            raise ValueError(
                f"adapter tensor {k}: {tuple(t.shape)} {t.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
            )


def initial_adapter(model_path: str | Path, spec: LoraSpec, seed: int) -> dict[str, Tensor]:
    """The round-0 global adapter: the base model wrapped with ``spec`` from ``seed``.

    peft initialises A at random (from the seed) and B at zero, so the adapted model starts
    equal to the base model.
    """
    model = load_base_model(model_path)
    return adapter_tensors(wrap(model, spec, seed, str(model_path)))


def adapter_nbytes(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_peft_adapter(
    out_dir: str | Path, tensors: Mapping[str, Tensor], spec: LoraSpec, base_model_path: str
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as peft's save_pretrained
    does, so ``PeftModel.from_pretrained(base, out_dir)`` loads it."""
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    config = spec.peft_config(base_model_path)
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(out))
    tmp = out / "adapter_model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "adapter_model.safetensors")
    return out
