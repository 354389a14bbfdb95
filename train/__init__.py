"""Training stages: DPO and TRL's other preference losses, LoRA by default (see `prefloop.train.dpo`)."""
