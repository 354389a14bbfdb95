"""The `constitutional` judge: Constitutional AI (Bai et al. 2022) in both of its stages, on any generator backend.

    prefloop judge --judge constitutional --constitution harmless --mode revise   --judge-model M ...
    prefloop judge --judge constitutional --constitution harmless --mode feedback --judge-model M ...

**revise** (the SL-CAI data): for each prompt, the first answer is critiqued under a principle sampled from the
constitution (seeded by the prompt's id), then revised; up to `revisions` passes, each under a principle not yet
used for that prompt. The constitution's few-shot conversations come first, and every turn is one batched call
across the chunk's prompts. The chain is recorded in full -- the HF CAI dataset's fields (`init_prompt`,
`init_response`, `critic_prompt`, `critic_response`, `revision_prompt`, `revision_response`) per pass -- and
the final revision is added to the row's completions as a match it won against the original: pair = revision
≻ original. With a `verifier` (any other judge: a reward model, an LLM judge, a verifier function), a revision
that the verifier does not prefer to the original is `verifier_rejected`: kept in the record, never a pair.

**feedback** (the RL-CAI preference labels): two answers are shown as options (A) and (B) under a sampled
principle's comparison question, and the judge model's next-token probabilities of "A" and "B" after
"The answer is: (" are read and normalised -- a soft label, not a parsed text. Each comparison is asked in both
orders and averaged (so swapping the answers gives exactly 1 - p), optionally over `principles_per_comparison`
principles, and optionally after a chain of thought, whose probabilities are clamped to `cot_clamp` as the paper
did (CoT makes them overconfident). N answers play the knockout tournament of judge/tournament.py; a match
whose p_chosen is below `min_confidence` is `low_confidence`, never a pair.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar

from prefloop.config import ConfigError
from prefloop.gen import Sampling
from prefloop.judge import Verdict
from prefloop.judge.cache import JudgeCache
from prefloop.judge.constitution import Constitution, Principle, load_constitution
from prefloop.judge.llm import Backend, check_model_judge, complete, too_long
from prefloop.judge.templates import TOKEN_JUNK, escape, fenced_prompt
from prefloop.judge.tournament import Match, entrants, knockout

log = logging.getLogger(__name__)

MODES = ("revise", "feedback")
ANSWER_PREFIX = "The answer is: ("
COT_PREFIX = "Let's think step by step:"
OPTIONS = ("A", "B")


def as_messages(prompt: Any) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def feedback_question(prompt: Any, question: str, first: str, second: str) -> str:
    """The multiple-choice question of the feedback stage, with the untrusted text fenced and escaped (a
    conversation one tag per turn, its last turn marked: `templates.fenced_prompt`)."""
    return (
        "Consider the following conversation between a human and an assistant:\n\n"
        f"<conversation>\n{fenced_prompt(prompt)}\n</conversation>\n\n"
        f"{question}\n\n"
        "Inside the tags, <, > and & are written as &lt;, &gt; and &amp;.\n\n"
        f"Options:\n(A) <response>\n{escape(first)}\n</response>\n(B) <response>\n{escape(second)}\n</response>"
    )


def option_probabilities(completion: dict[str, Any] | None) -> dict[str, float] | None:
    """{"A": p, "B": 1 - p}: the first generated token's probabilities of the two options, normalised; None if
    neither option is among the returned alternatives."""
    tops = (completion or {}).get("top_logprobs")
    if not tops:
        return None
    mass = dict.fromkeys(OPTIONS, 0.0)
    for token, logprob in tops[0].items():
        key = token.strip(TOKEN_JUNK)
        if key in mass:
            mass[key] += math.exp(logprob)
    total = sum(mass.values())
    return {k: v / total for k, v in mass.items()} if total > 0 else None


def combine(p_first: list[tuple[str, float]], clamp: tuple[float, float] | None = None) -> float:
    """P(answer a is better) from per-(principle, order) probabilities of the first option: in order "ab" the
    first option is a, in order "ba" it is b. Each is clamped to `clamp` first (CoT), then all are averaged."""
    values = []
    for order, p in p_first:
        if clamp is not None:
            p = min(max(p, clamp[0]), clamp[1])
        values.append(p if order == "ab" else 1.0 - p)
    return sum(values) / len(values)


class ConstitutionalJudge:
    """See module docstring. `generator` is any `Generator`; `verifier` any judge (revise mode only)."""

    def __init__(self, generator, constitution: Constitution, mode: str = "revise", *, revisions: int = 1,
                 max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
                 principles_per_comparison: int = 1, cot: bool = False,
                 cot_clamp: tuple[float, float] = (0.4, 0.6), min_confidence: float = 0.5, top_logprobs: int = 20,
                 verifier=None, cache: JudgeCache | None = None, info: dict[str, Any] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"constitutional mode {mode!r}. Fix: use one of {', '.join(MODES)}.")
        self.generator, self.constitution, self.mode = generator, constitution, mode
        self.revisions, self.max_new_tokens, self.temperature, self.seed = revisions, max_new_tokens, temperature, seed
        self.k, self.cot, self.cot_clamp = principles_per_comparison, cot, tuple(cot_clamp)
        self.min_confidence, self.top_logprobs = min_confidence, top_logprobs
        self.verifier, self.cache = verifier, cache
        self.name = f"constitutional:{constitution.name}:{mode}:{generator.name}"
        self.info = info or {}
        self.calls = 0

    # -- shared ------------------------------------------------------------------------------------------------

    def _system(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.constitution.system}] if self.constitution.system else []

    def _generate(self, inputs: list[Any], sampling: Sampling) -> list[dict[str, Any] | None]:
        """Completions for `inputs`; an input too long for the model gets None (its row fails, alone). `self.why`
        then holds, per input, why it has no usable completion (None where it has one)."""
        reasons = [too_long(self.generator, x, sampling.max_new_tokens) for x in inputs]
        fits = [i for i, why in enumerate(reasons) if why is None]
        out: list[dict[str, Any] | None] = [None] * len(inputs)
        if fits:
            results, sent = complete(self.generator, [inputs[i] for i in fits], sampling, self.cache,
                                     keep=lambda c: bool(c["text"].strip()) or sampling.max_new_tokens == 1)
            self.calls += sent
            for i, c in zip(fits, results, strict=True):
                out[i] = c
                if c is None:
                    reasons[i] = "the model returned no completion"
                elif not c["text"].strip() and sampling.max_new_tokens > 1:
                    reasons[i] = "the model's answer was empty"
        self.why = reasons
        return out

    def judge(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        return self._revise(rows) if self.mode == "revise" else self._feedback(rows)

    # -- revise --------------------------------------------------------------------------------------------------

    def principle_order(self, row_id: str) -> list[Principle]:
        """The principles a prompt's passes use, in order: a seeded shuffle (fresh ones first, then repeats)."""
        order = list(self.constitution.principles)
        random.Random(f"{self.seed}:{row_id}:principles").shuffle(order)
        return order

    def _revise(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        live = []  # (row index, original completion index, conversation, chain)
        for r, row in enumerate(rows):
            n = len(row["completions"])
            verdicts.append({"scores": [None] * n, "statuses": ["ok"] * n, "errors": [None] * n,
                             "comparisons": [], "completions": list(row["completions"])})
            usable = entrants(row["completions"])
            if usable:
                original = row["completions"][usable[0]]["text"]
                conversation = (self._system() + self.constitution.few_shot() + as_messages(row["prompt"])
                                + [{"role": "assistant", "content": original}])
                live.append((r, usable[0], conversation, []))
        failed: dict[int, str] = {}
        for step in range(self.revisions):
            sampling = Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                seed=(self.seed + 7919 * step) % 2**31)
            active = [item for item in live if item[0] not in failed]
            principles = {r: self.principle_order(rows[r]["id"])[step % len(self.constitution.principles)]
                          for r, *_ in active}
            critiques = self._generate([conv + [{"role": "user", "content": principles[r].critique}]
                                        for r, _, conv, _ in active], sampling)
            for (r, _, conv, _), c, why in zip(active, critiques, self.why, strict=True):
                if c is None or not c["text"].strip():
                    failed[r] = f"pass {step + 1}: the critique request failed: {why or 'empty answer'}"
                else:
                    conv += [{"role": "user", "content": principles[r].critique},
                             {"role": "assistant", "content": c["text"]}]
            active = [item for item in active if item[0] not in failed]
            revised = self._generate([conv + [{"role": "user", "content": principles[r].revision}]
                                      for r, _, conv, _ in active], sampling)
            for (r, _, conv, chain), c, why in zip(active, revised, self.why, strict=True):
                if c is None or not c["text"].strip():
                    failed[r] = f"pass {step + 1}: the revision request failed: {why or 'empty answer'}"
                    continue
                chain.append({"principle": principles[r].id, "critic_prompt": principles[r].critique,
                              "critic_response": conv[-1]["content"], "revision_prompt": principles[r].revision,
                              "revision_response": c["text"], "finish_reason": c["finish_reason"],
                              "num_tokens": c.get("num_tokens")})
                conv += [{"role": "user", "content": principles[r].revision},
                         {"role": "assistant", "content": c["text"]}]
        for r, original, _, chain in live:
            self._finish(rows[r], verdicts[r], original, chain, failed.get(r))
        self._verify(rows, verdicts)
        return verdicts

    def _finish(self, row: dict[str, Any], verdict: Verdict, original: int, chain: list[dict], error: str | None):
        verdict["revision"] = {"init_prompt": row["prompt"], "init_response": row["completions"][original]["text"],
                               "passes": chain}
        if error is not None:
            verdict["comparisons"].append({"round": 1, "a": None, "b": original, "status": "error",
                                           "winner": None, "errors": [error]})
            return
        last = chain[-1]
        verdict["completions"].append({"text": last["revision_response"], "finish_reason": last["finish_reason"],
                                       "num_tokens": last["num_tokens"], "source": "constitutional_revision"})
        for key in ("scores", "statuses", "errors"):
            verdict[key].append(None if key != "statuses" else "ok")
        revision = len(verdict["completions"]) - 1
        same = last["revision_response"] == row["completions"][original]["text"]
        verdict["comparisons"].append({
            "round": 1, "a": revision, "b": original, "status": "tie" if same else "ok",
            "winner": None if same else revision, "loser": None if same else original,
            "p_chosen": 1.0, "p_source": "revision", "principles": [p["principle"] for p in chain],
        })

    def _verify(self, rows: list[dict[str, Any]], verdicts: list[Verdict]) -> None:
        """Ask the verifier whether each revision beats its original; a revision it does not prefer is dropped."""
        todo = [(r, v["comparisons"][-1]) for r, v in enumerate(verdicts)
                if self.verifier is not None and v["comparisons"] and v["comparisons"][-1]["status"] == "ok"]
        if not todo:
            return
        pairs = [{**rows[r], "completions": [verdicts[r]["completions"][c["b"]], verdicts[r]["completions"][c["a"]]]}
                 for r, c in todo]
        for (_, c), check in zip(todo, self.verifier.judge(pairs), strict=True):
            if check.get("comparisons") is not None:  # a pairwise judge: its one match between the two
                match = (check["comparisons"] or [{"status": "error"}])[0]
                ok, status = match["status"] == "ok", match["status"]
                better = ok and match["winner"] == 1
                c["verified"] = {"judge": self.verifier.name, "status": status, "winner": match.get("winner")}
                if better:
                    c["p_chosen"], c["p_source"] = match.get("p_chosen", 1.0), "verifier"
            else:
                original, revision = check["scores"]
                ok = None not in (original, revision)
                status = "ok" if ok else next(s for s in check["statuses"] if s != "ok")
                better = ok and revision > original
                c["verified"] = {"judge": self.verifier.name, "status": status, "scores": [original, revision]}
            if not ok:
                c.update(status=status, winner=None, loser=None)
            elif not better:
                c.update(status="verifier_rejected", winner=None, loser=None)

    # -- feedback ------------------------------------------------------------------------------------------------

    def _feedback(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        def play(matches: list[Match], bracket_round: int) -> list[dict[str, Any]]:
            asks = []  # (match index, principle id, order, messages)
            for m, (r, a, b) in enumerate(matches):
                row, texts = rows[r], [c["text"] for c in rows[r]["completions"]]
                rng = random.Random(f"{self.seed}:{row['id']}:{a}:{b}")
                chosen = rng.sample(self.constitution.principles, min(self.k, len(self.constitution.principles)))
                for principle in chosen:
                    for order, (x, y) in (("ab", (a, b)), ("ba", (b, a))):
                        question = feedback_question(row["prompt"], self.constitution.compare(principle), texts[x],
                                                     texts[y])
                        asks.append((m, principle.id, order, self._system() + [{"role": "user", "content": question}]))
            answers = self._answer([x[3] for x in asks])
            results = [{"a": a, "b": b, "round": bracket_round, "measurements": []} for _, a, b in matches]
            for (m, pid, order, _), (probs, reasoning) in zip(asks, answers, strict=True):
                results[m]["measurements"].append({"principle": pid, "order": order, "probs": probs,
                                                   **({"reasoning": reasoning} if reasoning is not None else {})})
            return [self._decide(c) for c in results]

        verdicts = []
        for row, comps in zip(rows, knockout(rows, self.seed, play), strict=True):
            n = len(row["completions"])
            verdicts.append({"scores": [None] * n, "statuses": ["ok"] * n, "errors": [None] * n,
                             "comparisons": comps})
        return verdicts

    def _answer(self, questions: list[list[dict[str, str]]]) -> list[tuple[dict[str, float] | None, str | None]]:
        """Option probabilities for each question (after a chain of thought when `cot`)."""
        reasoning: list[str | None] = [None] * len(questions)
        prefix = [ANSWER_PREFIX] * len(questions)
        if self.cot:
            thoughts = self._generate([q + [{"role": "assistant", "content": COT_PREFIX}] for q in questions],
                                      Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                               seed=self.seed))
            for i, t in enumerate(thoughts):
                reasoning[i] = None if t is None else t["text"]
                prefix[i] = f"{COT_PREFIX}{reasoning[i] or ''}\nSo the answer is: ("
        # hf reads "A" and "B" straight from the logits; vLLM and servers return them when among the top k.
        one = Sampling(max_new_tokens=1, temperature=0.0, top_logprobs=self.top_logprobs, seed=self.seed,
                       logprobs_for=OPTIONS)
        final = self._generate([q + [{"role": "assistant", "content": p}] for q, p in zip(questions, prefix,
                                                                                        strict=True)], one)
        return [(option_probabilities(c), r) for c, r in zip(final, reasoning, strict=True)]

    def _decide(self, c: dict[str, Any]) -> dict[str, Any]:
        measured = c["measurements"]
        # Position statistics (judge/stats.py): each measurement's preferred slot, "A" being the first one shown.
        c["verdicts"] = [None if x["probs"] is None else max(OPTIONS, key=lambda o: x["probs"][o]) for x in measured]
        if any(x["probs"] is None for x in measured):
            c.update(status="parse_error", winner=None,
                     errors=["no probability on the options (A)/(B) among the returned top log-probs"])
            return c
        p_a = combine([(x["order"], x["probs"]["A"]) for x in measured], self.cot_clamp if self.cot else None)
        c["p_a"] = round(p_a, 6)
        if p_a == 0.5:
            c.update(status="tie", winner=None)
            return c
        winner, loser = (c["a"], c["b"]) if p_a > 0.5 else (c["b"], c["a"])
        p_chosen = max(p_a, 1 - p_a)
        if p_chosen < self.min_confidence:
            c.update(status="low_confidence", winner=None, p_chosen=round(p_chosen, 6))
            return c
        c.update(status="ok", winner=winner, loser=loser, p_chosen=round(p_chosen, 6), p_source="logprobs")
        return c

    def close(self) -> None:
        self.generator.close()
        if self.verifier is not None:
            self.verifier.close()


