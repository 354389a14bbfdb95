"""Judge ensembles: several judges score the same candidates, and their verdicts are combined per prompt.

    prefloop judge --candidates c.jsonl --out j.jsonl --judge ensemble --members members.yaml \
        [--combine mean|vote] [--drop-disagreements]

`members` is a list of judge configs, each a complete config of an existing kind (the keys of `prefloop judge`),
given as a YAML/JSON file, inline (`--members '[{judge: python, reward_fn: r.py:f}, ...]'`), or as `members:` in
the `--config` YAML:

    - {judge: python, reward_fn: rewards.py:correct}
    - {judge: reward_model, reward_model: PATH}
    - {judge: llm, judge_model: M, mode: pointwise}

Paths in a member (reward_fn, models) are relative to the working directory, as flags are. `candidates`
and `out` come from the ensemble; the settings of how a judge runs (`INHERITED`) are the ensemble's
unless a member sets its own. The members run one after another (never two models loaded at once) through the
judge stage itself, each into `<stem>.members/<i>.jsonl` beside the output: each resumes by id like any judge
stage, and a finished member is not run again, so a kill mid-member costs only that member's unfinished chunk.
When every member is done, the ensemble's judgments are a pure function of the members' files and are written
whole and atomically.

Per prompt, only the completions every member scored take part; a completion some member could not score keeps
the first such member's status and reason and gets no score (a failure never becomes a label). A pairwise member
(llm pairwise, constitutional feedback) has no scores: its score for a completion is the number of decided matches
the completion won in the member's bracket (the champion scores highest); one whose matches were all ties or
failures has none. Each record keeps every member's scores, statuses and matches under `ensemble.members`
(provenance: `prefloop judge-eval` scores each member from it, next to the ensemble).

Each member's best candidates are those with its highest score among the common ones (ties included), its worst
those with its lowest. The members agree on a prompt when some candidate is best for all of them and some is worst
for all of them; a member that scores them all alike agrees with anything (it has no opinion). With
`drop_disagreements` a prompt on which they do not agree is marked (`ensemble.drop`), and `prefloop pairs` drops
its pairs (counted as `judges_disagree`). When members agree, both combinations below choose from the candidates
they agree on.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from prefloop.config import ConfigError, config_hash, from_dict, hashed_dict
from prefloop.errors import PrefloopError
from prefloop.judge import KINDS
from prefloop.judge.stage import JudgeConfig, load_candidates
from prefloop.judge.stage import run as run_judge
from prefloop.judge.stats import judge_stats
from prefloop.runstate import StageRun, read_summary, sidecar
from prefloop.store import atomic_write, dumps, iter_records

log = logging.getLogger(__name__)

COMBINES = ("mean", "vote")
# How a judge runs, not what it answers: a member inherits these from the ensemble unless it sets its own.
INHERITED = ("cache", "dtype", "batch_size", "chunk_size", "max_failed_fraction", "engine", "ray_address",
             "ray_actors", "ray_num_cpus", "ray_num_gpus", "ray_batch_size", "prices")
MEMBERS_HELP = ("e.g. --members members.yaml, with one judge config per list item: "
                "[{judge: python, reward_fn: r.py:f}, {judge: reward_model, reward_model: PATH}]")


def members_dir(out: str | Path) -> Path:
    """Where the members' judgments live: `judgments.jsonl` -> `judgments.members/` (`<i>.jsonl` per member)."""
    return sidecar(out, "members")


def parse_members(value: Any) -> list[dict[str, Any]]:
    """The members as given (a list, a YAML/JSON file holding one or `members:`, or inline YAML) as a list."""
    if isinstance(value, str):
        if Path(value).is_file():
            try:
                value = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                raise ConfigError(f"members: {value} is not valid YAML/JSON ({getattr(e, 'problem', e)}).") from None
            if isinstance(value, dict) and "members" in value:
                value = value["members"]
        else:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = None
            if not isinstance(parsed, list):
                raise ConfigError(f"members: {value!r} is neither a file nor an inline YAML list. Fix: {MEMBERS_HELP}.")
            value = parsed
    if not value:
        raise ConfigError(f"--judge ensemble needs members: a list of judge configs, and it has none. Fix: "
                          f"{MEMBERS_HELP}.")
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ConfigError(f"members must be a list of judge configs (mappings), got {str(value)[:80]!r}. Fix: "
                          f"{MEMBERS_HELP}.")
    if len(value) < 2:
        raise ConfigError("an ensemble of one judge is that judge. Fix: list at least two members, or pass that "
                          "member's settings with its own --judge.")
    return [dict(m) for m in value]


