"""What the train stage leaves on disk, read and written after training: its checkpoints (which one a re-run
resumes from), whether a final adapter or model directory is complete, and the merged model (train/dpo.py)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from prefloop.store import atomic_dir

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(root: str | Path) -> Path | None:
    """Newest `checkpoint-N` under `root` whose `trainer_state.json` (saved last) is whole; torn ones are logged.

    transformers writes that file with a plain open + write, so a kill mid-save can leave it empty or cut short:
    present is not enough, it must parse (else every re-run would fail loading it instead of resuming)."""
    root = Path(root)
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))]
    for _, path in sorted(found, reverse=True):
        state = path / "trainer_state.json"
        if not state.is_file():
            log.warning("train: skipping %s: no trainer_state.json (the save was interrupted)", path)
            continue
        try:
            json.loads(state.read_bytes())
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            log.warning("train: skipping %s: its trainer_state.json is torn (the save was interrupted)", path)
            continue
        return path
    return None


def complete(path: Path, lora: bool) -> bool:
    """A final adapter (or full model) directory holds its config and weights."""
    if lora:
        return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    weights = ("model.safetensors", "model.safetensors.index.json")
    return (path / "config.json").is_file() and any((path / n).is_file() for n in weights)


def merge(config: Any, adapter_dir: Path, merged_dir: Path) -> None:
    """Base + adapter folded into one model (for servers without LoRA), merged in fp32, saved in the base's dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from prefloop.models import resolve_model

    model = resolve_model(config.model, dtype=config.dtype)  # the checkpoint the adapter was trained on (LoRA)
    base_dtype = getattr(AutoConfig.from_pretrained(model), "dtype", None) or torch.float32
    base_dtype = getattr(torch, base_dtype) if isinstance(base_dtype, str) else base_dtype
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().to(base_dtype)
    with atomic_dir(merged_dir) as tmp:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
    log.info("train: merged model -> %s", merged_dir)
