"""Demo and test tasks shipped with prefloop: prompt generators with verifiers in TRL's reward-function convention.

Each task module is pure Python (no models, no downloads): it makes prompt rows in prefloop's prompt format and
scores answers with a function the `python` judge loads as `--reward-fn prefloop.tasks.<module>:<function>`.

- `instructions`: verifiable instruction following in the spirit of IFEval (a request plus checkable constraints).
- `word_problems`: one-step arithmetic stories with a numeric answer (the third task behind the train defaults).
"""
