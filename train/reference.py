"""Which model a train run starts from and which it is measured against (its reference), in words for the logs and
summary (`describe`), and checked on the built trainer rather than assumed (`check_reference`); see train/dpo.py's
module doc for the four cases."""

from __future__ import annotations

from prefloop.train.methods import method


def describe(config) -> tuple[str, str]:
    """(policy init, reference) in words, for the start log line and the summary."""
    if not method(config.method).uses_reference:
        start = config.model if not config.lora else f"{config.model} + {config.adapter or 'new LoRA (B=0)'}"
        return start + (" (full fine-tuning)" if not config.lora else ""), f"none ({config.method} has no reference)"
    if not config.lora:
        return f"{config.model} (full fine-tuning)", f"frozen copy of {config.model}"
    if config.adapter is None:
        ref = f"{config.model} (adapter disabled)"
        if config.reference == "previous":
            ref += "; reference=previous with no adapter: the previous policy is the model itself"
        return f"{config.model} + new LoRA (B=0)", ref
    if config.reference == "previous":
        return f"{config.model} + {config.adapter}", f"frozen copy of {config.adapter} ('ref' adapter)"
    return f"{config.model} + {config.adapter}", f"{config.model} (adapters disabled)"


def check_reference(trainer, config) -> None:
    """Fail loudly if the trainer's models and adapters do not give the reference the config asks for."""
    import torch

    uses_reference = method(config.method).uses_reference
    if not config.lora:
        if uses_reference and trainer.ref_model is None:
            raise RuntimeError("full fine-tuning without a reference model copy; TRL's behaviour changed?")
        return
    model = trainer.model
    peft_config = model.peft_config
    want_ref = uses_reference and config.adapter is not None and config.reference == "previous"
    if want_ref != ("ref" in peft_config) or model.active_adapter != "default":
        raise RuntimeError(
            f"adapters {list(peft_config)} (active {model.active_adapter!r}) do not match "
            f"reference={config.reference} with adapter={config.adapter}; TRL's behaviour changed?"
        )
    params = dict(model.named_parameters())
    for name, param in params.items():
        if ".ref." in name:
            twin = params[name.replace(".ref.", ".default.")]
            if param.requires_grad or not torch.equal(param, twin):
                raise RuntimeError(f"{name}: the 'ref' adapter must be a frozen copy of the loaded adapter.")
        elif param.requires_grad and ".default." not in name:
            raise RuntimeError(f"{name} is trainable, but only the 'default' adapter should be.")
    if not any(p.requires_grad for p in params.values()):
        raise RuntimeError("no trainable parameters: the 'default' adapter is frozen.")