@dataclass
class ConstitutionalOptions:
    """The `constitutional` judge kind (registered in `prefloop.judge.KINDS`): a constitution, a mode and its
    settings; in revise mode, optionally a verifier (another judge's `JudgeConfig`) that must prefer the revision."""

    backend: Backend
    mode: str
    constitution: Constitution
    constitution_name: str
    revisions: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    principles_per_comparison: int = 1
    cot: bool = False
    cot_clamp: tuple[float, float] = (0.4, 0.6)
    min_confidence: float = 0.5
    top_logprobs: int = 20
    verifier: Any = None

    generator: ClassVar[bool] = True
    cached: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config: Any) -> ConstitutionalOptions:
        mode = check_model_judge(config, "constitutional", MODES)
        if not config.constitution:
            raise ConfigError("--judge constitutional needs --constitution NAME|FILE (e.g. harmless).")
        try:
            constitution = load_constitution(config.constitution)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
        verifier = config.verifier_config() if config.verifier else None  # a bad verifier fails now, not later
        return cls(Backend.from_config(config), mode, constitution, config.constitution, config.revisions,
                   config.judge_max_new_tokens, config.judge_temperature, config.seed,
                   config.principles_per_comparison, config.cot, tuple(config.cot_clamp), config.min_confidence,
                   max(config.top_logprobs, 20), verifier)

    def derived(self) -> dict[str, Any]:
        return {"mode": self.mode, "constitution_sha256": self.constitution.sha256}

    def first_label(self) -> str:
        return "A"

    def api_models(self) -> list[str]:
        return self.backend.api_models() + (self.verifier.api_models() if self.verifier else [])

    def pairwise(self) -> bool:
        return self.mode == "feedback"

    def rewrites(self) -> bool:
        return self.mode == "revise"

    def load(self, cache: JudgeCache | None = None) -> ConstitutionalJudge:
        generator, engine = self.backend.load()
        try:
            verifier = self.verifier.load_judge() if self.verifier else None
        except BaseException:
            generator.close()
            raise
        info = {"engine": engine, "model": self.backend.model, "adapter": self.backend.adapter, "mode": self.mode,
                "constitution": self.constitution_name}
        return ConstitutionalJudge(
            generator, self.constitution, self.mode, revisions=self.revisions, max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, seed=self.seed, principles_per_comparison=self.principles_per_comparison,
            cot=self.cot, cot_clamp=self.cot_clamp, min_confidence=self.min_confidence,
            top_logprobs=self.top_logprobs, verifier=verifier, cache=cache, info=info)
