"""Pair selection: judgments in, chosen/rejected pairs in TRL's preference format out.

    prefloop pairs --judgments judgments.jsonl --out pairs.jsonl --strategy best_worst --min-margin 0.5

Strategies (per prompt, over completions with a real score):
- `best_worst` (default): highest vs lowest score — the widest margin, as in RLHFlow's iterative DPO.
- `best_random`: highest vs a random lower-scored completion.
- `all_above_margin`: every pair whose score gap is at least `min_margin` (more pairs, correlated).

Pairwise judgments (`judge llm --mode pairwise`) carry matches instead of scores; their pairs are the decided
matches (see `select_comparisons`), with `meta.p_chosen` the judge's probability for the chosen response.

Dropped and counted (never silently kept): completions whose judgment failed, empty or truncated
(`finish_reason == "length"`) completions, duplicate texts; prompts with fewer than two usable completions,
ties, margins below `min_margin`, chosen answers below `min_chosen_score`. Ties among the best (or worst) are
broken by a seeded draw, not by position.

The output is written whole and atomically (pairs are a pure function of the judgments), and loads with
`datasets.load_dataset("json", data_files=...)` straight into `trl.DPOTrainer`: conversational records
(`prompt` = messages, `chosen`/`rejected` = one assistant message) for message prompts, standard (strings) for
plain-text prompts. A conversation keeps its whole history in `prompt`. When generate rendered a prompt with
chat-template arguments, the pair carries them as TRL's trainers read them: `tools` (as a JSON string, which TRL
parses: tools of different shapes would otherwise be merged into one Arrow struct, nulls added) and
`chat_template_kwargs` (the rest), so training renders the prompt exactly as generation did.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.config import ConfigError, field
from prefloop.errors import StageFailed
from prefloop.lock import exclusive
from prefloop.runstate import StageRun
from prefloop.store import InputError, atomic_write, dumps, iter_records

log = logging.getLogger(__name__)

# Scores are floats: 0.3 - 0.1 < 0.2 in binary floating point, so margins are compared with this tolerance.
MARGIN_EPS = 1e-9
LENGTH_BIAS_SHARE = 0.7  # chosen longer in at least this share of pairs: a warning (judges tend to favour length)

STRATEGIES = ("best_worst", "best_random", "all_above_margin")


@dataclass
class PairsConfig:
    judgments: str = field(help="Judgments JSONL written by `prefloop judge`.")
    out: str = field(help="Pairs JSONL to write (TRL preference format).", hash=False)
    strategy: str = field("best_worst", help=f"Pair selection: {', '.join(STRATEGIES)}.")
    min_margin: float = field(0.0, help="Drop pairs whose score gap is below this (ties are always dropped).")
    keep_truncated: bool = field(False, help="Keep completions that hit max_new_tokens (dropped by default).")
    truncated_rejected: bool = field(
        False, help="A completion that hit max_new_tokens may be a pair's rejected answer, never its chosen one "
        "(an answer cut off is worse than a finished one that scores at least as well).")
    shortest_within: float | None = field(
        None, help="Length control: the chosen answer is the shortest of those scoring within this much of the best "
        "(as Meta-Rewarding does), so a longer answer is never preferred for a sliver of score.")
    max_length_ratio: float | None = field(
        None, help="Length control: drop pairs whose chosen answer is more than this many times as long as the "
        "rejected one (in characters).")
    min_chosen_score: float | None = field(
        None, help="Drop pairs whose chosen answer scores below this (scored judgments only): with a verifier's "
        "partial credit (e.g. the fraction of constraints met), 1.0 keeps only chosen answers that pass in full, so "
        "SFT on the chosen answers is rejection-sampling fine-tuning and DPO never prefers a wrong answer.")
    dedup_chosen: float | None = field(
        None, help="Drop a pair whose chosen answer repeats the chosen answer of an earlier prompt's pair: equal "
        "after normalization, or word 3-gram Jaccard >= this (e.g. 0.9; prefloop/hygiene.py). One answer taught "
        "for many prompts is a template, not a preference. Exact repeats are counted either way "
        "(`repeated_chosen`).")
    seed: int = field(0, help="Seed for tie-breaking and best_random.")
    round: int = field(0, help="Loop round recorded in each pair's meta.")
    new_run: bool = field(False, help="Move an existing output aside and start again.", hash=False)

    def __post_init__(self) -> None:
        if self.keep_truncated and self.truncated_rejected:
            raise ConfigError("keep_truncated and truncated_rejected are both set. Fix: choose one (keep_truncated "
                              "lets a truncated answer be chosen too).")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} is unknown. Fix: use one of {', '.join(STRATEGIES)}.")
        if self.min_margin < 0:
            raise ConfigError("min_margin must be >= 0.")
        if self.shortest_within is not None and self.shortest_within < 0:
            raise ConfigError(f"shortest_within = {self.shortest_within} must be >= 0.")
        if self.min_chosen_score is not None and not math.isfinite(self.min_chosen_score):
            raise ConfigError(f"min_chosen_score = {self.min_chosen_score}. Fix: a finite score (e.g. 1.0).")
        if self.max_length_ratio is not None and self.max_length_ratio <= 0:
            raise ConfigError(f"max_length_ratio = {self.max_length_ratio} must be > 0 (e.g. 1.5).")


def truncation(keep_truncated: bool, truncated_rejected: bool) -> str:
    """What pairs do with a completion that hit max_new_tokens: "drop", "keep" or "rejected" (rejected only)."""
    return "keep" if keep_truncated else "rejected" if truncated_rejected else "drop"


def usable(judgment: dict[str, Any], truncated: str, drops: Counter) -> list[tuple[int, float, str, bool]]:
    """(index, score, text, truncated?) of completions that may enter a pair; counts every exclusion in `drops`.
    `truncated` as `truncation` gives it ("drop", "keep", "rejected"; a bool means keep/drop)."""
    if isinstance(truncated, bool):
        truncated = "keep" if truncated else "drop"
    out, seen = [], set()
    statuses = judgment.get("statuses") or ["ok"] * len(judgment["completions"])
    for i, (completion, score, status) in enumerate(
        zip(judgment["completions"], judgment["scores"], statuses, strict=True)
    ):
        text = completion["text"]
        if score is None or status != "ok":
            drops["judge_failed"] += 1
        elif not text.strip():
            drops["empty"] += 1
        elif completion.get("finish_reason") == "length" and truncated == "drop":
            drops["truncated"] += 1
        elif text in seen:
            drops["identical"] += 1
        else:
            seen.add(text)
            out.append((i, float(score), text, truncated == "rejected" and completion.get("finish_reason") == "length"))
    return out


def select_pairs(
    judgment: dict[str, Any], strategy: str, min_margin: float, rng: random.Random, drops: Counter,
    keep_truncated: bool | str = False, shortest_within: float | None = None,
) -> list[tuple[tuple[int, float, str, bool], tuple[int, float, str, bool]]]:
    """The (chosen, rejected) completions of one prompt under `strategy`; drop reasons go into `drops`.
    `keep_truncated`: a bool, or a `truncation` mode ("rejected": truncated answers are never chosen).
    `shortest_within`: the chosen answer is the shortest scoring within that much of the best (best_worst and
    best_random; ties in length broken by the seeded choice)."""
    items = usable(judgment, keep_truncated, drops)
    if len(items) < 2:
        drops["too_few_usable"] += 1
        return []
    choosable = [it for it in items if not it[3]]
    if not choosable:
        drops["only_truncated"] += 1
        return []
    best_score = max(it[1] for it in choosable)
    worst_score = min(it[1] for it in items)
    if best_score <= worst_score:
        drops["tie"] += 1
        return []
    if strategy == "all_above_margin":
        pairs = [(a, b) for a in choosable for b in items if a[1] > b[1] and a[1] - b[1] >= min_margin - MARGIN_EPS]
        if not pairs:
            drops["below_margin"] += 1
        return pairs
    chosen = rng.choice([it for it in choosable if it[1] == best_score])
    if shortest_within is not None:
        near = [it for it in choosable if it[1] >= best_score - shortest_within - MARGIN_EPS]
        shortest = min(len(it[2]) for it in near)
        if len(chosen[2]) > shortest:
            chosen = rng.choice([it for it in near if len(it[2]) == shortest])
    if strategy == "best_worst":
        rejected = rng.choice([it for it in items if it[1] == worst_score])
    else:  # best_random
        rejected = rng.choice([it for it in items if it[1] < chosen[1]] or [chosen])
    if chosen[1] - rejected[1] < min_margin - MARGIN_EPS or chosen is rejected or chosen[1] <= rejected[1]:
        drops["below_margin"] += 1
        return []
    return [(chosen, rejected)]


def select_comparisons(
    judgment: dict[str, Any], strategy: str, min_margin: float, rng: random.Random, drops: Counter,
    keep_truncated: bool | str = False,
) -> list[tuple[tuple[int, float, str], tuple[int, float, str]]]:
    """Pairs from a pairwise judgment's decided matches (see judge/llm.py): (index, p, text) of winner and loser.

    `best_worst`: the champion's (the last match winner's) win over the opponent it met earliest -- the widest
    gap the bracket measured; when the champion won nothing outright, the most confident decided match.
    `best_random`: a random decided match of the champion (else of anyone). `all_above_margin`: every decided
    match. The margin of a match is p_chosen - p_rejected = 2 p_chosen - 1 (1 for text verdicts).
    """
    completions = judgment["completions"]
    decided = []
    for c in judgment["comparisons"]:
        if c["status"] in ("tie", "low_confidence", "verifier_rejected"):
            drops[c["status"]] += 1
        elif c["status"] != "ok" or c.get("winner") is None:
            drops["judge_failed"] += 1
        else:
            w, lo = completions[c["winner"]], completions[c["loser"]]
            mode = truncation(keep_truncated, False) if isinstance(keep_truncated, bool) else keep_truncated
            cut = (w.get("finish_reason") == "length", lo.get("finish_reason") == "length")
            if (mode == "drop" and any(cut)) or (mode == "rejected" and cut[0]):
                drops["truncated"] += 1
            else:
                decided.append(c)
    if not decided:
        drops["no_decided_match"] += 1
        return []
    last = max(judgment["comparisons"], key=lambda c: c["round"])
    champion = last.get("winner")
    won = [c for c in decided if c["winner"] == champion]
    if strategy == "best_worst":
        picked = [min(won, key=lambda c: c["round"])] if won else [max(decided, key=lambda c: c["p_chosen"])]
    elif strategy == "best_random":
        picked = [rng.choice(won or decided)]
    else:
        picked = decided
    out = []
    for c in picked:
        p = float(c["p_chosen"])
        if 2 * p - 1 < min_margin - MARGIN_EPS:
            drops["below_margin"] += 1
            continue
        out.append(((c["winner"], p, completions[c["winner"]]["text"]),
                    (c["loser"], 1 - p, completions[c["loser"]]["text"])))
    return out


def template_fields(chat_template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The chat-template arguments a prompt was rendered with, as TRL's trainers read them from a row: `tools` as a
    JSON string, the rest as `chat_template_kwargs`; nothing for a prompt rendered without any."""
    rest = dict(chat_template_kwargs or {})
    tools = rest.pop("tools", None)
    fields: dict[str, Any] = {"tools": json.dumps(tools, ensure_ascii=False)} if tools else {}
    return fields | ({"chat_template_kwargs": rest} if rest else {})