def check(config: JudgeConfig) -> None:
    """Validate an ensemble config (from `JudgeConfig.__post_init__`): normalise `members` to a list, check every
    member as the judge stage would, and derive `member_hashes` (their config hashes: what drift is checked on)."""
    if config.combine not in COMBINES:
        raise ConfigError(f"combine = {config.combine!r}. Fix: use one of {', '.join(COMBINES)}.")
    config.members = parse_members(config.members)
    config.member_hashes = [config_hash(hashed_dict(m)) for m in member_configs(config)]


def member_configs(config: JudgeConfig) -> list[JudgeConfig]:
    """Each member's `JudgeConfig`, writing `<stem>.members/<i>.jsonl`; `ConfigError` names the member and the fix."""
    out = []
    for i, member in enumerate(config.members):
        where, kind = f"members[{i}]", member.get("judge")
        if kind == "ensemble":
            raise ConfigError(f"{where}: an ensemble cannot be a member of an ensemble. Fix: list its members in "
                              "this ensemble's members instead.")
        if kind not in KINDS:
            what = "has no `judge` key" if kind is None else f"has judge {kind!r}, which is not a judge kind"
            raise ConfigError(f"{where} {what}. Fix: set judge to one of {', '.join(KINDS)}.")
        for key in ("candidates", "out"):
            if key in member:
                raise ConfigError(f"{where} sets `{key}`, which the ensemble sets for every member. Fix: remove it.")
        values = {**{k: getattr(config, k) for k in INHERITED}, **member, "candidates": config.candidates,
                  "out": str(members_dir(config.out) / f"{i}.jsonl")}
        try:
            member_config = from_dict(JudgeConfig, values, where)
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(where) else f"{where} ({kind}): {e}") from None
        if member_config.options().rewrites():
            raise ConfigError(f"{where}: {kind} {member_config.mode} adds an answer of its own, which the other "
                              "members never judge. Fix: use a judge that scores or compares, e.g. constitutional "
                              "with mode: feedback.")
        out.append(member_config)
    return out


def run(config: JudgeConfig) -> Path:
    """Run every member, then combine them into `config.out` (called by `judge/stage.py:run`, which holds its lock)."""
    out = Path(config.out)
    rows = load_candidates(config.candidates)
    members = member_configs(config)
    for i, member in enumerate(members):
        if member.judge == "python":  # cheap to load: a wrong --reward-fn fails before any member runs
            try:
                member.options().load().close()
            except (ValueError, AttributeError, ImportError, FileNotFoundError, OSError) as e:
                raise ConfigError(f"members[{i}] (python): {e}. Fix: point reward_fn at FILE.py:function.") from None
    state = StageRun("judge", out, config)
    if state.begin(config.new_run) == "done":
        log.info("%s is complete (config %s); nothing to do", out, state.hash)
        return out
    folder = members_dir(out)
    if config.new_run and folder.exists():  # the members' outputs go aside with the ensemble's
        aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(folder, aside)
        log.warning("--new-run: moved %s to %s", folder, aside)
    for i, member in enumerate(members):
        log.info("ensemble: member %d of %d (%s) -> %s", i + 1, len(members), member.judge, member.out)
        try:
            run_judge(member)  # resumes by id; a finished member does nothing
        except PrefloopError as e:
            state.forget_if_empty()  # nothing combined yet: a corrected command starts the ensemble fresh
            raise type(e)(f"ensemble member {i} ({member.judge}, {member.out}): {e}") from None
    judged = [{r["id"]: _slim(r) for _, r in iter_records(m.out)} for m in members]
    records = [combine_record(row, [by_id[row["id"]] for by_id in judged], config, state.hash) for row in rows]
    atomic_write(out, "".join(dumps(r) for r in records))
    statuses = Counter(s for record in records for s in record["statuses"])
    summaries = []
    for m, by_id in zip(members, judged, strict=True):
        s = read_summary(m.out)
        name = next(iter(by_id.values()))["judge"] if by_id else m.judge
        summaries.append({"judge": name, "out": m.out, "config_hash": s.get("config_hash"),
                          "completion_statuses": s.get("completion_statuses"), "stats": s.get("stats")})
    counts = agreement(records, [s["judge"] for s in summaries])
    if records and not counts["prompts"]:
        log.warning("judge ensemble: no prompt has two answers every member scored, so the ensemble ranked nothing "
                    "(its scores are all alike). An ensemble compares answers of one prompt; to score single "
                    "answers (held-out eval), use one judge (in the loop: eval_judge: {judge: ...}).")
    state.finish("done", prompts=len(rows), judged=len(rows), completion_statuses=dict(statuses),
                 stats=judge_stats(records), members=summaries, agreement=counts)
    return out


