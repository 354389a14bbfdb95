"""`load_prompts`: every accepted format, id derivation, duplicates, and errors naming file:line, field and fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from prefloop.records import load_prompts, prompt_id
from prefloop.store import InputError


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"prompt": "What is 2+2?"}
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


# --- errors: file:line, field, fix ------------------------------------------------------------------------------


def test_broken_json_line_names_file_and_line(tmp_path):
    """A malformed JSON line raises InputError naming `file:line` and how to fix it."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "b"}) + "\n" + '{"prompt": "unterminated\n')
    with pytest.raises(InputError) as e:
        load_prompts(path)
    assert f"{path}:3" in str(e.value)
    assert "JSON" in str(e.value) and "Fix" in str(e.value)


def test_non_object_line(tmp_path):
    """A JSON line that is not an object (e.g. a bare string) names file:line."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GOOD) + '\n"just a string"\n')
    with pytest.raises(InputError, match=re.escape(f"{path}:2")):
        load_prompts(path)


@pytest.mark.parametrize(
    "bad_row,field_text",
    [
        pytest.param({"question": "x"}, "`prompt`", id="missing-prompt"),
        pytest.param({"prompt": None}, "`prompt`", id="null-prompt"),
        pytest.param({"prompt": ""}, "`prompt`", id="empty-prompt"),
        pytest.param({"prompt": "   \n\t"}, "`prompt`", id="blank-prompt"),
        pytest.param({"prompt": 42}, "`prompt`", id="number-prompt"),
        pytest.param({"prompt": []}, "`prompt`", id="empty-message-list"),
        pytest.param({"prompt": [{"role": "human", "content": "hi"}]}, "prompt[0].role", id="wrong-role"),
        pytest.param({"prompt": [{"role": "user", "content": ["hi"]}]}, "prompt[0].content", id="non-string-content"),
        pytest.param({"prompt": [{"role": "user", "content": None}]}, "prompt[0].content", id="null-content"),
        pytest.param({"prompt": [{"role": "user"}]}, "prompt[0]", id="message-without-content"),
        pytest.param({"prompt": ["hi"]}, "prompt[0]", id="message-not-object"),
        pytest.param(
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "`prompt`",
            id="ends-with-assistant",
        ),
        pytest.param({"prompt": [{"role": "system", "content": "s"}]}, "`prompt`", id="no-user-message"),
        pytest.param({"prompt": [{"role": "user", "content": "  "}]}, "`prompt`", id="empty-user-message"),
    ],
)
def test_bad_row_names_file_line_and_field(tmp_path, bad_row, field_text):
    """A row with a bad prompt raises InputError naming `file:line` and the field."""
    path = _jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "ok"}, bad_row])
    with pytest.raises(InputError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert f"{path}:3:" in msg, msg
    assert field_text in msg, msg


def test_wrong_role_message_suggests_rename(tmp_path):
    """A wrong role names the valid roles and suggests the rename (human -> user)."""
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "human", "content": "hi"}]}])
    with pytest.raises(InputError) as e:
        load_prompts(path)
    assert "'human'" in str(e.value) and "user" in str(e.value) and "Fix" in str(e.value)


def test_non_utf8_byte_names_file_and_line(tmp_path):
    """A non-UTF-8 byte raises InputError naming `file:line` and suggesting a re-encode."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(InputError) as e:
        load_prompts(path)
    assert f"{path}:2" in str(e.value) and "UTF-8" in str(e.value)


