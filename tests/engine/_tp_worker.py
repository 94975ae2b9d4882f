"""One tensor-parallel rank for tests/engine/test_tp.py, run as a script:
``python _tp_worker.py RANK WORLD PORT SPEC_JSON OUT_JSON``. SPEC: model path, dtype, prompts,
max_tokens, and whether to record full-prompt logits; OUT: the generated ids (and logits)."""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    spec = json.loads(sys.argv[4])
    torch.set_num_threads(1)
    from p2pllm.engine.tp import load_tp_rank, tp_generate, tp_group

    group = tp_group("127.0.0.1", port, rank, world, timeout_s=60)
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model = load_tp_rank(spec["path"], rank, world, group, dtype=dtype, quant=spec.get("quant"))
    out: dict = {"ids": [], "logits": [], "comm_calls": []}
    for prompt in spec["prompts"]:
        model.reset_stats()
        r = tp_generate(model, prompt, spec["max_tokens"], stop_ids=[])
        out["ids"].append(r.token_ids)
        out["comm_calls"].append(model.comm_calls)
        if spec.get("logits"):
            with torch.inference_mode():
                ids = torch.tensor([prompt + r.token_ids])
                logits = model(ids, torch.arange(ids.shape[1])[None])
            out["logits"].append(logits[0].float().tolist())
    with open(sys.argv[5], "w", encoding="utf-8") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main()