def to_trl(judgment: dict[str, Any], chosen: tuple, rejected: tuple, pair_id: str, meta: dict) -> dict[str, Any]:
    """One record in TRL's preference format (conversational for message prompts, standard for text)."""
    prompt = judgment["prompt"]
    if isinstance(prompt, list):
        wrap = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    else:
        wrap = lambda text: text  # noqa: E731
    record = {
        "id": pair_id,
        "prompt": prompt,
        "chosen": wrap(chosen[2]),
        "rejected": wrap(rejected[2]),
    }
    record.update(template_fields(judgment.get("chat_template_kwargs")))
    return {**record, "score_chosen": chosen[1], "score_rejected": rejected[1], "margin": chosen[1] - rejected[1],
            "meta": meta}


def load_judgments(path: str | Path) -> list[dict[str, Any]]:
    """Read a judgments file; `InputError` names file:line for a row that is not a judgment, and refuses a file
    that mixes text and message prompts (a TRL dataset is standard or conversational, not both)."""
    rows = []
    first_of_style: dict[bool, int] = {}
    for lineno, judgment in iter_records(path):
        style = isinstance(judgment.get("prompt"), list)
        first_of_style.setdefault(style, lineno)
        if len(first_of_style) == 2:
            raise InputError(
                f"{path}:{lineno}: mixes prompt styles: line {first_of_style[False]} has a text prompt and line "
                f"{first_of_style[True]} a message list, and TRL trains on one style per dataset. Fix: generate "
                "with --chat (every prompt as messages), or split the prompts by style into separate runs."
            )
        for key in ("id", "prompt", "completions", "scores"):
            if key not in judgment:
                raise InputError(f"{path}:{lineno}: missing `{key}`. Fix: pass a file written by `prefloop judge`.")
        if not isinstance(judgment["completions"], list) or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) for c in judgment["completions"]
        ):
            raise InputError(f"{path}:{lineno}: `completions` must be a list of objects with a `text` string. "
                             "Fix: pass a file written by `prefloop judge`.")
        if not isinstance(judgment["scores"], list) or len(judgment["scores"]) != len(judgment["completions"]):
            got = len(judgment["scores"]) if isinstance(judgment["scores"], list) else type(judgment["scores"]).__name__
            raise InputError(
                f"{path}:{lineno}: {got} scores for {len(judgment['completions'])} completions. "
                "Fix: pass a file written by `prefloop judge`."
            )
        for i, score in enumerate(judgment["scores"]):
            # JSON parsers accept NaN/Infinity, and float() takes "0.9" and true: each would become a silent label.
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                      or not math.isfinite(score)):
                raise InputError(
                    f"{path}:{lineno}: `scores[{i}]` is {json.dumps(score)[:40]}, not a finite number or null. "
                    "Fix: write a failed judgment as null with a non-ok status (as `prefloop judge` does), never as a "
                    "string, boolean, NaN or infinity."
                )
        rows.append(judgment)
    return rows


