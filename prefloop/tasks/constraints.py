"""The instruction task's constraint checkers and the sentences that ask for them (prefloop/tasks/instructions.py).

Every checker sees the answer stripped of surrounding whitespace; the definitions of words, sentences and
paragraphs are in the module docstring of `prefloop.tasks.instructions` and on each function.
"""

from __future__ import annotations

import json
import re

# ---------------------------------------------------------------------------------------------------- text units

_WORD = re.compile(r"\b\w+\b")
_SENTENCE_END = re.compile(r"[.!?]+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_FENCE = re.compile(r"\A```[ \t]*(?:json)?\s*(.*?)\s*```\Z", re.DOTALL | re.IGNORECASE)
_POSTSCRIPT = re.compile(r"\n[ \t]*P\.S\.[ \t]*\S")


def split_words(text: str) -> list[str]:
    """The words of `text`: every regex `\\b\\w+\\b` token, in order ("don't" -> "don", "t"; "well-known" ->
    "well", "known"; "3.5" -> "3", "5"). `\\w` is Unicode-aware and includes digits and "_"."""
    return _WORD.findall(text)


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`: the pieces between runs of `.`, `!` or `?` that contain a word character.

    "Hi... How are you?!" is 2; text without any such mark is 1 sentence if it has a word, else 0; "3.5" and
    "P.S." split (2 each), since no abbreviation or number is special-cased. Line breaks do not end sentences.
    """
    return [s for s in _SENTENCE_END.split(text) if _WORD.search(s)]


def split_paragraphs(text: str) -> list[str]:
    """The paragraphs of `text`: blocks separated by at least one blank (empty or whitespace-only) line,
    ignoring blocks that are only whitespace."""
    return [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


# ---------------------------------------------------------------------------------------------------- checkers
# Each checker takes the answer already stripped of surrounding whitespace and non-empty (`check` ensures both).


def check_lowercase(text: str) -> bool:
    """At least one lowercase letter and no uppercase letter (`str.islower`/`str.isupper` per character), so
    digits, punctuation and symbols are free: "it's 5 o'clock!" passes, "i met Ann" fails."""
    return any(c.islower() for c in text) and not any(c.isupper() for c in text)


def check_uppercase(text: str) -> bool:
    """At least one uppercase letter and no lowercase letter: "I'M 5 TODAY!" passes, "I'm 5" fails (the "m")."""
    return any(c.isupper() for c in text) and not any(c.islower() for c in text)


def check_no_char(text: str, char: str) -> bool:
    """`char` occurs nowhere in the text (a plain substring test: "no commas" means no "," at all)."""
    return char not in text


def check_max_words(text: str, n: int) -> bool:
    """At most `n` words (see `split_words`: "don't" counts as two)."""
    return len(split_words(text)) <= n


def check_min_words(text: str, n: int) -> bool:
    """At least `n` words (see `split_words`)."""
    return len(split_words(text)) >= n


def check_max_sentences(text: str, n: int) -> bool:
    """At most `n` sentences (see `split_sentences`: pieces between `[.!?]+` runs that contain a word)."""
    return len(split_sentences(text)) <= n


def check_min_sentences(text: str, n: int) -> bool:
    """At least `n` sentences (see `split_sentences`)."""
    return len(split_sentences(text)) >= n


def check_include_words(text: str, words: list[str]) -> bool:
    """Every one of `words` occurs as a whole word, case-insensitively: "Cat" counts for "cat", but neither
    "category" nor "cats" does (exact `\\b\\w+\\b` tokens, no stemming)."""
    present = {w.lower() for w in _WORD.findall(text)}
    return all(w.lower() in present for w in words)


def check_forbid_words(text: str, words: list[str]) -> bool:
    """None of `words` occurs as a whole word, case-insensitively ("very" is forbidden in "Very", not in "every")."""
    present = {w.lower() for w in _WORD.findall(text)}
    return not any(w.lower() in present for w in words)


def check_starts_with(text: str, phrase: str) -> bool:
    """The text begins with `phrase` exactly (case and punctuation included), after leading whitespace."""
    return text.startswith(phrase)


def check_ends_with(text: str, phrase: str) -> bool:
    """The text ends with `phrase` exactly (case and punctuation included), ignoring trailing whitespace."""
    return text.endswith(phrase)


def check_bullets(text: str, n: int, marker: str) -> bool:
    """Exactly `n` lines are bullets: after optional leading spaces or tabs, `marker` then a space or tab, then a
    non-space. Other lines (an intro, a closing line) are allowed; "**bold**" is not a "*" bullet (no space after)."""
    bullet = re.compile(rf"^[ \t]*{re.escape(marker)}[ \t]+\S", re.MULTILINE)
    return len(bullet.findall(text)) == n


def check_quotes(text: str) -> bool:
    """The first and last characters are ASCII double quotes (`"`), with something other than whitespace
    between them. Curly quotes do not count."""
    return len(text) >= 2 and text[0] == text[-1] == '"' and bool(text[1:-1].strip())


def check_json(text: str) -> bool:
    """The whole text is one JSON object (`json.loads` gives a dict). A Markdown code fence around it is allowed
    (```` ```json ... ``` ```` or ```` ``` ... ``` ````, since chat models habitually fence JSON); any other text
    outside the object or the fence fails, and so does a JSON array, string or number."""
    fenced = _FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return isinstance(value, dict)


def check_paragraphs(text: str, n: int) -> bool:
    """Exactly `n` paragraphs (see `split_paragraphs`: blocks separated by blank lines)."""
    return len(split_paragraphs(text)) == n


def check_postscript(text: str) -> bool:
    """A line other than the first starts (after optional spaces or tabs) with "P.S." exactly, followed on that
    line by something other than whitespace. "P.S" or "p.s." do not count."""
    return bool(_POSTSCRIPT.search(text))


# ---------------------------------------------------------------------------------------------------- instructions

_CHAR_NAMES = {",": "commas", "!": "exclamation marks", ":": "colons", "'": "apostrophes", "-": "hyphens"}


def _quoted(items: list[str], conjunction: str) -> str:
    quoted = [f'"{w}"' for w in items]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} {conjunction} {quoted[-1]}"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def render_lowercase() -> str:
    return "Write your entire answer in lowercase letters, with no capital letters at all."


def render_uppercase() -> str:
    return "Write your entire answer in capital letters only."


def render_no_char(char: str) -> str:
    return f'Do not use any {_CHAR_NAMES.get(char, "characters")} ("{char}") in your answer.'


def render_max_words(n: int) -> str:
    return f"Answer in at most {_plural(n, 'word')}."


def render_min_words(n: int) -> str:
    return f"Answer in at least {_plural(n, 'word')}."


def render_max_sentences(n: int) -> str:
    return f"Answer in at most {_plural(n, 'sentence')}."


def render_min_sentences(n: int) -> str:
    return f"Answer in at least {_plural(n, 'sentence')}."


def render_include_words(words: list[str]) -> str:
    return f"Use the word{'s' if len(words) > 1 else ''} {_quoted(words, 'and')} in your answer."


def render_forbid_words(words: list[str]) -> str:
    return f"Do not use the word{'s' if len(words) > 1 else ''} {_quoted(words, 'or')} anywhere in your answer."


def render_starts_with(phrase: str) -> str:
    return f'Begin your answer with the exact words "{phrase}".'


def render_ends_with(phrase: str) -> str:
    return f'End your answer with the exact words "{phrase}", with nothing after them.'


def render_bullets(n: int, marker: str) -> str:
    return f'Give exactly {_plural(n, "bullet point")}, each on its own line starting with "{marker} ".'


def render_quotes() -> str:
    return "Wrap your entire answer in double quotation marks."


def render_json() -> str:
    return "Write your entire answer as a single JSON object."


def render_paragraphs(n: int) -> str:
    return f"Write exactly {_plural(n, 'paragraph')}, separated by blank lines."


def render_postscript() -> str:
    return 'Add a postscript on a new line starting with "P.S.".'
