"""Verifiable instruction following (prefloop/tasks/instructions.py): every checker, the splits, the generator,
the compatibility rules, and the verifier through prefloop's python judge.

OMP_NUM_THREADS=1 python -m pytest -q tests/tasks/
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math

import pytest

from prefloop.judge.stage import JudgeConfig
from prefloop.judge.stage import run as run_judge
from prefloop.records import RESERVED_COLUMNS, load_prompts
from prefloop.store import dumps, iter_records
from prefloop.tasks import instructions as task
from prefloop.tasks.instructions import (
    KINDS,
    NEVER_TOGETHER,
    SPLITS,
    TOPICS,
    all_specs,
    check,
    compatible,
    make_prompts,
    render,
    reward,
    split_paragraphs,
    split_sentences,
    split_words,
    strict,
    write_task,
)

REWARD_FN = "prefloop.tasks.instructions:reward"
STRICT_FN = "prefloop.tasks.instructions:strict"


def _ok(text: str, **spec) -> bool:
    (met,) = check(text, [spec])
    return met


# ---------------------------------------------------------------------------------------------------- text units


def test_words_are_regex_word_tokens():
    """Apostrophes and hyphens split words; digits and underscores are word characters; punctuation is not."""
    assert split_words("Don't stop: well-known 3.5 snake_case!") == ["Don", "t", "stop", "well", "known", "3", "5",
                                                                   "snake_case"]
    assert split_words("... --- !!!") == []


def test_sentences_split_on_runs_of_end_marks():
    """Runs of .!? end one sentence; pieces without a word are not sentences; numbers and P.S. split."""
    assert len(split_sentences("Hi... How are you?! Fine.")) == 3
    assert len(split_sentences("no end mark at all")) == 1
    assert len(split_sentences("line one\nline two")) == 1  # a line break does not end a sentence
    assert len(split_sentences("It costs 3.5 dollars.")) == 2
    assert len(split_sentences("P.S. call me")) == 3
    assert split_sentences("?!...") == []


def test_paragraphs_split_on_blank_lines():
    """A blank line is empty or whitespace-only; several blank lines are one break; a single newline is not."""
    assert len(split_paragraphs("one\ntwo\n\nthree\n  \t\nfour\n\n\n\nfive")) == 4
    assert split_paragraphs("   ") == []


# ---------------------------------------------------------------------------------------------------- checkers


@pytest.mark.parametrize("text, met", [
    ("all lower case.", True),
    ("it's 5 o'clock, 100% sure! (really)", True),  # digits and punctuation are free
    ("i met Ann", False),
    ("1234 !!!", False),  # no letter at all: nothing is lowercase
    ("ça va très bien", True),
    ("Ça va", False),
])
def test_lowercase(text, met):
    assert _ok(text, kind="lowercase") is met


@pytest.mark.parametrize("text, met", [
    ("I'M 5 TODAY!", True),
    ("I'm 5 today", False),  # the "m" of "I'm"
    ("HELLO, WORLD: 2024", True),
    ("HELLO WORLd", False),
    ("42 + 42", False),
    ("ÉTÉ", True),
])
def test_uppercase(text, met):
    assert _ok(text, kind="uppercase") is met


@pytest.mark.parametrize("text, char, met", [
    ("No commas here.", ",", True),
    ("One, two", ",", False),
    ("1,000 people", ",", False),  # a thousands separator is still a comma
    ("Sure thing", "!", True),
    ("Wow!", "!", False),
    ("Time 10:30", ":", False),
    ("I do not", "'", True),
    ("I don't", "'", False),
    ("I don\u2019t", "'", True),  # a typographic apostrophe is another character
    ("well-known", "-", False),
    ("well known", "-", True),
])
def test_no_char(text, char, met):
    assert _ok(text, kind="no_char", char=char) is met


@pytest.mark.parametrize("text, n, met", [
    ("one two three", 3, True),
    ("one two three four", 3, False),
    ("don't go", 3, True),  # don, t, go
    ("don't stop now", 3, False),  # don, t, stop, now
    ("state-of-the-art", 3, False),  # four words
    ("... !!! ---", 3, True),  # no words, but not empty
])
def test_max_words(text, n, met):
    assert _ok(text, kind="max_words", n=n) is met


@pytest.mark.parametrize("text, n, met", [
    ("one two three", 3, True),
    ("one two", 3, False),
    ("don't go", 3, True),  # don, t, go
    ("well-known", 2, True),
    ("a, b; c!", 3, True),
])
def test_min_words(text, n, met):
    assert _ok(text, kind="min_words", n=n) is met


@pytest.mark.parametrize("text, n, met", [
    ("One sentence only.", 1, True),
    ("One sentence without an end mark", 1, True),
    ("First. Second.", 1, False),
    ("Wait... really?! Yes.", 2, False),  # three sentences
    ("Pi is 3.14 roughly.", 1, False),  # "3.14" splits: two sentences by definition
    ("First. Second!", 2, True),
])
def test_max_sentences(text, n, met):
    assert _ok(text, kind="max_sentences", n=n) is met


@pytest.mark.parametrize("text, n, met", [
    ("One. Two. Three.", 3, True),
    ("One. Two.", 3, False),
    ("One... Two!!! Three?!", 3, True),
    ("One. . . !", 3, False),  # empty pieces are not sentences
    ("- one\n- two\n- three", 3, False),  # lines without end marks are one sentence
])
def test_min_sentences(text, n, met):
    assert _ok(text, kind="min_sentences", n=n) is met


@pytest.mark.parametrize("text, words, met", [
    ("My cat sleeps.", ["cat"], True),
    ("Cat food.", ["cat"], True),  # case-insensitive
    ("A category of things.", ["cat"], False),  # not as a substring
    ("Two cats.", ["cat"], False),  # no stemming
    ("The cat's toy", ["cat"], True),  # "cat's" is "cat", "s"
    ("A simple example.", ["simple", "example"], True),
    ("A simple idea.", ["simple", "example"], False),  # every word is needed
    ("a well-known fact", ["known"], True),
])
def test_include_words(text, words, met):
    assert _ok(text, kind="include_words", words=words) is met


@pytest.mark.parametrize("text, words, met", [
    ("It is good.", ["very"], True),
    ("Very good.", ["very"], False),  # case-insensitive
    ("Every day.", ["very"], True),  # not as a substring
    ("Also fine.", ["very", "also"], False),  # any of them fails
    ("It's really-nice", ["really"], False),
])
def test_forbid_words(text, words, met):
    assert _ok(text, kind="forbid_words", words=words) is met


@pytest.mark.parametrize("text, phrase, met", [
    ("In short, bread is baked.", "In short,", True),
    ("  \n In short, bread is baked.", "In short,", True),  # leading whitespace is stripped
    ("in short, bread is baked.", "In short,", False),  # case matters
    ("In short bread is baked.", "In short,", False),  # punctuation matters
    ('"In short," bread.', "In short,", False),
    ("**In short,** bread.", "In short,", False),
])
def test_starts_with(text, phrase, met):
    assert _ok(text, kind="starts_with", phrase=phrase) is met


@pytest.mark.parametrize("text, phrase, met", [
    ("Bread is baked. Hope this helps.", "Hope this helps.", True),
    ("Bread is baked. Hope this helps.  \n\n ", "Hope this helps.", True),  # trailing whitespace is stripped
    ("Bread is baked. Hope this helps", "Hope this helps.", False),
    ("Bread is baked. hope this helps.", "Hope this helps.", False),
    ("Hope this helps. Bye.", "Hope this helps.", False),
    ('Bread. "Hope this helps."', "Hope this helps.", False),
])
def test_ends_with(text, phrase, met):
    assert _ok(text, kind="ends_with", phrase=phrase) is met


@pytest.mark.parametrize("text, n, marker, met", [
    ("- one\n- two\n- three", 3, "-", True),
    ("Intro:\n- one\n- two\n- three\nDone.", 3, "-", True),  # other lines are allowed
    ("  - one\n\t- two\n    - three", 3, "-", True),  # leading spaces and tabs
    ("- one\n- two", 3, "-", False),
    ("- one\n- two\n- three\n- four", 3, "-", False),  # exactly n
    ("-one\n-two\n-three", 3, "-", False),  # the marker needs a space after it
    ("* one\n* two\n* three", 3, "-", False),  # the other marker
    ("* one\n* two\n* three", 3, "*", True),
    ("**Bold** title\n* one\n* two\n* three", 3, "*", True),  # "**Bold**" is not a bullet
    ("- one - two - three", 3, "-", False),  # one line, one bullet
    ("-   \n- one\n- two\n- three", 3, "-", True),  # an empty bullet does not count
])
def test_bullets(text, n, marker, met):
    assert _ok(text, kind="bullets", n=n, marker=marker) is met


@pytest.mark.parametrize("text, met", [
    ('"Bread is baked."', True),
    ('  "Bread is baked."\n', True),
    ('"Bread" is baked.', False),
    ("\u201cBread is baked.\u201d", False),  # curly quotes
    ('""', False),
    ('"  "', False),
    ('"', False),
    ('"He said "hi" to me"', True),  # only the outer characters matter
])
def test_quotes(text, met):
    assert _ok(text, kind="quotes") is met


@pytest.mark.parametrize("text, met", [
    ('{"answer": "bread"}', True),
    ('  {"a": [1, 2], "b": {"c": null}}  ', True),
    ('```json\n{"answer": "bread"}\n```', True),  # a fence with a language tag
    ('```\n{"answer": "bread"}\n```', True),
    ('```JSON {"answer": "bread"} ```', True),
    ('Here it is: {"answer": "bread"}', False),  # text outside the object
    ('```json\n{"answer": "bread"}\n```\nHope this helps.', False),  # text outside the fence
    ('{"answer": "bread",}', False),  # trailing comma: not JSON
    ("{'answer': 'bread'}", False),  # single quotes: not JSON
    ('["bread"]', False),  # an array, not an object
    ('"bread"', False),
    ("```json\n```", False),
])
def test_json(text, met):
    assert _ok(text, kind="json") is met


@pytest.mark.parametrize("text, n, met", [
    ("One.\n\nTwo.\n\nThree.", 3, True),
    ("One.\n \t\nTwo.\n\n\n\nThree.", 3, True),  # whitespace-only and repeated blank lines
    ("One.\nTwo.\nThree.", 3, False),  # single newlines do not separate
    ("One.\n\nTwo.", 3, False),
    ("\n\nOne.\n\nTwo.\n\nThree.\n\n", 3, True),  # surrounding blank lines are stripped
    ("One.\n\nTwo.\n\nThree.\n\nFour.", 3, False),  # exactly n
])
def test_paragraphs(text, n, met):
    assert _ok(text, kind="paragraphs", n=n) is met


@pytest.mark.parametrize("text, met", [
    ("Bread is baked.\nP.S. Eat it warm.", True),
    ("Bread is baked.\n\n   P.S. Eat it warm.", True),
    ("Bread is baked.\nP.S.: eat it warm", True),
    ("P.S. Eat it warm.", False),  # a postscript follows something
    ("Bread is baked. P.S. Eat it warm.", False),  # on a line of its own
    ("Bread is baked.\nPS Eat it warm.", False),
    ("Bread is baked.\np.s. eat it warm.", False),
    ("Bread is baked.\nP.S.", False),  # nothing after it
])
def test_postscript(text, met):
    assert _ok(text, kind="postscript") is met


def test_every_kind_has_checker_tests():
    """Each kind in KINDS has a test_<kind> above (a new kind must come with its tricky cases)."""
    assert all(callable(globals().get(f"test_{name}")) for name in KINDS)


@pytest.mark.parametrize("spec", [s for split in SPLITS for s in all_specs(split)], ids=str)
def test_empty_text_meets_nothing(spec):
    """An empty or whitespace-only answer meets no constraint, even "at most N words" or "no commas"."""
    assert check("", [spec]) == [False]
    assert check(" \n\t ", [spec]) == [False]


def test_check_returns_one_bool_per_constraint_in_order_and_rejects_unknown_kinds():
    specs = [{"kind": "lowercase"}, {"kind": "max_words", "n": 3}, {"kind": "no_char", "char": ","}]
    assert check("hello there, friend", specs) == [True, True, False]
    assert check("Hello there friend and more", specs) == [False, False, True]
    with pytest.raises(ValueError, match="unknown constraint"):
        check("hi", [{"kind": "rhymes"}])
    with pytest.raises(ValueError, match="unknown constraint"):
        check("hi", [{"n": 3}])


# ---------------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("spec", [s for split in SPLITS for s in all_specs(split)], ids=str)
def test_rendered_instruction_mentions_its_parameters(spec):
    """The sentence names every parameter as it will be checked: numbers, quoted words and phrases, the character,
    the bullet marker."""
    text = render(spec)
    assert text.endswith(".") and text[0].isupper()
    for key, value in spec.items():
        if key == "kind":
            continue
        for v in value if isinstance(value, list) else [value]:
            assert (f'"{v}"' if key in ("words", "phrase", "char") else str(v)) in text, (key, v, text)
    if spec["kind"] == "bullets":
        assert f'"{spec["marker"]} "' in text


def test_prompt_is_topic_then_instructions():
    for row in make_prompts(50, split="train", seed=5):
        (message,) = row["prompt"]
        assert message["role"] == "user"
        assert message["content"] == " ".join([row["topic"], *(render(c) for c in row["constraints"])])


# ---------------------------------------------------------------------------------------------------- splits


def test_topics_are_many_distinct_and_disjoint_between_splits():
    """At least 120 distinct requests, no topic in both splits, each a plain request ending with a period."""
    train, heldout = TOPICS["train"], TOPICS["heldout"]
    assert len(set(train)) == len(train) >= 90 and len(set(heldout)) == len(heldout) >= 30
    assert len(train) + len(heldout) >= 120
    assert not set(train) & set(heldout)
    assert not {t.lower() for t in train} & {t.lower() for t in heldout}
    assert all(t.endswith(".") and t[0].isupper() and '"' not in t for t in train + heldout)


def test_parameter_sets_are_disjoint_between_splits():
    """Every kind with parameters has different parameter sets in each split, down to each value (no bound, word,
    phrase, character or bullet count is shared); parameterless kinds are the same `{}` in both."""
    parameterless = {name for name, kind in KINDS.items() if kind.params["train"] == ({},)}
    assert parameterless == {"lowercase", "uppercase", "quotes", "json", "postscript"}
    for name, kind in KINDS.items():
        if name in parameterless:
            assert kind.params["heldout"] == ({},)
            continue
        train = {json.dumps(p, sort_keys=True) for p in kind.params["train"]}
        heldout = {json.dumps(p, sort_keys=True) for p in kind.params["heldout"]}
        assert train and heldout and not train & heldout, name
        key = {"include_words": "words", "forbid_words": "words", "no_char": "char", "starts_with": "phrase",
               "ends_with": "phrase"}.get(name, "n")
        values = {split: {v for p in kind.params[split] for v in (p[key] if key == "words" else [p[key]])}
                  for split in SPLITS}
        assert not values["train"] & values["heldout"], (name, values)


def test_generated_rows_use_only_their_splits_topics_and_parameters():
    for split in SPLITS:
        allowed = {json.dumps(s, sort_keys=True) for s in all_specs(split)}
        for row in make_prompts(1000, split=split, seed=3):
            assert row["topic"] in TOPICS[split]
            assert row["id"].startswith(f"if-{split}-")
            assert all(json.dumps(c, sort_keys=True) in allowed for c in row["constraints"])


def test_train_and_heldout_prompts_never_overlap():
    train = make_prompts(3000, split="train", seed=0)
    heldout = make_prompts(1000, split="heldout", seed=0)
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in heldout}


# ---------------------------------------------------------------------------------------------------- generator


def test_make_prompts_is_deterministic_per_seed():
    """Same (n, split, seed): the same rows in the same order; another seed: another draw."""
    assert make_prompts(200, split="train", seed=7) == make_prompts(200, split="train", seed=7)
    assert make_prompts(200, split="train", seed=7) != make_prompts(200, split="train", seed=8)
    assert make_prompts(50, split="train", seed=7) == make_prompts(200, split="train", seed=7)[:50]  # a prefix


def test_draws_are_pinned():
    """The draw for seed 0 never changes silently (held-out numbers must stay comparable across versions)."""
    rows = make_prompts(100, split="train", seed=0) + make_prompts(100, split="heldout", seed=0)
    digest = hashlib.sha256("".join(dumps(r) for r in rows).encode()).hexdigest()[:16]
    assert digest == "1a693fd8f5f139c0"


def test_ids_are_unique_and_content_derived():
    """Ids are unique within a draw and the same prompt gets the same id in any draw (any seed)."""
    a, b = make_prompts(2000, split="train", seed=1), make_prompts(2000, split="train", seed=2)
    assert len({r["id"] for r in a}) == 2000
    by_id = {r["id"]: r for r in a}
    shared = [r for r in b if r["id"] in by_id]
    assert shared  # the space is finite, so two big draws meet
    assert all(by_id[r["id"]] == r for r in shared)
    assert len({r["prompt"][0]["content"] for r in a}) == 2000


def test_one_or_two_constraints_and_every_kind_drawn_in_both_splits():
    for split in SPLITS:
        rows = make_prompts(3000, split=split, seed=0)
        counts = {1: 0, 2: 0}
        for row in rows:
            counts[len(row["constraints"])] += 1
        assert min(counts.values()) > 500  # repeats are skipped, and one-constraint prompts repeat more often
        assert {c["kind"] for r in rows for c in r["constraints"]} == set(KINDS)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        make_prompts(1, split="test")
    with pytest.raises(ValueError, match="n must be"):
        make_prompts(-1)
    assert make_prompts(0) == []


def test_write_task_writes_loadable_prompt_files(tmp_path):
    """The files load through prefloop's own prompt loader, with `constraints` and `topic` as columns."""
    train_path, heldout_path = write_task(tmp_path / "task", n_train=40, n_heldout=10, seed=2)
    assert (train_path.name, heldout_path.name) == ("train.jsonl", "heldout.jsonl")
    for path, split, n in ((train_path, "train", 40), (heldout_path, "heldout", 10)):
        loaded = load_prompts(path)
        assert loaded.duplicates == 0
        assert loaded.records == make_prompts(n, split=split, seed=2)
        assert not set(loaded.records[0]) & set(RESERVED_COLUMNS)


