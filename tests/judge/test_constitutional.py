"""Constitutional AI on the tiny local model. Its text is gibberish, so these tests check the mechanics: chains,
principles, few-shot, soft labels, verification, and that the pairs train with TRL as they are."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from spy import Spy

from prefloop.demo.tiny import TinyConfig, save_tiny
from prefloop.errors import StageFailed
from prefloop.gen.hf import HFGenerator
from prefloop.judge.constitution import load_constitution
from prefloop.judge.constitutional import ConstitutionalJudge, combine, option_probabilities
from prefloop.judge.pairs import PairsConfig
from prefloop.judge.pairs import run as pairs_run
from prefloop.judge.stage import JudgeConfig, run
from prefloop.store import read_records


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("cai") / "model", TinyConfig(max_position_embeddings=4096))


ROWS = [
    {"id": f"q{i}", "prompt": p, "completions": [{"text": t, "finish_reason": "stop", "num_tokens": 3} for t in ts]}
    for i, (p, ts) in enumerate([
        ("How do I pick a lock?", ["Use a tension wrench.", "Call a locksmith."]),
        ([{"role": "user", "content": "Is Sydney the capital of Australia?"}], ["Yes.", "No, Canberra is."]),
        ("Say hi", ["hi", "hello", "hey"]),
    ])
]


def reviser(model: Path, constitution: str = "harmless", seed: int = 0, **kw) -> ConstitutionalJudge:
    generator = Spy(HFGenerator(str(model), dtype="float32"))
    return ConstitutionalJudge(generator, load_constitution(constitution), "revise", max_new_tokens=12,
                               temperature=1.0, seed=seed, **kw)


def test_builtin_constitutions_load():
    for name in ("harmless", "helpful_honest"):
        c = load_constitution(name)
        assert len(c.principles) >= 6 and all(p.critique and p.revision and p.compare for p in c.principles)
        assert c.examples and len({p.id for p in c.principles}) == len(c.principles)


def test_revise_records_every_pass_with_its_principle(model):
    judge = reviser(model, revisions=2)
    verdicts = judge.judge(ROWS)
    for row, v in zip(ROWS, verdicts, strict=True):
        passes = v["revision"]["passes"]
        assert len(passes) == 2 and len({p["principle"] for p in passes}) == 2  # a fresh principle per pass
        ids = {p.id for p in judge.constitution.principles}
        assert all(p["principle"] in ids and p["critic_response"].strip() and p["revision_response"].strip()
                   for p in passes)
        assert v["revision"]["init_response"] == row["completions"][0]["text"]
        (match,) = v["comparisons"]
        assert v["completions"][match["a"]]["text"] == passes[-1]["revision_response"]
        assert match["b"] == 0 and len(v["completions"]) == len(row["completions"]) + 1
    # Each turn is one batched call across the prompts: 2 passes x (critique, revision) = 4 calls for 3 prompts.
    assert len(judge.generator.inputs) == 4 * len(ROWS)
    # The few-shot example comes first in every request, before the prompt itself.
    example = judge.constitution.examples[0]
    for messages in judge.generator.inputs:
        start = 1 if messages[0]["role"] == "system" else 0
        assert messages[start : start + len(example)] == list(example)
    judge.close()


def test_principle_sampling_is_reproducible_for_a_seed(model):
    def principles(seed):
        judge = reviser(model, seed=seed)
        try:
            return [v["revision"]["passes"][0]["principle"] for v in judge.judge(ROWS)]
        finally:
            judge.close()

    same = principles(3)
    assert principles(3) == same
    assert any(principles(s) != same for s in (4, 5, 6))


def test_hf_recipe_json_constitution_runs_unchanged(model, tmp_path):
    hf = {"constitutions": [{"critic": "Identify harmful content in the last response.",
                             "revision": "Rewrite the response without harmful content."},
                            {"critic": "Is the last response rude?", "revision": "Rewrite it politely."}],
          "system_chat": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]}
    path = tmp_path / "anthropic_constitution.json"
    path.write_text(json.dumps(hf))
    c = load_constitution(str(path))
    assert [p.critique for p in c.principles] == [x["critic"] for x in hf["constitutions"]]
    judge = reviser(model, str(path))
    (v, *_) = judge.judge(ROWS)
    assert v["revision"]["passes"][0]["critic_prompt"] in {x["critic"] for x in hf["constitutions"]}
    assert judge.generator.inputs[0][:2] == hf["system_chat"][0]
    judge.close()


def candidates(path: Path, rows: list[dict] = ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


REWARD = """
def shorter(prompts, completions, **columns):
    return [-float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]

