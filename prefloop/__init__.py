"""prefloop: make preference data and train on it, in rounds.

    prompts -> gen -> candidates -> judge -> judgments -> pairs -> train -> policy(k+1) -> gen ...

Each stage is `run(config) -> output path` behind a dataclass config; `prefloop.cli` is a thin layer over them.
"""

__version__ = "0.1.0"
