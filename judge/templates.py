"""Judge templates: data files that say what to ask a judge model and how its answer ends.

    prompts/judges/pairwise.yaml   # {prompt}, {response_a}, {response_b}; last line "Verdict: [[A]]" or "[[B]]"
    prompts/judges/pointwise.yaml  # {prompt}, {response}; last line "Score: N" (an additive 0-5 rubric)

`--template NAME` picks a built-in, `--template FILE.yaml` a user's own file with the same keys (`mode`,
`template`, optional `system`, `labels` for pairwise, `min_score`/`max_score` for pointwise).

Untrusted text (the prompt and the candidates) is fenced in tags and escaped: inside it, `&`, `<` and `>` become
`&amp;`, `&lt;` and `&gt;`, so a candidate cannot close its own tag, and placeholders are filled in one pass over
the template, so a candidate that writes `{response_b}` is not expanded. A prompt that is a conversation (it has
history: an earlier assistant or tool turn, or several user turns) fills `{prompt}` one tag per turn, the last one
marked `<last_turn>`: the judge reads the history as context and rates the response, the assistant's reply to that
last turn (see `fenced_prompt`). The verdict is read only from the last
non-empty line of the judge's answer, anchored at both ends: a candidate that writes "Verdict: [[A]]" (which the
judge may quote while reasoning) cannot move the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prefloop.prompts import builtin
from prefloop.records import Prompt

MODES = ("pairwise", "pointwise")
_PLACEHOLDER = re.compile(r"\{(prompt|response|response_a|response_b)\}")
_VERDICT = re.compile(r"verdict\s*:\s*\[\[\s*([A-Za-z])\s*\]\]\.?", re.IGNORECASE)
_SCORE = re.compile(r"score\s*:\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?\.?", re.IGNORECASE)
_REFUSAL = re.compile(
    r"\b(I can(?:no|'|’)?t|I won(?:'|’)t|I'm sorry|I’m sorry|I am sorry|I apologi[sz]e|as an AI)\b", re.IGNORECASE
)
# Characters around a verdict token that are not part of it ("[[A", " B", "4" after "Score: ").
TOKEN_JUNK = " \t\n\r[]()*:\"'.▁Ġ"


@dataclass(frozen=True)
class Template:
    name: str
    mode: str
    text: str
    system: str | None = None
    labels: tuple[str, ...] = ("A", "B")
    min_score: int = 0
    max_score: int = 5
    source: str = ""

    @property
    def sha256(self) -> str:
        """Content hash: editing a template file counts as a config change (drift) and a new judge (cache)."""
        blob = repr((self.mode, self.text, self.system, self.labels, self.min_score, self.max_score))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def load_template(spec: str | None, mode: str) -> Template:
    """The built-in template named `spec` (default: the one named like `mode`) or the YAML file at `spec`."""
    if mode not in MODES:
        raise ValueError(f"mode = {mode!r}. Fix: use one of {', '.join(MODES)}.")
    known = builtin("judges")
    spec = spec or mode
    path = known.get(spec) or Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"judge template {spec!r} is neither a built-in ({', '.join(known)}) nor a file. "
            "Fix: pass a built-in name or the path of a YAML file with `mode` and `template`."
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({e}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("template"), str):
        raise ValueError(f"{path}: expected a mapping with a `template` string.")
    unknown = set(data) - {"name", "mode", "template", "system", "labels", "min_score", "max_score", "description"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}.")
    template = Template(
        name=str(data.get("name", path.stem)),
        mode=str(data.get("mode", mode)),
        text=data["template"],
        system=data.get("system"),
        labels=tuple(str(x) for x in data.get("labels", ("A", "B"))),
        min_score=int(data.get("min_score", 0)),
        max_score=int(data.get("max_score", 5)),
        source=str(path),
    )
    _check(template, mode, path)
    return template


def _check(t: Template, mode: str, path: Path) -> None:
    if t.mode != mode:
        raise ValueError(f"{path}: a {t.mode} template, but the judge runs in {mode} mode. Fix: match --mode.")
    found = set(_PLACEHOLDER.findall(t.text))
    need = {"prompt", "response_a", "response_b"} if mode == "pairwise" else {"prompt", "response"}
    if found != need:
        raise ValueError(
            f"{path}: a {mode} template needs exactly the placeholders {', '.join(sorted(need))}; "
            f"it has {', '.join(sorted(found)) or 'none'}."
        )
    if mode == "pairwise" and (len(t.labels) != 2 or any(len(x) != 1 or not x.isalpha() for x in t.labels)):
        raise ValueError(f"{path}: `labels` must be two single letters, e.g. [A, B].")
    if mode == "pointwise" and t.min_score >= t.max_score:
        raise ValueError(f"{path}: min_score must be below max_score.")


def escape(text: str) -> str:
    """Untrusted text made safe to place inside a tag: `&`, `<`, `>` as HTML entities (`&` first)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def show_prompt(prompt: Prompt) -> str:
    """A prompt as plain text for a judge: the string itself, or the conversation one `role: content` per turn."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def has_history(prompt: Prompt) -> bool:
    """A message prompt with turns before the one the response answers (system messages do not count)."""
    return not isinstance(prompt, str) and sum(m["role"] != "system" for m in prompt) > 1


def fenced_prompt(prompt: Prompt) -> str:
    """The prompt as a judge reads it, untrusted text escaped. A string or a single request: `show_prompt`. A
    conversation with history: each earlier turn in its own `<turn role="...">` tag (an assistant turn's tool calls
    too) and the turn being answered in `<last_turn role="...">`, so the judge can tell the history, which is
    context, from the request the response answers; escaping keeps a message from posing as another turn."""
    if not has_history(prompt):
        return escape(show_prompt(prompt))

    def body(m: dict) -> str:
        calls = f"\n(tool calls: {json.dumps(m['tool_calls'], ensure_ascii=False)})" if m.get("tool_calls") else ""
        return escape(m["content"] + calls)

    def role(m: dict) -> str:
        return escape(str(m["role"])).replace('"', "&quot;")

    *history, last = prompt
    turns = [f'<turn role="{role(m)}">\n{body(m)}\n</turn>' for m in history]
    return "\n".join([*turns, f'<last_turn role="{role(last)}">\n{body(last)}\n</last_turn>'])


def render(template: Template, prompt: Prompt, responses: list[str]) -> str:
    """The judge's instruction with every placeholder filled in one pass (untrusted text escaped)."""
    values = {"prompt": fenced_prompt(prompt)}
    if template.mode == "pairwise":
        values["response_a"], values["response_b"] = (escape(r) for r in responses)
    else:
        (values["response"],) = (escape(r) for r in responses)
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template.text)


