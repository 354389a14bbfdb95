"""`prefloop export`: every format from judgments and from pairs (standard and conversational) against hand-written
rows, TRL's KTO and SFT trainers on the exports, LLaMA-Factory's and axolotl's layouts, the dataset card, the disk
copy, the hub push (captured, and failing offline), and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefloop.cli import main
from prefloop.config import ConfigError
from prefloop.errors import StageFailed
from prefloop.judge.export import ExportConfig, run
from prefloop.judge.pairs import PairsConfig
from prefloop.judge.pairs import run as run_pairs
from prefloop.runstate import ConfigDriftError, read_summary
from prefloop.store import InputError

SYSTEM = {"role": "system", "content": "Answer with digits."}
JUDGE = "python:rewards.py:exact"


def msgs(text: str, system: bool = False) -> list[dict]:
    return [SYSTEM] * system + [{"role": "user", "content": text}]


def bot(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def judgment(rid, prompt, texts, scores, finish=None, statuses=None) -> dict:
    """One judgments record as `prefloop judge` writes it (a None score is a failed judgment)."""
    statuses = statuses or ["ok" if s is not None else "error" for s in scores]
    return {
        "id": rid,
        "prompt": prompt,
        "judge": JUDGE,
        "scores": scores,
        "statuses": statuses,
        "completions": [
            {"text": t, "finish_reason": f, "num_tokens": len(t)}
            for t, f in zip(texts, finish or ["stop"] * len(texts), strict=True)
        ],
        "errors": [None if st == "ok" else "reward function returned None" for st in statuses],
    }


def judgments(conv: bool) -> list[dict]:
    p = (lambda t: msgs(t)) if conv else (lambda t: t)
    return [
        judgment(
            "a",
            p("2+2="),
            ["5", "4", "4", "44", ""],
            [0.0, 1.0, 1.0, 2.0, 0.5],
            finish=["stop", "stop", "stop", "length", "stop"],
        ),
        judgment("b", p("3+3="), ["6", "7", "x"], [None, 0.0, 0.0]),
        judgment("c", p("1+1="), ["2", "3"], [1.0, 0.0]),
    ]


def pair(rid, prompt, chosen, rejected, sc, sr, ci, ri, conv) -> dict:
    meta = {
        "judge": JUDGE,
        "round": 1,
        "strategy": "all_above_margin",
        "config_hash": "aaaaaaaaaaaa",
        "judge_config_hash": "bbbbbbbbbbbb",
        "chosen_index": ci,
        "rejected_index": ri,
    }
    wrap = bot if conv else (lambda t: t)
    return {
        "id": rid,
        "prompt": prompt,
        "chosen": wrap(chosen),
        "rejected": wrap(rejected),
        "score_chosen": sc,
        "score_rejected": sr,
        "margin": sc - sr,
        "meta": meta,
    }


def pairs(conv: bool) -> list[dict]:
    """Prompt a: one pair; prompt b: all_above_margin over "6" (2) > "66" (1) > "7" (0)."""
    a, b = (msgs("2+2=", system=True), msgs("3+3=")) if conv else ("2+2=", "3+3=")
    return [
        pair("a", a, "4", "5", 1.0, 0.0, 1, 0, conv),
        pair("b:0>1", b, "6", "66", 2.0, 1.0, 0, 1, conv),
        pair("b:0>2", b, "6", "7", 2.0, 0.0, 0, 2, conv),
        pair("b:1>2", b, "66", "7", 1.0, 0.0, 1, 2, conv),
    ]


def expected(kind: str, fmt: str, conv: bool) -> list[dict]:
    """The rows each export must write, by hand."""
    ans = bot if conv else (lambda t: t)
    if kind == "judgments":
        p = (lambda t: msgs(t)) if conv else (lambda t: t)
        if fmt == "kto":  # --threshold 1: "4" (1.0) and "2" (1.0) desirable; a repeat, a truncated and a failed out
            return [
                {"prompt": p(q), "completion": ans(c), "label": lab}
                for q, c, lab in [
                    ("2+2=", "5", False),
                    ("2+2=", "4", True),
                    ("3+3=", "7", False),
                    ("3+3=", "x", False),
                    ("1+1=", "2", True),
                    ("1+1=", "3", False),
                ]
            ]
        if fmt == "sft":  # --threshold 1: b's best (0.0, the lower index of a tie) is below it
            return [{"prompt": p("2+2="), "completion": ans("4")}, {"prompt": p("1+1="), "completion": ans("2")}]

        def cand(i, text, score, status="ok", error=None, finish="stop"):
            return {
                "index": i,
                "text": text,
                "score": score,
                "status": status,
                "error": error,
                "finish_reason": finish,
            }

        ranked = {  # best first, ties in index order, failed judgments last
            "2+2=": [(3, "44", 2.0, "ok", None, "length"), (1, "4", 1.0), (2, "4", 1.0), (4, "", 0.5), (0, "5", 0.0)],
            "3+3=": [(1, "7", 0.0), (2, "x", 0.0), (0, "6", None, "error", "reward function returned None")],
            "1+1=": [(0, "2", 1.0), (1, "3", 0.0)],
        }
        return [
            {"id": rid, "prompt": p(q), "judge": JUDGE, "candidates": [cand(*c) for c in ranked[q]]}
            for rid, q in zip("abc", ranked, strict=True)
        ]
    a, b = (msgs("2+2=", system=True), msgs("3+3=")) if conv else ("2+2=", "3+3=")
    if fmt == "kto":  # "66" is chosen once and rejected once: no absolute label
        return [
            {"prompt": q, "completion": ans(c), "label": lab}
            for q, c, lab in [(a, "4", True), (a, "5", False), (b, "6", True), (b, "7", False)]
        ]
    if fmt == "sft":
        return [{"prompt": a, "completion": ans("4")}, {"prompt": b, "completion": ans("6")}]
    if fmt == "axolotl":
        return [
            {
                "messages": q if conv else msgs(q),
                "chosen": {"role": "assistant", "content": c},
                "rejected": {"role": "assistant", "content": r},
            }
            for q, c, r in [(a, "4", "5"), (b, "6", "66"), (b, "6", "7"), (b, "66", "7")]
        ]
    rows = [
        {
            "conversations": [{"from": "human", "value": q}],
            "chosen": {"from": "gpt", "value": c},
            "rejected": {"from": "gpt", "value": r},
        }
        for q, c, r in [("2+2=", "4", "5"), ("3+3=", "6", "66"), ("3+3=", "6", "7"), ("3+3=", "66", "7")]
    ]
    if conv:
        rows[0]["system"] = "Answer with digits."
    return rows


def export(tmp_path: Path, src: Path, fmt: str, file: str | None = None, **kw) -> Path:
    return run(ExportConfig(input=str(src), out=str(tmp_path / (file or f"{fmt}.jsonl")), format=fmt, **kw))


CASES = [
    ("judgments", "kto"),
    ("judgments", "sft"),
    ("judgments", "ranked"),
    ("pairs", "kto"),
    ("pairs", "sft"),
    ("pairs", "llamafactory"),
    ("pairs", "axolotl"),
]


@pytest.mark.parametrize("conv", [False, True], ids=["standard", "conversational"])
@pytest.mark.parametrize(("kind", "fmt"), CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_each_format_writes_the_expected_rows_and_loads_with_datasets(tmp_path, kind, fmt, conv):
    """Every format, from both inputs and both prompt styles, is exactly the hand-written rows; it loads with
    `load_dataset("json")`; the summary counts rows in, rows out and skips by reason."""
    import datasets

    src = write_jsonl(tmp_path / f"{kind}.jsonl", judgments(conv) if kind == "judgments" else pairs(conv))
    threshold = 1.0 if kind == "judgments" and fmt in ("kto", "sft") else None
    out = export(tmp_path, src, fmt, threshold=threshold)
    assert read_jsonl(out) == expected(kind, fmt, conv)
    ds = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(expected(kind, fmt, conv))
    summary = read_summary(out)
    assert summary["status"] == "done" and summary["rows_in"] == (3 if kind == "judgments" else 4)
    assert summary["rows_out"] == ds.num_rows
    skips = {
        ("judgments", "kto"): {"empty": 1, "identical": 1, "judge_failed": 1, "truncated": 1},
        ("judgments", "sft"): {"below_threshold": 1},
        ("pairs", "kto"): {"conflicting_labels": 2, "duplicate": 2},
        ("pairs", "sft"): {"same_prompt": 2},
    }
    assert summary["skipped"] == skips.get((kind, fmt), {})


def test_sft_options_keep_truncated_messages_style_and_pair_threshold(tmp_path):
    """--keep-truncated lets a truncated best answer win; --sft-style messages writes one conversation per prompt (a
    text prompt as a user turn); --threshold on pairs reads score_chosen."""
    src = write_jsonl(tmp_path / "j.jsonl", judgments(conv=False))
    out = export(tmp_path, src, "sft", "keep.jsonl", keep_truncated=True)
    assert [r["completion"] for r in read_jsonl(out)] == ["44", "7", "2"]
    out = export(tmp_path, src, "sft", "messages.jsonl", sft_style="messages")
    assert read_jsonl(out)[0] == {"messages": [*msgs("2+2="), *bot("4")]}
    conv_pairs = write_jsonl(tmp_path / "p.jsonl", pairs(conv=True))
    out = export(tmp_path, conv_pairs, "sft", "pm.jsonl", sft_style="messages", threshold=1.5)
    assert read_jsonl(out) == [{"messages": [*msgs("3+3="), *bot("6")]}]
    assert read_summary(out)["skipped"] == {"below_threshold": 1, "same_prompt": 2}


def test_kto_both_labels_keeps_only_prompts_whose_answers_pass_and_fail(tmp_path):
    """--both-labels (the loop's `kto_threshold`): at threshold 1, prompt b's answers all fail (7, x; its first
    failed to judge), so its two rows go (one_label_prompt); a and c, with answers on both sides, stay whole. A pairs
    file or another format is refused."""
    src = write_jsonl(tmp_path / "j.jsonl", judgments(conv=False))
    out = export(tmp_path, src, "kto", threshold=1.0, both_labels=True)
    everything = expected("judgments", "kto", False)
    assert read_jsonl(out) == [r for r in everything if r["prompt"] != "3+3="]
    assert read_summary(out)["skipped"] == {"empty": 1, "identical": 1, "judge_failed": 1, "one_label_prompt": 2,
                                            "truncated": 1}
    with pytest.raises(ConfigError, match="this is a pairs file"):
        export(tmp_path, write_jsonl(tmp_path / "p.jsonl", pairs(conv=False)), "kto", "pk.jsonl", both_labels=True)
    with pytest.raises(ConfigError, match="--both-labels applies to --format kto, not sft"):
        ExportConfig(input=str(src), out=str(tmp_path / "s.jsonl"), format="sft", both_labels=True)


@pytest.mark.parametrize("conv", [False, True], ids=["standard", "conversational"])
def test_groups_keep_every_answer_of_prompts_whose_answers_score_differently(tmp_path, conv):
    """--format groups (train --method grpo): a's five answers stay whole, the repeated "4", the truncated "44" (marked)
    and the empty one included, as GRPO scores them; b, with an answer that failed judging, and d, whose answers all
    score the same, are skipped by name (d kept with keep_equal_rewards). A pairs file and a threshold are refused."""
    rows = [*judgments(conv), judgment("d", msgs("5+5=") if conv else "5+5=", ["10", "11"], [0.5, 0.5])]
    out = export(tmp_path, write_jsonl(tmp_path / "j.jsonl", rows), "groups")
    p = (lambda t: msgs(t)) if conv else (lambda t: t)
    assert read_jsonl(out) == [
        {"prompt": p("2+2="), "completions": ["5", "4", "4", "44", ""], "rewards": [0.0, 1.0, 1.0, 2.0, 0.5],
         "truncated": [False, False, False, True, False]},
        {"prompt": p("1+1="), "completions": ["2", "3"], "rewards": [1.0, 0.0], "truncated": [False, False]},
    ]
    assert read_summary(out)["skipped"] == {"equal_rewards": 1, "incomplete_group": 1}
    kept = export(tmp_path, tmp_path / "j.jsonl", "groups", "ke.jsonl", keep_equal_rewards=True)  # as TRL's batches
    assert read_jsonl(kept) == [*read_jsonl(out), {"prompt": p("5+5="), "completions": ["10", "11"],
                                                   "rewards": [0.5, 0.5], "truncated": [False, False]}]
    assert read_summary(kept)["skipped"] == {"incomplete_group": 1}
    with pytest.raises(ConfigError, match="--keep-equal-rewards applies to --format groups, not kto"):
        export(tmp_path, tmp_path / "j.jsonl", "kto", "kk.jsonl", threshold=1.0, keep_equal_rewards=True)
    with pytest.raises(ConfigError, match="export the judgments file"):
        export(tmp_path, write_jsonl(tmp_path / "p.jsonl", pairs(conv)), "groups", "pg.jsonl")
    with pytest.raises(ConfigError, match="--threshold does not apply to --format groups"):
        export(tmp_path, tmp_path / "j.jsonl", "groups", "tg.jsonl", threshold=1.0)


# --- TRL trains one step on the kto and sft exports, unconverted ----------------------------------------------------


def addition_pairs(conv: bool) -> list[dict]:
    return [
        pair(f"r{i}", msgs(f"{i}+{i}=") if conv else f"{i}+{i}=", str(2 * i), str(2 * i + 1), 1.0, 0.0, 0, 1, conv)
        for i in range(4)
    ]


@pytest.mark.parametrize(("fmt", "conv"), [("kto", True), ("sft", False)], ids=["kto-conversational", "sft-standard"])
def test_exports_train_one_step_with_trl(tmp_path, tiny_model, fmt, conv):
    """The kto export (conversational) trains one step of TRL's KTOTrainer, the sft export (standard) one step of
    its SFTTrainer, as `load_dataset("json")` reads them, unconverted."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(conv))
    ds = datasets.load_dataset(
        "json", data_files=str(export(tmp_path, src, fmt)), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds.num_rows == (8 if fmt == "kto" else 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        common = dict(
            output_dir=str(tmp_path / "out"),
            max_steps=1,
            per_device_train_batch_size=4,
            use_cpu=True,
            report_to=[],
            max_length=64,
            save_strategy="no",
            logging_steps=1,
        )
        if fmt == "kto":
            trainer = trl.KTOTrainer(
                model=model, args=trl.KTOConfig(**common), train_dataset=ds, processing_class=tokenizer
            )
        else:
            trainer = trl.SFTTrainer(
                model=model, args=trl.SFTConfig(**common), train_dataset=ds, processing_class=tokenizer
            )
        result = trainer.train()
    finally:
        torch.set_num_threads(threads)
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))


# --- chat-template arguments (tools, enable_thinking) stay with the prompts they rendered ----------------------------


def tool_pairs() -> list[dict]:
    """Pairs as `prefloop pairs` writes them for prompts generated with tools and enable_thinking=false; the last two
    are one prompt and one answer text under two different tool lists."""
    from toolchat import tool

    history = [{"role": "user", "content": "0+0="}, {"role": "assistant", "content": "0"}]
    rows = [pair(f"p{i}", [*history, *msgs(f"{i}+1=")], str(i + 1), str(i + 2), 1.0, 0.0, 0, 1, True) for i in range(3)]
    for row, tools in zip(rows, ([tool("add")], [tool("add")], [tool("mul")]), strict=True):
        row.update(tools=json.dumps(tools), chat_template_kwargs={"enable_thinking": False})
    rows[2]["prompt"], rows[2]["chosen"] = rows[1]["prompt"], rows[1]["chosen"]
    return rows


@pytest.mark.parametrize(("fmt", "ids"), [("kto", "prompt_ids"), ("sft", "input_ids")])
def test_kto_and_sft_exports_keep_the_tools_and_trl_renders_with_them(tmp_path, fmt, ids):
    """The rows keep `tools` and `chat_template_kwargs`; the same prompt and answer under other tools stays a row of
    its own (not a duplicate); TRL's own trainer, reading the export with `load_dataset("json")`, tokenizes the
    prompts through the chat template with those tools and arguments (the template writes them as a first line)."""
    import datasets
    import trl
    from toolchat import save_tool_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = tool_pairs()
    out = export(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", rows), fmt)
    written = read_jsonl(out)
    assert [(r["tools"], r["chat_template_kwargs"]) for r in written] == [
        (p["tools"], {"enable_thinking": False}) for p in (rows if fmt == "sft" else [x for p in rows for x in (p, p)])
    ]
    assert read_summary(out)["skipped"] == {} and "template_args_not_kept" not in read_summary(out)

    model_dir = save_tool_model(tmp_path / "tool-model")
    ds = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    common = dict(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                  report_to=[], max_length=128, save_strategy="no")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    if fmt == "kto":
        trainer = trl.KTOTrainer(model=model, args=trl.KTOConfig(**common), train_dataset=ds, processing_class=tokenizer)
    else:
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common), train_dataset=ds, processing_class=tokenizer)
    rendered = [tokenizer.decode(example[ids]) for example in trainer.train_dataset]
    assert [r.split("\n")[:2] for r in rendered] == [
        [f"tools: {json.loads(r['tools'])[0]['function']['name']}", "no-think"] for r in written
    ]