@exclusive
def run(config: PairsConfig) -> Path:
    """Select pairs from `config.judgments` into `config.out`; return its path. See module docstring."""
    out = Path(config.out)
    judgments = load_judgments(config.judgments)  # validated whole before anything is written
    if config.min_chosen_score is not None and any(j.get("comparisons") is not None for j in judgments):
        raise ConfigError(f"{config.judgments}: min_chosen_score needs scored judgments, and these are pairwise "
                          "(matches, no scores). Fix: drop min_chosen_score, or judge pointwise.")
    state = StageRun("pairs", out, config)
    if state.begin(config.new_run) == "done":
        return out
    drops: Counter[str] = Counter()
    lines, prompts, chosen_len, rejected_len, longer = [], 0, 0, 0, 0
    selected: list[tuple[str, str, str, str]] = []  # (prompt id, chosen text, rejected text, output line)
    for judgment in judgments:
        prompts += 1
        if (judgment.get("ensemble") or {}).get("drop"):  # judge/ensemble.py: members disagree, drop_disagreements
            drops["judges_disagree"] += 1
            continue
        rng = random.Random(f"{config.seed}:{judgment['id']}")
        mode = truncation(config.keep_truncated, config.truncated_rejected)
        if judgment.get("comparisons") is not None:
            pairs = select_comparisons(judgment, config.strategy, config.min_margin, rng, drops, mode)
        else:
            pairs = select_pairs(judgment, config.strategy, config.min_margin, rng, drops, mode, config.shortest_within)
        if config.max_length_ratio is not None:
            kept = [(c, r) for c, r in pairs if len(c[2]) <= config.max_length_ratio * max(len(r[2]), 1)]
            drops["length_ratio"] += len(pairs) - len(kept)
            pairs = kept
        if config.min_chosen_score is not None:
            kept = [(c, r) for c, r in pairs if c[1] >= config.min_chosen_score - MARGIN_EPS]
            drops["chosen_below_min_score"] += len(pairs) - len(kept)
            pairs = kept
        for chosen, rejected in pairs:
            pair_id = judgment["id"] if len(pairs) == 1 else f"{judgment['id']}:{chosen[0]}>{rejected[0]}"
            meta = {
                "judge": judgment.get("judge", ""),
                "round": config.round,
                "strategy": config.strategy,
                "config_hash": state.hash,
                "judge_config_hash": judgment.get("config_hash", ""),
                "chosen_index": chosen[0],
                "rejected_index": rejected[0],
            }
            if judgment.get("comparisons") is not None:
                meta["p_chosen"] = chosen[1]
            selected.append((judgment["id"], chosen[2], rejected[2],
                             dumps(to_trl(judgment, chosen, rejected, pair_id, meta))))
    selected, repeated = _repeated_chosen(selected, config.dedup_chosen, drops)
    for _, chosen_text, rejected_text, line in selected:
        lines.append(line)
        chosen_len += len(chosen_text)
        rejected_len += len(rejected_text)
        longer += len(chosen_text) > len(rejected_text)
    n = max(len(lines), 1)
    drops = +drops  # without zero counts
    counts = dict(prompts=prompts, pairs=len(lines), drops=dict(sorted(drops.items())),
                  mean_chosen_chars=round(chosen_len / n, 2), mean_rejected_chars=round(rejected_len / n, 2),
                  chosen_longer_share=round(longer / n, 4), repeated_chosen=repeated)
    if len(lines) >= 20 and longer / n >= LENGTH_BIAS_SHARE:
        log.warning("pairs: the chosen answer is the longer one in %d of %d pairs (mean %.0f vs %.0f chars): training "
                    "will make answers longer. Fix, if length is not what the judge should reward: --shortest-within "
                    "or --max-length-ratio.", longer, len(lines), chosen_len / n, rejected_len / n)
    if not lines:  # nothing to train on is a failed stage, never an empty success (a re-run selects again)
        state.forget_if_empty()  # nothing was made: a corrected command (other settings) starts fresh
        raise StageFailed(no_pairs_message(config.judgments, prompts, drops))
    atomic_write(out, "".join(lines))
    state.finish("done", **counts)
    return out