def _slim(record: dict[str, Any]) -> dict[str, Any]:
    """What combining reads of a member's record (the raw judge answers stay in the member's file)."""
    keep = {k: record[k] for k in ("judge", "scores", "statuses", "errors", "status", "config_hash") if k in record}
    if record.get("comparisons") is not None:
        keep["comparisons"] = [{k: v for k, v in c.items() if k != "raw"} for c in record["comparisons"]]
    return keep


def member_view(record: dict[str, Any], texts: list[str]) -> tuple[list, list[str], list]:
    """One member's (scores, statuses, errors) per completion; a pairwise member's score is its bracket wins."""
    if record.get("comparisons") is None:
        scores = [s if st == "ok" else None for s, st in zip(record["scores"], record["statuses"], strict=True)]
        return scores, list(record["statuses"]), list(record["errors"])
    n = len(texts)
    wins, statuses, errors = [0] * n, [None] * n, [None] * n
    for c in record["comparisons"]:
        decided = c["status"] == "ok" and c.get("winner") is not None
        if decided:
            wins[c["winner"]] += 1
        for k in (c["a"], c["b"]):
            if decided:
                statuses[k], errors[k] = "ok", None
            elif statuses[k] is None:
                why = next((e for e in c.get("errors") or [] if e), None)
                statuses[k], errors[k] = c["status"], why or f"no decided match (its match: {c['status']})"
    first = {}
    for i, text in enumerate(texts):
        j = first.setdefault(text, i)
        if statuses[i] is None and statuses[j] is not None:  # a duplicate answer is judged as its first copy
            statuses[i], errors[i], wins[i] = statuses[j], errors[j], wins[j]
    for i in range(n):
        if statuses[i] is None:
            statuses[i], errors[i] = "error", "not in the member's bracket (an empty answer, or no other answer)"
    return [float(w) if s == "ok" else None for w, s in zip(wins, statuses, strict=True)], statuses, errors


def normalized_ranks(values: list[float]) -> list[Fraction]:
    """Each value's mid-rank scaled to [0, 1] (lowest 0, highest 1, ties share their mean rank; one value: 1/2)."""
    if len(values) < 2:
        return [Fraction(1, 2)] * len(values)
    return [Fraction(2 * sum(x < v for x in values) + sum(x == v for x in values) - 1, 2 * (len(values) - 1))
            for v in values]


def combine(views: list[tuple[list, list[str], list]], how: str) -> dict[str, Any]:
    """Combine the members' views of one prompt: scores for the common completions, each member's best and worst.

    `mean`: the mean over members of each member's rank-normalized score (`normalized_ranks`). Ranks, not z-scores:
    members score on unrelated scales (a 0/1 verifier, a reward model's logits, a 0-5 rubric, bracket wins), and
    ranks put every member in the same currency with the same weight per prompt, whatever its scale or outliers;
    only the order is kept, which is all a pair needs. A member that scores every candidate alike gives each 1/2,
    where a z-score would divide by zero. The mean is exact (fractions), so equal combinations tie exactly.
    `vote`: each member votes for the candidates it ranks best and against those it ranks worst; a candidate's
    score is its votes for minus its votes against. The chosen is the candidate most members rank best (net of
    those ranking it worst), the rejected the one most rank worst; a member that scores all alike votes for and
    against every candidate, which cancels out.
    """
    n = len(views[0][0])
    common = [i for i in range(n) if all(v[0][i] is not None for v in views)]
    per = [[v[0][i] for i in common] for v in views]
    best = [[i for i, s in zip(common, p, strict=True) if s == max(p)] for p in per]
    worst = [[i for i, s in zip(common, p, strict=True) if s == min(p)] for p in per]
    if how == "mean":
        ranks = [normalized_ranks(p) for p in per]
        values = [sum((r[j] for r in ranks), Fraction(0)) / len(views) for j in range(len(common))]
    else:
        values = [sum(i in b for b in best) - sum(i in w for w in worst) for i in common]
    scores: list[float | None] = [None] * n
    for i, value in zip(common, values, strict=True):
        scores[i] = float(value)
    decided = len(common) >= 2
    agree_best = bool(set.intersection(*map(set, best))) if decided else None
    agree_worst = bool(set.intersection(*map(set, worst))) if decided else None
    return {"scores": scores, "best": best, "worst": worst, "agree_best": agree_best, "agree_worst": agree_worst,
            "agree": (agree_best and agree_worst) if decided else None}