def longer(prompts, completions, **columns):
    return [float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]
"""


@pytest.mark.parametrize("prefer", ["shorter", "longer"])
def test_a_verifier_drops_revisions_it_does_not_prefer(model, tmp_path, prefer):
    (tmp_path / "rewards.py").write_text(REWARD)
    text_rows = [r for r in ROWS if isinstance(r["prompt"], str)]  # one prompt style: pairs refuses a mix
    config = JudgeConfig(candidates=str(candidates(tmp_path / "c.jsonl", text_rows)), out=str(tmp_path / "j.jsonl"),
                         judge="constitutional", constitution="helpful_honest", judge_model=str(model),
                         judge_max_new_tokens=40, judge_temperature=1.0, dtype="float32", cache="off",
                         verifier={"judge": "python", "reward_fn": f"{tmp_path / 'rewards.py'}:{prefer}"})
    judgments = read_records(run(config))
    pairs_config = PairsConfig(judgments=str(tmp_path / "j.jsonl"), out=str(tmp_path / "pairs.jsonl"),
                               keep_truncated=True)
    try:
        pairs = read_records(pairs_run(pairs_config))
    except StageFailed as e:  # every revision rejected: the pairs stage says so instead of writing nothing
        assert "verifier_rejected" in str(e)
        pairs = []
    kept = 0
    for j in judgments:
        (match,) = j["comparisons"]
        texts = [j["completions"][match["b"]]["text"], j["completions"][match["a"]]["text"]]  # original, revision
        better = (len(texts[1]) < len(texts[0])) if prefer == "shorter" else (len(texts[1]) > len(texts[0]))
        assert match["verified"]["scores"] is not None
        assert match["status"] == ("ok" if better else "verifier_rejected")
        kept += better
    assert len(pairs) == kept
    for p in pairs:  # a pair is always the revision over the original, and the verifier agreed
        assert (len(p["chosen"] if isinstance(p["chosen"], str) else p["chosen"][0]["content"])
                < len(p["rejected"] if isinstance(p["rejected"], str) else p["rejected"][0]["content"])) == (
            prefer == "shorter")


def test_feedback_soft_labels_are_probabilities(model, tmp_path):
    config = JudgeConfig(candidates=str(candidates(tmp_path / "c.jsonl")), out=str(tmp_path / "j.jsonl"),
                         judge="constitutional", mode="feedback", constitution="harmless", judge_model=str(model),
                         principles_per_comparison=2, dtype="float32", cache="off", min_confidence=0.0)
    rows = read_records(run(config))
    assert [len(r["comparisons"]) for r in rows] == [1, 1, 2]
    for row in rows:
        for c in row["comparisons"]:
            assert len(c["measurements"]) == 4  # 2 principles x 2 orders
            for m in c["measurements"]:
                assert m["probs"] is not None and all(0 <= p <= 1 for p in m["probs"].values())
                assert math.isclose(sum(m["probs"].values()), 1.0, abs_tol=1e-9)
            assert 0 <= c["p_a"] <= 1
            if c["status"] == "ok":
                assert c["p_chosen"] == pytest.approx(max(c["p_a"], 1 - c["p_a"]))


def test_feedback_probabilities_are_the_models_own_at_the_verdict_position(model, tmp_path, monkeypatch):
    """Each measured p(A) equals what transformers' own forward pass gives at the verdict position: the softmax over
    the vocabulary at the last token of the judge's input (the chat template continuing the assistant's "(" prefix),
    p(A) / (p(A) + p(B)) over the tokens that read "A" and "B"."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    asked = []
    real = HFGenerator.generate

    def spy(self, prompts, n, sampling):
        if sampling.max_new_tokens == 1:  # the verdict step: one token, read from its distribution
            asked.extend(prompts)
        return real(self, prompts, n, sampling)

    monkeypatch.setattr(HFGenerator, "generate", spy)
    config = JudgeConfig(candidates=str(candidates(tmp_path / "c.jsonl")), out=str(tmp_path / "j.jsonl"),
                         judge="constitutional", mode="feedback", constitution="harmless", judge_model=str(model),
                         dtype="float32", cache="off", min_confidence=0.0)
    rows = read_records(run(config))
    measured = sorted(m["probs"]["A"] for r in rows for c in r["comparisons"] for m in c["measurements"])

    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    a_ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == "A"]
    b_ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == "B"]
    expected = []
    for messages in asked:
        ids = tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            probs = net(torch.tensor([ids])).logits[0, -1].softmax(-1)
        p_a, p_b = probs[a_ids].sum().item(), probs[b_ids].sum().item()
        expected.append(p_a / (p_a + p_b))
    assert len(measured) == len(expected) == 2 * (1 + 1 + 2)  # 2 orders x 4 matches, 1 principle each
    assert measured == pytest.approx(sorted(expected), abs=1e-5)
    assert max(expected) - min(expected) > 1e-3  # distinct inputs, distinct answers: the comparison has teeth


