"""The reward-model judge on tiny sequence-classification models built here: formatting, batching, outputs,
failures, and a Bradley-Terry RM trained with TRL that really ranks correct sums above wrong ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefloop.demo.tiny import TinyConfig, build_model, build_tokenizer
from prefloop.judge.reward_model import RewardModelJudge
from prefloop.judge.stage import JudgeConfig, run
from prefloop.runstate import read_summary
from prefloop.store import read_records


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_classifier(path: Path, num_labels: int = 1, id2label: dict | None = None, chat: bool = True) -> Path:
    """A random tiny LlamaForSequenceClassification (+ tokenizer), saved like any hub checkpoint."""
    from transformers import LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    if not chat:
        tokenizer.chat_template = None
    lm = build_model(tokenizer, TinyConfig(seed=1))
    config = lm.config
    config.num_labels = num_labels
    if id2label:
        config.id2label, config.label2id = id2label, {v: k for k, v in id2label.items()}
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm(tmp_path_factory) -> Path:
    return save_classifier(tmp_path_factory.mktemp("rm") / "rm")


def manual_score(path: Path, text: str, column: int = 0) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits[0, column].item()


def test_chat_template_formatting_is_what_gets_scored(rm):
    judge = RewardModelJudge(str(rm), dtype="float32")
    assert judge.template == "chat"
    text = judge.text("2+2=", "4")
    assert text == "user: 2+2=\nassistant: 4</s>\n"  # the RM's own template, assistant turn included
    (score, error), = judge.score(["2+2="], ["4"])
    assert error is None and score == pytest.approx(manual_score(rm, text), abs=1e-5)
    messages = [{"role": "system", "content": "be exact"}, {"role": "user", "content": "2+2="}]
    assert judge.text(messages, "4").startswith("system: be exact\nuser: 2+2=\nassistant: 4")


def test_raw_formatting_appends_eos_like_trl(tmp_path):
    path = save_classifier(tmp_path / "raw", chat=False)
    judge = RewardModelJudge(str(path), dtype="float32")
    assert judge.template == "raw" and judge.text("2+2=", "4") == "2+2=4</s>"
    (score, _), = judge.score(["2+2="], ["4"])
    assert score == pytest.approx(manual_score(path, "2+2=4</s>"), abs=1e-5)
    with pytest.raises(ValueError, match="chat template"):
        judge.score([[{"role": "user", "content": "hi"}]], ["x"])


def test_scores_do_not_depend_on_the_batch(rm):
    prompts = ["1+1=", "12+34=", "99+99=", "What is the sum of 5 and 7? Answer briefly."]
    responses = ["2", "46", "198", "It is twelve, because 5 + 7 = 12."]
    alone = [RewardModelJudge(str(rm), dtype="float32", batch_size=1).score([p], [r])[0][0]
             for p, r in zip(prompts, responses, strict=True)]
    batched = [s for s, _ in RewardModelJudge(str(rm), dtype="float32", batch_size=4).score(prompts, responses)]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), atol=1e-4, rtol=1e-4)
    assert len(set(round(s, 4) for s in alone)) == 4  # different inputs really score differently


def test_output_selects_the_head_column(tmp_path):
    path = save_classifier(tmp_path / "multi", num_labels=3, id2label={0: "helpful", 1: "honest", 2: "harmless"})
    text = RewardModelJudge(str(path), dtype="float32").text("q", "a")
    for output, column in (("2", 2), ("honest", 1), ("-1", 2)):
        (score, _), = RewardModelJudge(str(path), dtype="float32", output=output).score(["q"], ["a"])
        assert score == pytest.approx(manual_score(path, text, column), abs=1e-5)
    with pytest.raises(ValueError, match="helpful, honest, harmless"):
        RewardModelJudge(str(path), output="kind")
    with pytest.raises(ValueError, match="0..2"):
        RewardModelJudge(str(path), output="3")


def test_too_long_is_an_error_and_the_rest_is_scored(rm):
    judge = RewardModelJudge(str(rm), dtype="float32", max_length=40)
    (short, ok), (none, error) = judge.score(["1+1=", "1+1="], ["2", "x" * 100])
    assert ok is None and isinstance(short, float)
    assert none is None and "longer than the reward model's 40" in error


def write_candidates(path: Path, rows: dict) -> Path:
    path.write_text("".join(json.dumps({"id": k, "prompt": p, "completions": [
        {"text": t, "finish_reason": "stop", "num_tokens": 2} for t in ts]}) + "\n" for k, (p, ts) in rows.items()))
    return path


def test_stage_records_engine_and_caches_scores(rm, tmp_path):
    rows = {"a": ("1+1=", ["2", "3"]), "b": ("2+2=", ["4", "x" * 200])}
    candidates = write_candidates(tmp_path / "c.jsonl", rows)
    config = dict(candidates=str(candidates), judge="reward_model", reward_model=str(rm), dtype="float32",
                  cache=str(tmp_path / "cache"))
    first = run(JudgeConfig(out=str(tmp_path / "j1.jsonl"), **config))
    records = read_records(first)
    assert records[0]["judge_info"]["engine"] == "transformers" and records[0]["judge_info"]["model"] == str(rm)
    assert records[1]["statuses"] == ["ok", "error"] and records[1]["scores"][1] is None
    assert read_summary(first)["cache"] == {"hits": 0, "misses": 4}
    second = run(JudgeConfig(out=str(tmp_path / "j2.jsonl"), **config))
    assert read_summary(second)["cache"] == {"hits": 3, "misses": 1}  # the failure is asked again, not cached
    assert [r["scores"] for r in read_records(second)] == [r["scores"] for r in records]


def test_the_reward_trainer_learns_the_preference_in_its_pairs_either_way(tiny_model, tmp_path):
    """TRL's RewardTrainer through `prefloop.train.reward`, on a cue a tiny model learns in seconds (a number vs
    words), trained once each way round: each RM ranks unseen pairs as its own data taught it, so the ranking
    comes from training, not from the head's random init. The arithmetic-quality run is the soak test below."""
    import random

    from prefloop.store import dumps
    from prefloop.tasks.addition import make_prompts
    from prefloop.train.reward import RewardTrainConfig
    from prefloop.train.reward import run as train_rm

    rng = random.Random(0)
    words = ["no idea", "many", "idk", "a lot", "none"]
    train, heldout = make_prompts(256, 0, "train"), make_prompts(100, 1, "heldout")
    for name, prefer_number in (("numbers", True), ("words", False)):
        rows = [{"id": p["id"], "prompt": p["prompt"], "chosen": p["answer"], "rejected": rng.choice(words)} for p in train]
        if not prefer_number:
            rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
        (tmp_path / f"{name}.jsonl").write_text("".join(dumps(r) for r in rows))
        rm = train_rm(RewardTrainConfig(model=tiny_model, pairs=str(tmp_path / f"{name}.jsonl"),
                                        out=str(tmp_path / name), lr=1e-3, epochs=1, batch_size=16, seed=0))
        judge = RewardModelJudge(str(rm), dtype="float32", template="raw")  # as TRL formats text pairs
        texts = [p["answer"] for p in heldout] + [rng.choice(words) for _ in heldout]
        scores = judge.score([p["prompt"] for p in heldout] * 2, texts)
        judge.close()
        n = len(heldout)
        number_first = sum(scores[i][0] > scores[n + i][0] for i in range(n)) / n
        assert number_first >= 0.95 if prefer_number else number_first <= 0.05, (name, number_first)


@pytest.fixture(scope="module")
def addition_rm(tmp_path_factory) -> Path:
    from prefloop.demo.addition_rm import train_addition_rm

    return train_addition_rm(tmp_path_factory.mktemp("addition-rm") / "rm")


@pytest.mark.soak  # 5 min of pretraining: CI runs the fast reward-trainer test above, this before changing it
def test_trained_reward_model_ranks_correct_sums_first(addition_rm, capsys):
    from prefloop.demo.addition_rm import addition_pairs

    judge = RewardModelJudge(str(addition_rm), dtype="float32")
    assert judge.template == "raw"  # trained on text pairs: its tokenizer carries no chat template
    pairs = addition_pairs(600, seed=1, split="heldout")
    scores = judge.score([p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    n = len(pairs)
    accuracy = sum(scores[i][0] > scores[n + i][0] for i in range(n)) / n
    with capsys.disabled():
        print(f"\ntiny addition RM: held-out pairwise accuracy {accuracy:.3f} on {n} pairs")
    # Measured 0.79, and 0.73 in a later fresh-clone CI run (a random RM: 0.5). 0.9 is not reached by this recipe;
    # `prefloop.demo.addition_rm.stack_layers` says what limits it.
    assert accuracy > 0.7