def combine_record(row: dict[str, Any], judged: list[dict[str, Any]], config: JudgeConfig, chash: str) -> dict:
    """The ensemble's judgment of one candidates row from its members' judgments of it."""
    texts = [c["text"] for c in row["completions"]]
    views = [member_view(r, texts) for r in judged]
    combined = combine(views, config.combine)
    statuses, errors = [], []
    for i, score in enumerate(combined["scores"]):
        failed = next((m for m, v in enumerate(views) if v[0][i] is None), None)
        if score is not None or failed is None:
            statuses.append("ok")
            errors.append(None)
        else:
            status, error = views[failed][1][i], views[failed][2][i]
            statuses.append(status if status != "ok" else "error")
            errors.append(f"member {failed} ({judged[failed]['judge']}): {error or status}")
    members = []
    for r, (scores, member_statuses, member_errors) in zip(judged, views, strict=True):
        entry = {"judge": r["judge"], "scores": scores, "statuses": member_statuses, "errors": member_errors,
                 "status": r["status"], "config_hash": r["config_hash"]}
        if r.get("comparisons") is not None:
            entry["comparisons"] = r["comparisons"]
        members.append(entry)
    names = [r["judge"] for r in judged]
    record = {
        "id": row["id"], "prompt": row["prompt"], "completions": row["completions"],
        "judge": f"ensemble:{config.combine}:" + "+".join(names),
        "scores": combined["scores"], "statuses": statuses, "errors": errors,
        "status": next((s for s in statuses if s != "ok"), "ok"), "round": row.get("round", 0), "config_hash": chash,
        "ensemble": {"combine": config.combine, "members": members,
                     **{k: combined[k] for k in ("best", "worst", "agree_best", "agree_worst", "agree")},
                     "drop": bool(config.drop_disagreements and combined["agree"] is False)},
    }
    if row.get("chat_template_kwargs"):  # as judge/stage.py's records carry it (the pairs pass it to TRL)
        record["chat_template_kwargs"] = row["chat_template_kwargs"]
    record["judge_info"] = {"engine": "ensemble", "combine": config.combine, "members": names}
    return record


def agreement(records: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The summary's agreement counts: over prompts with two or more commonly scored candidates, how often all
    members (and each two of them) share a best and a worst candidate, and how many prompts were marked to drop."""
    decided = [r["ensemble"] for r in records if r["ensemble"]["agree"] is not None]
    k = len(decided)

    def rate(hits: int) -> float | None:
        return round(hits / k, 4) if k else None

    def two(e: dict, a: int, b: int) -> bool:
        return bool(set(e["best"][a]) & set(e["best"][b])) and bool(set(e["worst"][a]) & set(e["worst"][b]))

    return {
        "prompts": k, "agree_rate": rate(sum(e["agree"] for e in decided)),
        "agree_best_rate": rate(sum(e["agree_best"] for e in decided)),
        "agree_worst_rate": rate(sum(e["agree_worst"] for e in decided)),
        "disagreements": sum(not e["agree"] for e in decided),
        "marked_to_drop": sum(r["ensemble"]["drop"] for r in records),
        "members": names,
        "pairwise_agree_rate": [[rate(sum(two(e, a, b) for e in decided)) for b in range(len(names))]
                                for a in range(len(names))],
    }