def _repeated_chosen(selected: list[tuple[str, str, str, str]], threshold: float | None,
                     drops: Counter) -> tuple[list[tuple[str, str, str, str]], int]:
    """(the pairs kept, how many chosen answers repeat an earlier prompt's exactly). With `threshold`, a pair whose
    chosen answer repeats (exactly, or near: `hygiene.near_duplicates`) one chosen for another prompt is dropped
    (`repeated_chosen` in drops); the same answer chosen in several pairs of one prompt (all_above_margin) is not a repeat."""
    from prefloop.hygiene import near_duplicates, prompt_text

    first: dict[str, str] = {}
    exact = 0
    for prompt_id, chosen, _, _ in selected:
        text = prompt_text(chosen)
        exact += first.setdefault(text, prompt_id) != prompt_id
    if threshold is None:
        return selected, exact
    repeats = near_duplicates([chosen for _, chosen, _, _ in selected], threshold)
    kept = [pair for i, pair in enumerate(selected) if i not in repeats or selected[repeats[i][0]][0] == pair[0]]
    drops["repeated_chosen"] += len(selected) - len(kept)
    return kept, exact


def no_pairs_message(judgments: str | Path, prompts: int, drops: Counter) -> str:
    """Why no pair came out of `judgments`: the drop counts, largest first, and the fix for the usual causes."""
    reasons = ", ".join(f"{k} {v}" for k, v in drops.most_common()) or "no judgments"
    return (f"{judgments}: 0 pairs from {prompts} prompts (dropped: {reasons}). Fix: look at the judgments' "
            "statuses and errors (judge_failed: the judge failed; tie: every answer scored the same, so sample more "
            "or more diverse answers; truncated: raise max_new_tokens or pass --keep-truncated; below_margin: "
            "lower --min-margin; chosen_below_min_score: lower --min-chosen-score).")