def test_module_runs_as_a_script(tmp_path, capsys):
    task.main([str(tmp_path), "--train", "5", "--heldout", "3", "--seed", "1"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "train.jsonl"), str(tmp_path / "heldout.jsonl")]
    assert len(list(iter_records(tmp_path / "heldout.jsonl"))) == 3


# ---------------------------------------------------------------------------------------------------- compatibility

FILLER = "bread"


def witness(specs: list[dict]) -> str:
    """A hand-built answer meeting every spec of a compatible set (at most one per exclusive family).

    Units (bullet lines, or paragraphs of sentences) of filler words, the include words first, then the start
    phrase, postscript and end phrase around them, then the JSON or quote wrapping, then the case.
    """
    by = {s["kind"]: s for s in specs}
    units = by.get("bullets", by.get("paragraphs", {"n": 1}))["n"]  # bullet lines, or paragraphs
    per_unit = -(-by["min_sentences"]["n"] // units) if "min_sentences" in by else 1  # sentences per paragraph
    per_sentence = by["min_words"]["n"] // units + 1 if "min_words" in by else 2  # words
    items = [[[FILLER] * per_sentence for _ in range(per_unit)] for _ in range(units)]
    items[0][0] = by.get("include_words", {"words": []})["words"] + items[0][0]
    if "bullets" in by:
        text, sep = "\n".join(f"{by['bullets']['marker']} {' '.join(item[0])}" for item in items), "\n"
    else:
        blocks = [" ".join(" ".join(sentence) + "." for sentence in item) for item in items]
        text, sep = "\n\n".join(blocks), " "
    if "starts_with" in by:
        text = by["starts_with"]["phrase"] + sep + text
    if "postscript" in by:
        text += f"\nP.S. {FILLER}."
    if "ends_with" in by:
        text += sep + by["ends_with"]["phrase"]
    if "json" in by:
        text = json.dumps({"answer": text})
    if "quotes" in by:
        text = f'"{text}"'
    if "lowercase" in by:
        text = text.lower()
    if "uppercase" in by:
        text = text.upper()
    return text


@pytest.mark.parametrize("split", SPLITS)
def test_every_single_constraint_and_every_compatible_pair_can_be_met(split):
    """For each spec alone and each ordered pair `compatible` allows, a hand-built answer meets both: the rules
    never let a contradiction through (checked exhaustively over the split's specs, not sampled)."""
    specs = all_specs(split)
    assert FILLER not in {w for s in specs if s["kind"] == "forbid_words" for w in s["words"]}
    pairs = [[a, b] for a, b in itertools.permutations(specs, 2) if compatible(a, b)]
    assert len(pairs) > 1000
    for combo in [[s] for s in specs] + pairs:
        assert all(check(witness(combo), combo)), (combo, witness(combo))


def test_generated_prompts_can_always_be_met():
    """Over many draws of both splits, every generated prompt has an answer meeting all its constraints."""
    for split in SPLITS:
        for row in make_prompts(3000, split=split, seed=11):
            assert all(check(witness(row["constraints"]), row["constraints"])), row


@pytest.mark.parametrize("a, b", [
    ({"kind": "lowercase"}, {"kind": "uppercase"}),
    ({"kind": "uppercase"}, {"kind": "starts_with", "phrase": "In short,"}),  # lowercase letters in the phrase
    ({"kind": "lowercase"}, {"kind": "starts_with", "phrase": "In short,"}),  # a capital in the phrase
    ({"kind": "lowercase"}, {"kind": "ends_with", "phrase": "That is all."}),
    ({"kind": "lowercase"}, {"kind": "postscript"}),  # "P.S." has capitals
    ({"kind": "json"}, {"kind": "bullets", "n": 3, "marker": "-"}),
    ({"kind": "json"}, {"kind": "quotes"}),
    ({"kind": "quotes"}, {"kind": "ends_with", "phrase": "That is all."}),
    ({"kind": "quotes"}, {"kind": "starts_with", "phrase": "Well,"}),
    ({"kind": "json"}, {"kind": "no_char", "char": ":"}),
    ({"kind": "no_char", "char": ","}, {"kind": "starts_with", "phrase": "In short,"}),
    ({"kind": "no_char", "char": "!"}, {"kind": "ends_with", "phrase": "Good luck!"}),
    ({"kind": "no_char", "char": "-"}, {"kind": "bullets", "n": 3, "marker": "-"}),
    ({"kind": "include_words", "words": ["very"]}, {"kind": "forbid_words", "words": ["very", "also"]}),
    ({"kind": "forbid_words", "words": ["help"]}, {"kind": "ends_with", "phrase": "Happy to help."}),
    ({"kind": "max_words", "n": 15}, {"kind": "min_words", "n": 60}),
    ({"kind": "max_words", "n": 15}, {"kind": "bullets", "n": 5, "marker": "-"}),
    ({"kind": "max_words", "n": 20}, {"kind": "paragraphs", "n": 3}),
    ({"kind": "max_sentences", "n": 1}, {"kind": "ends_with", "phrase": "Hope this helps."}),
    ({"kind": "max_sentences", "n": 2}, {"kind": "paragraphs", "n": 4}),
    ({"kind": "max_sentences", "n": 4}, {"kind": "postscript"}),
    ({"kind": "paragraphs", "n": 2}, {"kind": "bullets", "n": 2, "marker": "*"}),
    ({"kind": "max_words", "n": 30}, {"kind": "max_words", "n": 50}),
])
def test_contradictory_pairs_are_refused(a, b):
    assert not compatible(a, b) and not compatible(b, a)


def test_contradictory_pairs_never_generated():
    """No generated prompt holds two of one exclusive family, or a NEVER_TOGETHER pair."""
    for split in SPLITS:
        for row in make_prompts(3000, split=split, seed=4):
            kinds = [KINDS[c["kind"]] for c in row["constraints"]]
            families = [k.family for k in kinds if k.family in task.EXCLUSIVE_FAMILIES]
            assert len(set(families)) == len(families)
            assert len({k.name for k in kinds}) == len(kinds)
            assert frozenset(k.name for k in kinds) not in NEVER_TOGETHER or len(kinds) == 1


def test_compatible_pairs_are_plentiful():
    """The rules leave each kind at least three partner kinds in each split (two-constraint prompts stay varied)."""
    for split in SPLITS:
        specs = all_specs(split)
        for name in KINDS:
            partners = {b["kind"] for a in specs if a["kind"] == name for b in specs if compatible(a, b)}
            assert len(partners) >= 3, (split, name, partners)


# ---------------------------------------------------------------------------------------------------- verifier

TWO = [{"kind": "lowercase"}, {"kind": "max_words", "n": 5}]
ONE = [{"kind": "json"}]


def test_reward_is_the_fraction_met_and_strict_is_all_met():
    completions = ["bread is made from flour.", "Bread is made from flour.", "bread is made from flour and water.",
                   "BREAD IS MADE FROM FLOUR AND WATER", "   ", '```json\n{"a": 1}\n```', '{"a": 1']
    constraints = [TWO] * 5 + [ONE] * 2
    prompts = ["Describe how bread is made."] * 7
    assert reward(prompts, completions, constraints=constraints) == [1.0, 0.5, 0.5, 0.0, 0.0, 1.0, 0.0]
    assert strict(prompts, completions, constraints=constraints) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_reward_takes_the_last_assistant_message_of_a_message_list():
    """TRL's conversational completions: the answer is the last assistant message; a dict alone works too."""
    messages = [[{"role": "assistant", "content": "bread."}],
                [{"role": "assistant", "content": "Bread."}, {"role": "assistant", "content": "bread rises."}],
                [{"role": "assistant", "content": "bread."}, {"role": "user", "content": "SHOUTING USER"}],
                [{"role": "assistant", "content": [{"type": "text", "text": "bread "}, {"type": "text", "text": "x"}]}],
                {"role": "assistant", "content": "Bread"}]
    prompts = [[{"role": "user", "content": "Describe how bread is made."}]] * 5
    assert reward(prompts, messages, constraints=[TWO] * 5) == [1.0, 1.0, 1.0, 1.0, 0.5]


def test_reward_marks_unverifiable_rows_none_and_ignores_other_columns():
    """No completion text, or a row without constraints, is a failure to judge (None), not a zero."""
    scores = reward(["p"] * 5, [None, "bread.", "bread.", [{"role": "user", "content": "x"}], "bread."],
                    constraints=[TWO, None, [], TWO, json.dumps(TWO)], topic=["t"] * 5, answer=[1] * 5)
    assert scores == [None, None, None, None, 1.0]  # the last row's constraints arrive as JSON text (csv)
    assert strict(["p"], [None], constraints=[TWO]) == [None]


def test_reward_rejects_missing_or_misaligned_constraints():
    with pytest.raises(ValueError, match="constraints"):
        reward(["p"], ["bread."])
    with pytest.raises(ValueError, match="2 completions but 1"):
        reward(["p", "p"], ["a", "b"], constraints=[TWO])


def _candidates(tmp_path, rows: list[tuple[dict, list[str]]]):
    """A candidates file as `prefloop generate` writes it: the prompt row's extra columns under `columns`."""
    records = [{"id": row["id"], "prompt": row["prompt"],
                "completions": [{"text": t, "finish_reason": "stop", "num_tokens": len(t)} for t in texts],
                "model": "test", "round": 0, "config_hash": "x",
                "columns": {k: v for k, v in row.items() if k not in ("id", "prompt")}}
               for row, texts in rows]
    path = tmp_path / "candidates.jsonl"
    path.write_text("".join(dumps(r) for r in records))
    return path, records


def _row(constraints: list[dict], rid: str) -> dict:
    row = task.prompt_row("Describe how bread is made.", constraints, "train")
    return {**row, "id": rid}


JUDGED = [
    (_row(TWO, "two"), ["bread is flour and water.", "Bread is flour.", "bread is flour and water and salt.",
                        "BREAD IS FLOUR AND WATER AND SALT", ""]),
    (_row(ONE, "json"), ['```json\n{"answer": "bread"}\n```', 'Sure! {"answer": "bread"}']),
    (_row([{"kind": "starts_with", "phrase": "In short,"}, {"kind": "bullets", "n": 2, "marker": "-"}],
          "start-bullets"), ["In short,\n- flour\n- water", "In short, bake it.\n- flour", "- a\n- b"]),
]
EXPECTED = {"two": [1.0, 0.5, 0.5, 0.0, 0.0], "json": [1.0, 0.0], "start-bullets": [1.0, 0.5, 0.5]}


def test_reward_through_the_python_judge_as_the_judge_stage_loads_it(tmp_path):
    """`JudgeConfig.load_judge()`, on candidate rows: hand-computed scores,
    message-list completions (the prompts are chat messages), and the `constraints` column from `columns`."""
    _, records = _candidates(tmp_path, JUDGED)
    for fn, expected in ((REWARD_FN, EXPECTED), (STRICT_FN, {k: [math.floor(s) for s in v]
                                                             for k, v in EXPECTED.items()})):
        config = JudgeConfig(candidates=str(tmp_path / "candidates.jsonl"), out=str(tmp_path / "j.jsonl"),
                             judge="python", reward_fn=fn)
        judge = config.load_judge()
        verdicts = judge.judge(records)
        judge.close()
        for record, verdict in zip(records, verdicts, strict=True):
            assert verdict["scores"] == expected[record["id"]]
            assert set(verdict["statuses"]) == {"ok"}


def test_reward_through_the_judge_stage(tmp_path):
    """The whole `prefloop judge --judge python --reward-fn prefloop.tasks.instructions:reward` stage, on a file."""
    bad = {**_row(TWO, "bad"), "constraints": [{"kind": "no_such_kind"}]}
    path, _ = _candidates(tmp_path, JUDGED + [(bad, ["x", "y"])])
    out = run_judge(JudgeConfig(candidates=str(path), out=str(tmp_path / "judgments.jsonl"), judge="python",
                                reward_fn=REWARD_FN))
    judged = {row["id"]: row for _, row in iter_records(out)}
    for rid, scores in EXPECTED.items():
        assert judged[rid]["scores"] == scores and judged[rid]["status"] == "ok"
    # A malformed row is isolated as a failure with the reason, and never becomes a score.
    assert judged["bad"]["scores"] == [None, None] and judged["bad"]["status"] == "error"
    assert "unknown constraint" in judged["bad"]["errors"][0]
