"""The inference engine: Llama-family model slices from Hugging Face checkpoints. No I/O
beyond reading checkpoint files; nothing here knows about sockets.

- :mod:`.config`    ``ModelConfig`` from config.json (llama, mistral, qwen2, qwen3)
- :mod:`.loader`    ``resolve_model``, ``list_models``, ``load_slice`` (reads only a slice's
  tensors), ``load_tokenizer``, ``save_hf_checkpoint``
- :mod:`.model`     ``ModelSlice``: layers ``[start, end)``, optional embedding and head
- :mod:`.kv_cache`  ``KVCache``: rows of fixed-size blocks taken as tokens arrive, caps,
  rollback, rows added and removed without moving the others
- :mod:`.sampling`  ``SamplingParams``, ``distribution``, ``sample`` (pure)
- :mod:`.generate`  the local prefill + decode loop
- :mod:`.layout`    fused projections and oneDNN packing, applied from outside the model
- :mod:`.adapter`   peft LoRA adapters merged at load
- :mod:`.errors`    ``ModelError`` and its kinds
"""