def test_non_utf8_json_array_is_an_input_error(tmp_path):
    """A non-UTF-8 byte in a `.json` array file raises InputError naming the file (not a bare UnicodeDecodeError)."""
    path = tmp_path / "p.json"
    path.write_bytes(b'[{"prompt": "ok"},\n {"prompt": "caf\xe9"}]')
    with pytest.raises(InputError) as e:
        load_prompts(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("with_id", [False, True], ids=["derived-id", "given-id"])
def test_lone_surrogate_is_an_input_error(tmp_path, with_id):
    """A JSON `\\ud800` escape (a lone surrogate: not encodable as UTF-8) is refused at load time naming file:line."""
    path = tmp_path / "p.jsonl"
    row = '{"id": "x", "prompt": "a\\ud800b"}' if with_id else '{"prompt": "a\\ud800b"}'
    path.write_text(json.dumps(GOOD) + "\n" + row + "\n")
    with pytest.raises(InputError, match=re.escape(f"{path}:2")):
        load_prompts(path)


def test_json_array_errors_name_the_item(tmp_path):
    """In a JSON array file, field errors name the file and the item number; bad JSON names the line."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps([GOOD, {"prompt": ""}]))
    with pytest.raises(InputError) as e:
        load_prompts(path)
    assert f"{path}:item 2" in str(e.value) and "`prompt`" in str(e.value)
    path.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    with pytest.raises(InputError, match=re.escape(f"{path}:3")):
        load_prompts(path)


def test_missing_file_and_empty_file(tmp_path):
    """A missing prompts file, and a file with no rows, raise InputError naming the file."""
    with pytest.raises(InputError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="no prompts"):
        load_prompts(tmp_path / "empty.jsonl")


# --- formats ----------------------------------------------------------------------------------------------------

ROWS = [
    {"id": "a", "prompt": "one", "answer": "1"},
    {"id": "b", "prompt": "two", "answer": "2"},
]


def _expected(rows=ROWS):
    return [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]} for r in rows]


def test_jsonl_with_blank_lines(tmp_path):
    """JSONL rows load in order; blank lines are skipped."""
    path = tmp_path / "p.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert load_prompts(path).records == _expected()


def test_json_array_file(tmp_path):
    """A `.json` file holding an array of rows loads like JSONL."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert load_prompts(path).records == _expected()


def test_json_suffix_with_jsonl_content(tmp_path):
    """A `.json` file that holds JSON lines (not an array) is read as JSONL."""
    path = _jsonl(tmp_path / "p.json", ROWS)
    assert load_prompts(path).records == _expected()


def test_parquet_file(tmp_path):
    """A parquet file loads through `datasets`, message prompts included."""
    import datasets

    rows = [*ROWS]
    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    assert load_prompts(path).records == _expected()
    msg_path = tmp_path / "m.parquet"
    datasets.Dataset.from_list([{"prompt": MSGS, "answer": "x"}]).to_parquet(str(msg_path))
    (rec,) = load_prompts(msg_path).records
    assert rec["prompt"] == MSGS and rec["id"] == prompt_id(MSGS)


def test_parquet_field_error_names_row(tmp_path):
    """A bad row in parquet names the file, the row number and the field."""
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"prompt": "ok"}, {"prompt": ""}]).to_parquet(str(path))
    with pytest.raises(InputError) as e:
        load_prompts(path)
    assert f"{path}:row 2" in str(e.value) and "`prompt`" in str(e.value)


def test_csv_file(tmp_path):
    """A csv file loads through `datasets`; numeric-looking ids become strings."""
    import datasets

    path = tmp_path / "p.csv"
    datasets.Dataset.from_list([{"id": 7, "prompt": "seven"}, {"id": 8, "prompt": "eight"}]).to_csv(
        str(path), index=False
    )
    recs = load_prompts(path).records
    assert [(r["id"], r["prompt"]) for r in recs] == [("7", "seven"), ("8", "eight")]


def test_hf_save_to_disk_dir(tmp_path):
    """A directory written by `Dataset.save_to_disk` (and by `DatasetDict.save_to_disk`: its train split) loads."""
    import datasets

    one = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(one))
    assert load_prompts(one).records == _expected()
    dd = tmp_path / "dd"
    other = [{"id": "z", "prompt": "test split", "answer": "0"}]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(other)}
    ).save_to_disk(str(dd))
    assert load_prompts(dd).records == _expected()


def test_rewritten_parquet_is_reread(tmp_path):
    """Rewriting a parquet file at the same path is seen on the next load (no stale `datasets` cache)."""
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    load_prompts(path)
    datasets.Dataset.from_list([{"id": "c", "prompt": "three", "answer": "3"}]).to_parquet(str(path))
    assert [r["id"] for r in load_prompts(path).records] == ["c"]


# --- fields, ids, duplicates ------------------------------------------------------------------------------------


