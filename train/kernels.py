"""TRL's fused LM head, with tiles sized for CPUs.

TRL 1.16's trainers (DPO, KTO, SFT, ...) score tokens through `trl.kernels.ChunkedLogProbFunction`: the LM head is
projected tile by tile, `[TOKEN_CHUNK_SIZE tokens, _CHUNKED_LOGPROB_CHUNK_SIZE vocabulary rows]` at a time, and
folded into log-probs without the full `(tokens, vocab)` logits. TRL sizes the tiles for GPUs: 4,096 x 32,768, a
512 MB tile in fp32 (TRL's CPU fallback folds it with torch ops that make several more of that size). On a CPU that
is most of a LoRA DPO step's memory, and slower than small tiles that stay in cache:

    python bench/dpo_train.py --cases smollm2-instructions     # bench/results/dpo_train-smollm2.json

measured on SmolLM2-135M-Instruct, batch 8 chat pairs (~3,400 tokens a forward), LoRA: with TRL's tiles 7.3 GB peak
and 154 tokens/s; with 512 x 4,096 (8 MB) 3.3 GB and 229 tokens/s. In a one-off probe before that run, tiles from
256 x 4,096 to 2,048 x 8,192 all came within 10% of each other. The result is the same sums in another order
(tests/train/test_kernels.py checks log-probs and gradients against `log_softmax` of the model's own logits).

Both sizes are module globals TRL reads at call time. If a TRL release renames them, nothing is set and the run
logs that it uses TRL's tiles: slower and larger on a CPU, never wrong.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# (tokens, vocabulary rows) per tile on CPUs; None leaves TRL's own (bench/dpo_train.py's `trl-tiles` row).
CPU_TILES: tuple[int, int] | None = (512, 4096)

_SITES = (("trl.kernels.chunked_logprob", "TOKEN_CHUNK_SIZE"), ("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE"))


def size_lm_head_tiles(device_type: str) -> tuple[int, int] | None:
    """Set TRL's fused-LM-head tiles for `device_type` ("cpu": `CPU_TILES`; other devices keep TRL's). Returns the
    tiles set, or None when TRL's stay."""
    import importlib

    if device_type != "cpu" or CPU_TILES is None:
        return None
    modules = []
    for name, attr in _SITES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            module = None
        if module is None or not isinstance(getattr(module, attr, None), int):
            log.info("train: %s.%s not in this TRL; its own LM-head tiles stay (more memory on a CPU)", name, attr)
            return None
        modules.append(module)
    for module, (_, attr), size in zip(modules, _SITES, CPU_TILES, strict=True):
        setattr(module, attr, size)
    return CPU_TILES
