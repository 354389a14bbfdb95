"""The demos and the test fixtures that build models: a layer of their own, above the loop (docs/architecture.md).

- `addition`: `prefloop demo` (the default task): a tiny model taught addition to a weak start, improved by the loop.
- `instructions`: `prefloop demo --task instructions`: SmolLM2-135M-Instruct on verifiable instructions.
- `pretrain`: teaches the tiny model 2-digit addition (`python -m prefloop.demo.pretrain DIR`).
- `tiny`: builds tiny Llama models and their tokenizer with no downloads (the fast mechanics tests use them).
- `addition_rm`: the tiny addition reward model (the reward trainer's quality test).

Nothing below this package imports it; the tasks it runs (`prefloop.tasks.addition`, `prefloop.tasks.instructions`)
are plain prompt generators and verifiers, reached by the stages only by name (`--reward-fn module:function`).
"""
