"""Decontamination (which training prompts match a held-out prompt: the loop's eval set, or a benchmark a user
names) and deduplication (which prompts or answers repeat an earlier one, `near_duplicates`).

A training prompt matches a reference prompt when, after normalization (lowercase, every run of non-alphanumeric
characters one space):
- `exact`: the texts are equal;
- `ngram13` / `ngram8`: at least `ngram_threshold` of the training prompt's word 13-grams (then 8-grams) occur in one
  reference prompt (a prompt with fewer words than n has none of that size), as the decontamination of open-instruct
  and the GPT-3 paper counts overlap;
- `near_duplicate`: their estimated Jaccard similarity over word 3-gram shingles is >= `near_threshold` (MinHash with
  LSH from `datasketch`, so a re-worded or re-numbered copy is caught without comparing every pair).
The first of these that holds is the reason recorded. A prompt's text is its string, or the contents of its messages
joined (system, user and assistant turns alike: a leaked conversation is leaked wherever the words sit).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

WORDS = re.compile(r"[^0-9a-z]+")
NGRAMS = (13, 8)


def prompt_text(prompt: Any) -> str:
    """A prompt (text, or a list of chat messages) as one normalized string."""
    if isinstance(prompt, list):
        parts = []
        for message in prompt:
            content = message.get("content") if isinstance(message, dict) else message
            if isinstance(content, list):  # multimodal parts: their text
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(str(content or ""))
        prompt = " ".join(parts)
    return WORDS.sub(" ", str(prompt).lower()).strip()


def ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass
class Matcher:
    """Built once from the reference prompts; `match(prompt)` gives the reason a prompt is contaminated, or None."""

    ngram_threshold: float = 0.5
    near_threshold: float = 0.8
    num_perm: int = 64

    def __post_init__(self) -> None:
        self.exact: set[str] = set()
        self.index: dict[int, dict[tuple[str, ...], set[int]]] = {n: {} for n in NGRAMS}
        self.lsh = None

    def fit(self, prompts: list[Any]) -> Matcher:
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=self.near_threshold, num_perm=self.num_perm)
        for i, prompt in enumerate(prompts):
            text = prompt_text(prompt)
            self.exact.add(text)
            words = text.split()
            for n in NGRAMS:
                for gram in ngrams(words, n):
                    self.index[n].setdefault(gram, set()).add(i)
            if words:
                self.lsh.insert(str(i), self._minhash(words), check_duplication=False)
        return self

    def _minhash(self, words: list[str]):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=1)
        shingles = ngrams(words, 3) or {tuple(words)}
        m.update_batch([" ".join(s).encode() for s in shingles])
        return m

    def match(self, prompt: Any) -> str | None:
        text = prompt_text(prompt)
        if text in self.exact:
            return "exact"
        words = text.split()
        for n in NGRAMS:
            grams = ngrams(words, n)
            if not grams:
                continue
            hits: Counter[int] = Counter()
            for gram in grams:
                hits.update(self.index[n].get(gram, ()))
            if hits and hits.most_common(1)[0][1] / len(grams) >= self.ngram_threshold:
                return f"ngram{n}"
        if words and self.lsh is not None and self.lsh.query(self._minhash(words)):
            return "near_duplicate"
        return None


def decontaminate(pool: list[dict[str, Any]], reference: list[Any], ngram_threshold: float = 0.5,
                  near_threshold: float = 0.8) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the rows of `pool` whose `prompt` matches no `reference` prompt, {removed, by_reason, example_ids})."""
    if not reference:
        return pool, {"removed": 0, "by_reason": {}}
    matcher = Matcher(ngram_threshold, near_threshold).fit(reference)
    kept, reasons, examples = [], Counter(), []
    for row in pool:
        reason = matcher.match(row["prompt"])
        if reason is None:
            kept.append(row)
        else:
            reasons[reason] += 1
            if len(examples) < 5:
                examples.append(row.get("id"))
    return kept, {"removed": sum(reasons.values()), "by_reason": dict(reasons), "example_ids": examples}


# ------------------------------------------------------------------------------------------------ deduplication


def shingles(text: str) -> set[str]:
    """Word 3-gram shingles of a normalized text (the whole text when it has fewer than 3 words)."""
    words = text.split()
    return {" ".join(g) for g in (ngrams(words, 3) or {tuple(words)})} if words else set()


LSH_SLACK = 0.2  # near_duplicates' LSH index looks this far below the threshold; the exact Jaccard decides


def near_duplicates(items: list[Any], threshold: float, num_perm: int = 128) -> dict[int, tuple[int, str]]:
    """{i: (j, reason)} for every item i that repeats an earlier item j it does not itself repeat: `exact` (equal
    normalized text) or `near_duplicate` (Jaccard similarity of word 3-gram shingles >= `threshold`).

    MinHash LSH (datasketch) proposes the candidates, and each is confirmed with the exact Jaccard of the two shingle
    sets, so a pair reported is a true near-duplicate. The LSH index is built for a lower similarity than
    `threshold` (`LSH_SLACK` below it): banded at the threshold itself it misses about half the pairs just above it
    (a 40-word text with one word changed, Jaccard 0.85, was missed at 0.8); lower, it proposes more candidates and
    the exact check drops them. It can still miss a pair (LSH's false negatives), never invent one. The first of a group stays; the rest point
    at it. Items are prompts (text or messages) or answers, normalized by `prompt_text`."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=max(threshold - LSH_SLACK, threshold / 2), num_perm=num_perm)
    first: dict[str, int] = {}
    kept_shingles: dict[int, set[str]] = {}
    out: dict[int, tuple[int, str]] = {}
    for i, item in enumerate(items):
        text = prompt_text(item)
        if text in first:
            out[i] = (first[text], "exact")
            continue
        first[text] = i
        grams = shingles(text)
        if not grams:
            continue
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([g.encode() for g in grams])
        similar = []
        for key in lsh.query(m):
            j = int(key)
            other = kept_shingles[j]
            if len(grams & other) / len(grams | other) >= threshold:
                similar.append(j)
        if similar:
            out[i] = (min(similar), "near_duplicate")
            continue
        lsh.insert(str(i), m, check_duplication=False)
        kept_shingles[i] = grams
    return out


def dedup(rows: list[dict[str, Any]], key: str, threshold: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the rows whose `key` repeats no earlier row's, {removed, by_reason, example_ids}): `near_duplicates`."""
    repeats = near_duplicates([row[key] for row in rows], threshold)
    reasons = Counter(reason for _, reason in repeats.values())
    examples = [[rows[i].get("id"), rows[j].get("id")] for i, (j, _) in list(repeats.items())[:5]]
    kept = [row for i, row in enumerate(rows) if i not in repeats]
    return kept, {"removed": len(repeats), "by_reason": dict(reasons), "examples": examples,
                  "near_threshold": threshold}