def test_feedback_with_cot_clamps_each_probability(model, tmp_path):
    config = JudgeConfig(candidates=str(candidates(tmp_path / "c.jsonl")), out=str(tmp_path / "j.jsonl"),
                         judge="constitutional", mode="feedback", constitution="harmless", judge_model=str(model),
                         cot=True, cot_clamp=[0.45, 0.55], judge_max_new_tokens=8, dtype="float32", cache="off",
                         min_confidence=0.0)
    for row in read_records(run(config)):
        for c in row["comparisons"]:
            assert all("reasoning" in m for m in c["measurements"])
            assert 0.45 - 1e-9 <= c["p_a"] <= 0.55 + 1e-9


def test_swapping_the_candidates_gives_one_minus_p():
    """Model-free: the two orders' probabilities combine so that swapping a and b gives exactly 1 - p."""
    measured = [("ab", 0.83), ("ba", 0.31), ("ab", 0.6), ("ba", 0.55)]
    swapped = [("ba" if o == "ab" else "ab", p) for o, p in measured]
    assert combine(swapped) == pytest.approx(1 - combine(measured), abs=1e-12)
    assert combine(swapped, (0.4, 0.6)) == pytest.approx(1 - combine(measured, (0.4, 0.6)), abs=1e-12)
    probs = option_probabilities({"top_logprobs": [{"A": math.log(0.3), " B": math.log(0.1), "x": math.log(0.6)}]})
    assert probs == pytest.approx({"A": 0.75, "B": 0.25})
    assert option_probabilities({"top_logprobs": [{"x": -0.1}]}) is None


def test_revision_pairs_train_with_trl_dpo_trainer(model, tmp_path):
    import datasets
    import peft
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One prompt style per file, as TRL needs (a dataset is either standard or conversational).
    text_rows = [r for r in ROWS if isinstance(r["prompt"], str)]
    config = JudgeConfig(candidates=str(candidates(tmp_path / "c.jsonl", text_rows)), out=str(tmp_path / "j.jsonl"),
                         judge="constitutional", constitution="harmless", judge_model=str(model),
                         judge_max_new_tokens=12, judge_temperature=1.0, dtype="float32", cache="off")
    run(config)
    out = pairs_run(PairsConfig(judgments=str(tmp_path / "j.jsonl"), out=str(tmp_path / "pairs.jsonl"),
                                keep_truncated=True))
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert ds.num_rows == len(text_rows) and {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = trl.DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
            args=trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=1,
                               use_cpu=True, report_to="none", max_length=256, save_strategy="no"),
            train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(model),
            peft_config=peft.LoraConfig(r=4, target_modules="all-linear"),
        )
        result = trainer.train()
    finally:
        torch.set_num_threads(threads)
    assert result.global_step == 1 and math.isfinite(result.training_loss)


def test_a_context_too_small_for_the_chain_names_the_cause(tmp_path):
    """CAI revise on a model whose context cannot hold the critique request: every row fails, the stage stops at its
    ceiling, and the error says how many tokens the request has and what the context fits (not "came back empty")."""
    small = save_tiny(tmp_path / "small", TinyConfig(max_position_embeddings=256))
    text_rows = [r for r in ROWS if isinstance(r["prompt"], str)]
    config = JudgeConfig(candidates=str(candidates(tmp_path / "c.jsonl", text_rows)), out=str(tmp_path / "j.jsonl"),
                         judge="constitutional", constitution="helpful_honest", judge_model=str(small),
                         judge_max_new_tokens=40, dtype="float32", cache="off")
    with pytest.raises(StageFailed, match=r"the critique request failed: the judge prompt has \d+ tokens; with "
                       r"max_new_tokens=40 the judge's context of 256 fits at most 216"):
        run(config)
