"""Pretraining the demo's weak start (prefloop/demo/pretrain.py): loss masking, determinism, atomic save, decoding.

PYTHONPATH=. python -m pytest tests/demo/test_pretrain.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefloop.demo import pretrain as pt
from prefloop.demo.tiny import TinyConfig, build_model, build_tokenizer
from prefloop.tasks.addition import make_prompts

STEPS = 30


def _state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrain")
    quiet = lambda msg: None  # noqa: E731
    return {
        name: pt.pretrain(root / name, steps=STEPS, seed=seed, log=quiet)
        for name, seed in [("a", 0), ("b", 0), ("c", 1)]
    }


def test_labels_cover_only_answer_and_eos():
    """The prompt is context, not a target: labels are -100 on prompt and padding, and the answer+EOS are trained."""
    tok = build_tokenizer()
    records = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "12+34=", "answer": "46"}]
    input_ids, mask, labels = pt._batch(*pt.encode_examples(tok, records), tok.pad_token_id)
    assert tok.decode(input_ids[1]) == "12+34=46" + tok.eos_token  # raw text: no BOS, no chat template
    assert labels[0].tolist() == [-100] * 4 + tok.convert_tokens_to_ids(["3", tok.eos_token]) + [-100] * 3
    assert labels[1].tolist() == [-100] * 6 + tok.convert_tokens_to_ids(["4", "6", tok.eos_token])
    assert mask.sum(1).tolist() == [6, 9]


def test_pretrain_writes_a_loadable_model_dir(runs):
    """out_dir loads with AutoModelForCausalLM/AutoTokenizer by path and records what was run in pretrain.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(runs["a"])
    tok = AutoTokenizer.from_pretrained(runs["a"])
    assert model.config.vocab_size == len(tok)
    summary = json.loads((runs["a"] / "pretrain.json").read_text())
    assert summary["steps"] == STEPS and summary["stopped"] == "max_steps" and len(summary["losses"]) == STEPS
    assert not [p for p in runs["a"].parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_pretrain_is_deterministic_per_seed(runs):
    """The same seed gives bit-identical weights; another seed gives different ones."""
    a, b, c = (_state(runs[k]) for k in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pretrain_lowers_the_loss_and_changes_the_weights(runs):
    """Training works: the loss of the last steps is below that of the first, and the weights moved from the init."""
    losses = json.loads((runs["a"] / "pretrain.json").read_text())["losses"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    init = build_model(build_tokenizer(), TinyConfig(seed=0)).state_dict()
    trained = _state(runs["a"])
    assert not torch.equal(init["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])


def test_failed_save_keeps_the_previous_model_dir(runs, tmp_path, monkeypatch):
    """A crash while saving leaves the existing out_dir untouched (written to a temp dir, then os.replace)."""
    from transformers import LlamaForCausalLM

    out = tmp_path / "model"
    pt.pretrain(out, steps=2, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(self, path, *args, **kwargs):
        (Path(path) / "model.safetensors").write_bytes(b"torn")
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="mid-save"):
        pt.pretrain(out, steps=2, seed=5, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_batched_left_padded_greedy_matches_one_by_one(runs):
    """Greedy decoding in left-padded batches gives the same completions as one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(runs["a"]), AutoTokenizer.from_pretrained(runs["a"])
    prompts = ["1+2=", "12+34=", "5+67=", "99+99=", "0+0="]
    assert pt._generate(model, tok, prompts, batch_size=5, do_sample=False) == [
        pt._generate(model, tok, [p], batch_size=1, do_sample=False)[0] for p in prompts
    ]


def test_accuracy_counts_stripped_exact_matches(runs):
    """accuracy() is the share of records whose greedy completion, stripped, equals the answer (same as the probe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(runs["a"]), AutoTokenizer.from_pretrained(runs["a"])
    records = make_prompts(8, seed=0, split="heldout")
    outputs = [t.strip() for t in pt._generate(model, tok, [r["prompt"] for r in records], 8, do_sample=False)]
    graded = [{**r, "answer": o if i % 2 else o + "0"} for i, (r, o) in enumerate(zip(records, outputs, strict=True))]
    assert pt.accuracy(model, tok, graded, batch_size=3) == 0.5
    assert pt.accuracy(runs["a"], None, graded) == 0.5  # by path too