def test_prompt_field_and_id_field_mapping(tmp_path):
    """`prompt_field`/`id_field` map other column names onto `prompt`/`id`; the mapped columns are not duplicated."""
    path = _jsonl(tmp_path / "p.jsonl", [{"qid": 1, "question": "why?", "answer": "because"}])
    (rec,) = load_prompts(path, prompt_field="question", id_field="qid").records
    assert rec == {"id": "1", "prompt": "why?", "answer": "because"}


def test_prompt_field_missing_names_mapped_field(tmp_path):
    """With `prompt_field=question`, a row lacking it names `question` and suggests --prompt-field."""
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    with pytest.raises(InputError) as e:
        load_prompts(path, prompt_field="question")
    assert "`question`" in str(e.value) and "--prompt-field" in str(e.value) and f"{path}:1" in str(e.value)


def test_ids_derived_from_content_and_stable(tmp_path):
    """Rows without an id get `sha256(canonical prompt)[:16]`: the same across loads, files and key orders."""
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}, {"prompt": MSGS}, {"id": "", "prompt": "empty id"}])
    recs = load_prompts(path).records
    assert [r["id"] for r in recs] == [prompt_id("hello"), prompt_id(MSGS), prompt_id("empty id")]
    assert [r["id"] for r in load_prompts(path).records] == [r["id"] for r in recs]
    assert all(len(r["id"]) == 16 and int(r["id"], 16) >= 0 for r in recs)
    # Key order inside messages does not matter (canonical JSON).
    reordered = [{"content": m["content"], "role": m["role"]} for m in MSGS]
    assert prompt_id(reordered) == prompt_id(MSGS)
    # Pinned: ids are resume keys written to disk, so the derivation must never change silently.
    assert prompt_id("hello") == "5aa762ae383fbb72"


def test_duplicate_prompts_dropped_and_counted(tmp_path):
    """Repeated prompts (same content, with or without ids) are kept once and counted in `duplicates`."""
    rows = [
        {"prompt": "a"},
        {"prompt": "b"},
        {"prompt": "a"},  # same derived id
        {"id": "other", "prompt": "b"},  # same content, different id
        {"id": "x", "prompt": "c"},
        {"id": "x", "prompt": "c"},  # same id, same content
    ]
    loaded = load_prompts(_jsonl(tmp_path / "p.jsonl", rows))
    assert [r["prompt"] for r in loaded.records] == ["a", "b", "c"]
    assert loaded.duplicates == 3


def test_same_id_different_content_raises_naming_both_locations(tmp_path):
    """One id on two different prompts is an error naming both file:line locations and the fix."""
    path = _jsonl(tmp_path / "p.jsonl", [{"id": "q1", "prompt": "a"}, {"prompt": "z"}, {"id": "q1", "prompt": "b"}])
    with pytest.raises(InputError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert f"{path}:3" in msg and f"{path}:1" in msg and "'q1'" in msg and "Fix" in msg


def test_extra_columns_kept(tmp_path):
    """Columns other than prompt/id (answer, nested metadata) are kept on the record, values intact."""
    row = {"prompt": "2+2=", "answer": "4", "meta": {"src": "gsm", "tags": [1, 2]}, "weight": 0.5}
    (rec,) = load_prompts(_jsonl(tmp_path / "p.jsonl", [row])).records
    assert rec["answer"] == "4" and rec["meta"] == {"src": "gsm", "tags": [1, 2]} and rec["weight"] == 0.5
    assert list(rec)[:2] == ["id", "prompt"]


def test_chat_wraps_strings_only(tmp_path):
    """`chat=True` wraps a plain string as one user message; message prompts are left as they are."""
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": MSGS}])
    recs = load_prompts(path, chat=True).records
    assert recs[0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert recs[0]["id"] == prompt_id([{"role": "user", "content": "hi"}])
    assert recs[1]["prompt"] == MSGS
    plain = load_prompts(path).records
    assert plain[0]["prompt"] == "hi"


def test_tool_and_system_roles_accepted(tmp_path):
    """system/user/assistant/tool roles are valid; a multi-turn conversation ending with user loads as is."""
    conv = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "tool", "content": "t"},
        {"role": "user", "content": "q2"},
    ]
    (rec,) = load_prompts(_jsonl(tmp_path / "p.jsonl", [{"prompt": conv}])).records
    assert rec["prompt"] == conv