@pytest.mark.parametrize("fmt", ["llamafactory", "axolotl"])
def test_formats_without_a_field_for_template_arguments_count_them_and_keep_the_rows(tmp_path, fmt, caplog):
    """llamafactory keeps `tools` (its `tools` column, mapped in dataset_info.json) but has no field for
    enable_thinking; axolotl rows hold neither: every row is written, and the summary and a warning say so."""
    rows = tool_pairs()
    with caplog.at_level("WARNING"):
        out = export(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", rows), fmt)
    written, summary = read_jsonl(out), read_summary(out)
    assert len(written) == 3 and summary["template_args_not_kept"] == 3
    if fmt == "llamafactory":
        assert [r["tools"] for r in written] == [p["tools"] for p in rows]
        assert json.loads((tmp_path / "dataset_info.json").read_text())["llamafactory"]["columns"]["tools"] == "tools"
        assert "(enable_thinking)" in caplog.text
    else:
        assert all("tools" not in r for r in written) and "(enable_thinking, tools)" in caplog.text


# --- LLaMA-Factory and axolotl: their documented layouts and the files beside the output --------------------------


def test_llamafactory_dataset_info_is_merged_never_clobbered(tmp_path):
    """dataset_info.json gets the sharegpt ranking entry (system mapped only when rows have one), keeps other
    entries, and refuses a name already used for another file; unrepresentable conversations are skipped."""
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    rows = pairs(conv=True) + [pair("z", [*msgs("hi"), *msgs("again")], "a", "b", 1.0, 0.0, 0, 1, True)]
    out = export(tmp_path, write_jsonl(tmp_path / "p.jsonl", rows), "llamafactory", "prefs.jsonl")
    assert read_summary(out)["skipped"] == {"turns_not_alternating": 1}
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": "system"}
    assert json.loads(info.read_text()) == {
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "prefs": {"file_name": "prefs.jsonl", "formatting": "sharegpt", "ranking": True, "columns": columns},
    }
    export(tmp_path, write_jsonl(tmp_path / "s.jsonl", pairs(conv=False)), "llamafactory", "std.jsonl", name="std")
    entries = json.loads(info.read_text())
    assert set(entries) == {"alpaca_en_demo", "prefs", "std"} and "system" not in entries["std"]["columns"]
    with pytest.raises(ConfigError, match="already has a dataset 'prefs'.*Fix: pass --name"):
        export(tmp_path, tmp_path / "s.jsonl", "llamafactory", "other.jsonl", name="prefs")
    assert not (tmp_path / "other.jsonl").exists()


def test_axolotl_snippet_names_the_file(tmp_path):
    out = export(tmp_path, write_jsonl(tmp_path / "p.jsonl", pairs(conv=False)), "axolotl", "axo.jsonl")
    snippet = yaml.safe_load((tmp_path / "axo.axolotl.yaml").read_text())
    assert snippet == {
        "rl": "dpo",
        "datasets": [
            {
                "path": str(out.resolve()),
                "split": "train",
                "type": "chat_template.default",
                "field_messages": "messages",
                "field_chosen": "chosen",
                "field_rejected": "rejected",
                "message_property_mappings": {"role": "role", "content": "content"},
            }
        ],
    }


# --- the dataset card, save_to_disk and the hub -----------------------------------------------------------------------


def made_by_the_stages(tmp_path: Path) -> Path:
    """A pairs file written by the real pairs stage from judgments with the sidecars judge and generate leave."""
    (tmp_path / "c.config.yaml").write_text(yaml.safe_dump({"model": "my-policy", "n": 5, "temperature": 1.0}))
    src = write_jsonl(tmp_path / "j.jsonl", judgments(conv=False))
    (tmp_path / "j.config.yaml").write_text(
        yaml.safe_dump({"candidates": str(tmp_path / "c.jsonl"), "judge": "python", "reward_fn": "rewards.py:exact"})
    )
    (tmp_path / "j.summary.json").write_text(json.dumps({"status": "done", "stats": {"tie_rate": 0.0}}))
    return run_pairs(PairsConfig(judgments=str(src), out=str(tmp_path / "pairs.jsonl"), round=1))


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_to_disk_writes_the_rows_and_a_card_with_provenance(tmp_path):
    import datasets

    src = made_by_the_stages(tmp_path)
    disk = tmp_path / "disk"
    out = export(tmp_path, src, "kto", save_to_disk=str(disk), license="apache-2.0")
    assert datasets.load_from_disk(str(disk))["train"].to_list() == read_jsonl(out)
    card = (disk / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["task_categories"] == ["text-generation"]
    assert meta["tags"][:2] == ["prefloop", "kto"] and meta["size_categories"] == ["n<1K"]
    assert meta["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "train/data-*.arrow"}]}
    ]
    for text in (
        "`python:rewards.py:exact`",
        "reward_fn rewards.py:exact",
        "Pair strategy: best_worst",
        "model my-policy",
        "| tie_rate | 0.0 |",
        "Rows in (pairs): 2",
        "Rows out: 4",
        "Dropped by the pairs stage: empty 1, identical 1, judge_failed 1, tie 1, truncated 1",
        "| desirable |",
    ):
        assert text in card, text
    reloaded = datasets.load_dataset(str(disk), split="train", cache_dir=str(tmp_path / "hf"))
    assert reloaded.num_rows == 4  # the card's data_files point at the rows


def test_card_from_judgments_has_the_judge_statistics(tmp_path):
    from prefloop.judge.card import card_text, provenance
    from prefloop.judge.stats import judge_stats

    rows = judgments(conv=False)
    facts = provenance(write_jsonl(tmp_path / "j.jsonl", rows), "judgments", rows)
    assert facts["stats"] == judge_stats(rows) and facts["judges"] == [JUDGE]
    config = ExportConfig(input=str(tmp_path / "j.jsonl"), out=str(tmp_path / "r.jsonl"), format="ranked")
    card = card_text(config, "judgments", facts, {"rows_in": 3, "rows_out": 3}, "data/train-*", "x")
    assert "| error_rate | 0.1 |" in card and "Pair strategy: none" in card
    assert front_matter(card)["tags"] == ["prefloop", "ranking", "reward-modeling"]


def test_push_to_hub_sends_the_dataset_and_its_card(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        datasets.DatasetDict,
        "push_to_hub",
        lambda self, repo_id, **kw: calls.append(("data", repo_id, kw, self["train"].num_rows)),
    )
    monkeypatch.setattr(
        huggingface_hub.DatasetCard,
        "push_to_hub",
        lambda self, repo_id, **kw: calls.append(("card", repo_id, kw, str(self))),
    )
    export(
        tmp_path, write_jsonl(tmp_path / "p.jsonl", pairs(conv=True)), "axolotl", push_to_hub="me/prefs", private=True
    )
    assert calls[0] == ("data", "me/prefs", {"private": True}, 4)
    assert calls[1][:3] == ("card", "me/prefs", {"repo_type": "dataset"})
    assert front_matter(calls[1][3])["configs"][0]["data_files"][0]["path"] == "data/train-*"


def test_hub_failure_exits_2_in_one_line_and_keeps_the_local_export(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", pairs(conv=False))
    out = tmp_path / "kto.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFLOOP_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefloop.cli",
            "export",
            "--in",
            str(src),
            "--format",
            "kto",
            "--out",
            str(out),
            "--push-to-hub",
            "me/prefs",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith("prefloop export: error: could not push to the Hugging Face hub (")
    assert errors[0].endswith(
        ". Fix: check the network and `huggingface-cli login`, or use --save-to-disk DIR and push later."
    )
    assert read_jsonl(out) == expected("pairs", "kto", False) and read_summary(out)["status"] == "done"


# --- bad input, drift, nothing out -----------------------------------------------------------------------------------


def test_a_file_that_is_neither_exits_2_naming_file_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "x.jsonl", [{"id": "x", "text": "hello"}])
    assert main(["export", "--in", str(src), "--format", "sft", "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prefloop export: error: {src}:1: neither a judgments row") and "Fix:" in err
    assert "\n" not in err and not (tmp_path / "o.jsonl").exists()


def test_refusals_name_the_fix(tmp_path):
    src = write_jsonl(tmp_path / "j.jsonl", judgments(conv=False))
    with pytest.raises(ConfigError, match="needs --threshold T.*Fix: pass --threshold"):
        export(tmp_path, src, "kto")
    with pytest.raises(ConfigError, match="run `prefloop pairs` first"):
        export(tmp_path, src, "llamafactory")
    pairwise = write_jsonl(tmp_path / "pw.jsonl", [judgments(False)[2], {**judgments(False)[0], "comparisons": []}])
    with pytest.raises(
        InputError, match=rf"{re.escape(str(pairwise))}:2: a pairwise judgment.*`prefloop pairs` first"
    ):
        export(tmp_path, pairwise, "sft")
    with pytest.raises(StageFailed, match="0 rows .* below_threshold 3"):
        export(tmp_path, src, "sft", threshold=5.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.jsonl", "pw.jsonl"]  # nothing written


def test_a_finished_export_is_not_redone_and_refuses_another_config(tmp_path):
    src = write_jsonl(tmp_path / "j.jsonl", judgments(conv=False))
    out = export(tmp_path, src, "sft", threshold=1.0)
    mtime = out.stat().st_mtime_ns
    assert export(tmp_path, src, "sft", threshold=1.0) == out and out.stat().st_mtime_ns == mtime
    with pytest.raises(ConfigDriftError, match="changed: threshold"):
        export(tmp_path, src, "sft", threshold=0.5)