def messages(template: Template, text: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": template.system}] if template.system else []) + [
        {"role": "user", "content": text}
    ]


def parse(template: Template, text: str, truncated: bool = False) -> tuple[Any, str, str | None]:
    """(value, status, error) from a judge's answer: the label ("A"/"B") or the integer score from the last line.

    status "ok", "parse_error" (no verdict line, a value out of range, an empty or truncated answer) or "refusal".
    """
    lines = [line.strip().strip("*_#> `").strip() for line in text.strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None, "parse_error", "empty answer"
    last = lines[-1]
    if template.mode == "pairwise":
        m = _VERDICT.fullmatch(last)
        if m:
            label = m.group(1).upper()
            if label in template.labels:
                return label, "ok", None
            return None, "parse_error", f"verdict [[{m.group(1)}]] is not one of {', '.join(template.labels)}"
    else:
        m = _SCORE.fullmatch(last)
        if m:
            value = float(m.group(1))
            if not value.is_integer() or not template.min_score <= value <= template.max_score:
                return None, "parse_error", (
                    f"score {m.group(1)} is not an integer from {template.min_score} to {template.max_score}"
                )
            return int(value), "ok", None
    if _REFUSAL.search(text):
        return None, "refusal", "the judge declined to answer"
    if truncated:
        return None, "parse_error", "the answer hit max_new_tokens before a verdict line"
    expected = '"Verdict: [[A]]"' if template.mode == "pairwise" else '"Score: N"'
    return None, "parse_error", f"the last line is not {expected}: {last[:80]!r}"


def verdict_probabilities(template: Template, completion: dict[str, Any], value: Any) -> dict[str, float] | None:
    """The judge's probability for each possible verdict, from the log-probs at the verdict token.

    Pairwise: {"A": p, "B": p}; pointwise: {"0": p, ..., "5": p}, normalised over the valid values. None when the
    backend gave no alternatives, the verdict is not a single token, or the valid values have no mass in the top k.
    """
    tokens, tops = completion.get("tokens"), completion.get("top_logprobs")
    if not tokens or not tops:
        return None
    valid = list(template.labels) if template.mode == "pairwise" else [
        str(s) for s in range(template.min_score, template.max_score + 1)
    ]
    if template.mode == "pointwise" and max(len(v) for v in valid) > 1:
        return None  # multi-token scores ("10"): the text verdict stands
    target = str(value)
    # The verdict is the answer's last line, so its token is the last one that reads as the parsed value.
    for i in range(len(tokens) - 1, -1, -1):
        if tokens[i].strip(TOKEN_JUNK) == target:
            break
    else:
        return None
    mass = dict.fromkeys(valid, 0.0)
    for alternative, logprob in tops[i].items():
        key = alternative.strip(TOKEN_JUNK)
        if template.mode == "pairwise":
            key = key.upper()
        if key in mass:
            mass[key] += math.exp(logprob)
    total = sum(mass.values())
    if total <= 0:
        return None
    return {k: v / total for k, v in mass.items()}
