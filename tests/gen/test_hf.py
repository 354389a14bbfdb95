"""HFGenerator on a real tiny Llama (CPU, fp32 so exact comparisons are not blurred by bf16 rounding)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefloop.demo.tiny import build_model, build_tokenizer
from prefloop.device import resolve_dtype
from prefloop.gen import Sampling
from prefloop.gen.hf import HFGenerator

PROMPTS = ["7", "12+34=", "The quick brown fox jumps over the lazy dog, then", "a" * 70, "Hello, w"]
GREEDY = Sampling(max_new_tokens=12, temperature=0.0)


def make_gen(path: Path, **kw) -> HFGenerator:
    return HFGenerator(str(path), dtype="float32", device="cpu", **kw)


@pytest.fixture(scope="module")
def gen(tiny_model: Path) -> HFGenerator:
    return make_gen(tiny_model, batch_size=6)


def texts(out) -> list[list[str]]:
    return [[c["text"] for c in cs] for cs in out]


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose greedy first token is always EOS.

    With o_proj/down_proj zeroed the residual stream is just the input embedding; every embedding row is a positive
    multiple of the all-ones vector, so the final hidden state is all-ones and (tied weights) the logit of token t is
    sum(E[t]): EOS, with the largest multiple, always wins.
    """
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = model.get_input_embeddings().weight
        emb.fill_(1.0)
        emb[tokenizer.eos_token_id] = 2.0
    out = tmp_path_factory.mktemp("eos") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(adapter dir, merged model dir): a LoRA with random nonzero B (so it changes outputs) and its manual merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # LoRA initialises B to zero, which would leave the model unchanged
    root = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(root / "adapter")
    peft_model.merge_and_unload().save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(root / "merged")
    return root / "adapter", root / "merged"


def test_order_and_batching_match_one_by_one(gen: HFGenerator, tiny_model: Path):
    """n completions per prompt, in input order; greedy output of length-sorted left-padded batches equals one-by-one."""
    out = gen.generate(PROMPTS, n=2, sampling=GREEDY)
    assert [len(cs) for cs in out] == [2] * len(PROMPTS)
    assert len({cs[0]["text"] for cs in out}) == len(PROMPTS)  # distinct outputs, so a reordering would show
    single = make_gen(tiny_model, batch_size=1)
    for i, prompt in enumerate(PROMPTS):
        assert texts(single.generate([prompt], n=2, sampling=GREEDY))[0] == texts(out)[i], f"prompt {i}"
    capped = make_gen(tiny_model, batch_size=64, max_batch_tokens=100)  # token cap forces smaller batches
    assert texts(capped.generate(PROMPTS, n=2, sampling=GREEDY)) == texts(out)


def test_messages_go_through_chat_template(gen: HFGenerator):
    """A message prompt is rendered with the chat template (+ generation prompt); a string is used as raw text."""
    messages = [{"role": "user", "content": "12+34="}]
    rendered = gen.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "user: 12+34=\nassistant: "
    chat, raw_rendered, raw = gen.generate([messages, rendered, "12+34="], n=1, sampling=GREEDY)
    assert chat == raw_rendered
    assert chat != raw


def test_finish_reason_length(gen: HFGenerator):
    """Without EOS, a completion ends at max_new_tokens with finish_reason 'length' and num_tokens == max_new_tokens."""
    # Prompts whose greedy continuation (random model) has no special tokens, so text length == token count.
    out = gen.generate(["7", "12+34=", "Hello, w"], n=2, sampling=Sampling(max_new_tokens=7, temperature=0.0))
    for cs in out:
        for c in cs:
            assert (c["finish_reason"], c["num_tokens"]) == ("length", 7)
            assert len(c["text"]) == 7  # char-level tokenizer: one character per token


def test_finish_reason_stop_on_eos(eos_model: Path):
    """An EOS ends the completion: finish_reason 'stop', the EOS counted in num_tokens, and not in the text."""
    out = make_gen(eos_model).generate(["12+34=", [{"role": "user", "content": "hi"}]], n=3, sampling=GREEDY)
    assert out == [[{"text": "", "finish_reason": "stop", "num_tokens": 1}] * 3] * 2


def test_stop_string_truncates(gen: HFGenerator):
    """A stop string ends the completion: the text is cut before it, finish_reason 'stop', tokens counted through it."""
    full = gen.generate(["Hello, w"], n=1, sampling=GREEDY)[0][0]["text"]
    stop = full[4:6]
    cut = gen.generate(["Hello, w"], n=1, sampling=Sampling(max_new_tokens=12, temperature=0.0, stop=[stop]))[0][0]
    assert cut["text"] == full[: full.find(stop)]
    assert cut["finish_reason"] == "stop"
    assert cut["num_tokens"] == full.find(stop) + len(stop)  # char-level: tokens up to the end of the stop string


def test_seeded_sampling_is_reproducible(gen: HFGenerator):
    """At temperature 1 the same seed gives the same texts and a different seed different ones."""
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=7)
    first = texts(gen.generate(PROMPTS, n=3, sampling=sampling))
    assert texts(gen.generate(PROMPTS, n=3, sampling=sampling)) == first
    other = texts(gen.generate(PROMPTS, n=3, sampling=Sampling(max_new_tokens=12, temperature=1.0, seed=8)))
    assert other != first
    assert len(set(first[0])) > 1  # the n samples of one prompt differ from each other


def test_a_prompts_samples_depend_on_its_seed_not_its_batch(gen: HFGenerator):
    """With per-prompt seeds, each prompt sampled alone gets exactly what it got in one call with the others (what
    lets a resumed stage, whose chunks are cut differently, write what a straight run wrote)."""
    seeds = [11, 2024, 7, 0, 99]
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seeds=seeds)
    together = texts(gen.generate(PROMPTS, n=3, sampling=sampling))
    alone = [texts(gen.generate([p], n=3, sampling=Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9,
                                                            seeds=[s])))[0] for p, s in zip(PROMPTS, seeds, strict=True)]
    assert together == alone
    reordered = texts(gen.generate(PROMPTS[::-1], n=3, sampling=Sampling(max_new_tokens=12, temperature=1.0,
                                                                          top_p=0.9, seeds=seeds[::-1])))
    assert reordered == together[::-1]


def test_the_static_kv_cache_samples_what_the_dynamic_one_samples(gen: HFGenerator, tiny_model: Path):
    """The default preallocated cache (`kv_cache="static"`) changes where keys and values are kept, not what is
    sampled: the same texts as transformers' dynamic cache greedy (decoded once) and sampled (shared prefill, n=3),
    and the same log-probs to float noise."""
    assert gen.kv_cache == "static"
    dynamic = make_gen(tiny_model, batch_size=6, kv_cache="dynamic")
    assert texts(dynamic.generate(PROMPTS, n=2, sampling=GREEDY)) == texts(gen.generate(PROMPTS, n=2, sampling=GREEDY))
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=5, logprobs=True)
    mine, theirs = dynamic.generate(PROMPTS, n=3, sampling=sampling), gen.generate(PROMPTS, n=3, sampling=sampling)
    assert texts(mine) == texts(theirs)
    for a, b in zip((c for cs in mine for c in cs), (c for cs in theirs for c in cs), strict=True):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
    with pytest.raises(ValueError, match="kv_cache = 'paged'"):
        make_gen(tiny_model, kv_cache="paged")


def test_prefill_groups_split_where_padding_would_waste_a_quarter():
    """By hand: rows sorted longest first; a row shorter than 75% of its group's longest starts a new group once the
    group holds 256 padded tokens."""
    from prefloop.gen.hf import _prefill_groups

    # 70 < 75 but the group holds 2 x 100 = 200 tokens: kept; 60 < 75 with 300 tokens: split. In the second group
    # (longest 60) 40 and 10 are short, but it never reaches 256 tokens.
    assert _prefill_groups([100, 90, 70, 60, 40, 10]) == [(0, 3), (3, 6)]
    assert _prefill_groups([100, 90, 80, 76]) == [(0, 4)]
    assert _prefill_groups([300, 10, 5]) == [(0, 1), (1, 3)]
    assert _prefill_groups([7]) == [(0, 1)]
    assert _prefill_groups([]) == []


@pytest.fixture(scope="module")
def sliding_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Mistral with a 24-token sliding window: its StaticCache layers keep a window, not every slot."""
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=24, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    out = tmp_path_factory.mktemp("sliding") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(("model", "kv_cache"), [("tiny_model", "static"), ("tiny_model", "dynamic"),
                                                 ("sliding_model", "static")])
def test_grouped_prefill_samples_what_transformers_own_prefill_samples(request, model: str, kv_cache: str):
    """The shared prefill in length groups (each group padded only to its own longest prompt, its cache written
    right-aligned into the batch's) against transformers' own path: every prompt copied n times and prefilled by
    `generate` on left-padded rows. Same texts, and log-probs to float noise. The sliding-window model's cache
    layers are not plain ones, so they take the prefill through their own update()."""
    from prefloop.gen.hf import _prefill_groups

    path = request.getfixturevalue(model)
    text = "The quick brown fox jumps over the lazy dog, then 12+34=46 and 7+8=15. " * 2
    prompts = [text[:k] for k in (100, 95, 70, 60, 40, 30, 12, 5, 2)] + ["7"]
    sampling = Sampling(max_new_tokens=10, temperature=1.0, seed=3, logprobs=True)
    grouped = make_gen(path, batch_size=64, kv_cache=kv_cache)
    assert grouped._share_prefill and grouped.kv_cache == kv_cache
    lengths = sorted((len(grouped._encode(p)) for p in prompts), reverse=True)
    assert len(_prefill_groups(lengths)) >= 3, lengths  # the batch really is prefilled in several groups
    own = make_gen(path, batch_size=64, kv_cache=kv_cache)
    own._share_prefill = False
    mine, theirs = grouped.generate(prompts, n=3, sampling=sampling), own.generate(prompts, n=3, sampling=sampling)
    assert texts(mine) == texts(theirs)
    for a, b in zip((c for cs in mine for c in cs), (c for cs in theirs for c in cs), strict=True):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)


def test_row_sampler_draws_from_the_warped_distribution():
    """prefloop's per-row sampler draws each token with probability softmax(logits / T) restricted to the top-p
    nucleus, as a hand computation gives (4 tokens, 20,000 draws)."""
    import torch

    from prefloop.gen.hf import _RowSampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    t, top_p = 0.5, 0.95
    p = torch.softmax(logits[0] / t, -1)  # [0.8668, 0.1173, 0.0159, 0.0000]
    want = torch.cat([p[:2] / p[:2].sum(), torch.zeros(2)])  # the smallest set holding 95%: the first two
    sampler = _RowSampler([5], Sampling(temperature=t, top_p=top_p), top_k=0)
    counts = torch.zeros(4)
    for _ in range(20_000):
        counts += (sampler(torch.zeros(1, 1, dtype=torch.long), logits.clone())[0] == 0).float()
    assert counts[2:].sum() == 0
    assert torch.allclose(counts / 20_000, want, atol=0.01)


def test_temperature_zero_is_greedy(gen: HFGenerator):
    """temperature 0 means greedy: all n completions of a prompt are identical, whatever the seed."""
    out = texts(gen.generate(PROMPTS, n=4, sampling=GREEDY))
    assert all(len(set(cs)) == 1 for cs in out)
    reseeded = Sampling(max_new_tokens=12, temperature=0.0, seed=123)
    assert texts(gen.generate(PROMPTS, n=4, sampling=reseeded)) == out


def test_adapter_changes_outputs_and_equals_merged(gen: HFGenerator, tiny_model: Path, lora: tuple[Path, Path]):
    """A LoRA adapter loaded via `adapter=` changes greedy outputs and matches the manually merged model."""
    adapter, merged = lora
    with_adapter = make_gen(tiny_model, adapter=str(adapter), batch_size=6)
    assert with_adapter.name == f"{tiny_model}+adapter:{adapter}"
    out = texts(with_adapter.generate(PROMPTS, n=1, sampling=GREEDY))
    assert out != texts(gen.generate(PROMPTS, n=1, sampling=GREEDY))
    assert out == texts(make_gen(merged, batch_size=6).generate(PROMPTS, n=1, sampling=GREEDY))


def test_overlong_prompt_raises_naming_index(gen: HFGenerator):
    """A prompt that leaves no room for max_new_tokens in the context raises ValueError naming its index; no truncation."""
    with pytest.raises(ValueError, match=r"prompt 1 has 120 tokens.*at most 116 fit"):
        gen.generate(["ok", "x" * 120], n=1, sampling=GREEDY)


def test_tokens_generated_accumulates(tiny_model: Path):
    """`tokens_generated` sums num_tokens of the decoded sequences: n per prompt when sampling, 1 when greedy."""
    g = make_gen(tiny_model)
    out = g.generate(PROMPTS[:2], n=3, sampling=Sampling(max_new_tokens=5, temperature=1.0))
    assert g.tokens_generated == sum(c["num_tokens"] for cs in out for c in cs) == 30
    g.generate(PROMPTS[:2], n=3, sampling=Sampling(max_new_tokens=5, temperature=0.0))
    assert g.tokens_generated == 30 + 2 * 5
    g.close()
    with pytest.raises(RuntimeError, match="after close"):
        g.generate(["x"], n=1, sampling=GREEDY)


def test_dtype_resolution():
    """An explicit dtype wins; an unknown one fails naming the choices; auto picks fp32 or bf16 with a reason."""
    assert resolve_dtype("float32", torch.device("cpu")) == (torch.float32, "set by the user")
    with pytest.raises(ValueError, match="choose auto"):
        resolve_dtype("float8", torch.device("cpu"))
    dtype, reason = resolve_dtype("auto", torch.device("cpu"))
    assert dtype in (torch.float32, torch.bfloat16) and reason


def test_missing_pad_token_falls_back_to_eos(tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A tokenizer without a pad token pads with EOS, says so in the log, and still generates correctly."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(tiny_model, tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "m")
    with caplog.at_level("WARNING", logger="prefloop.gen.hf"):
        g = make_gen(tmp_path / "m")
    assert "no pad token" in caplog.text and g.tokenizer.pad_token == g.tokenizer.eos_token
    assert texts(g.generate(PROMPTS, n=1, sampling=GREEDY)) == texts(make_gen(tiny_model).generate(PROMPTS, 1, GREEDY))


def test_logprobs_are_the_models_own(gen: HFGenerator):
    """`logprobs` holds, per generated token, log p(token | prefix) under the raw model -- a teacher-forced forward
    pass over the greedy tokens recomputes them -- one per counted token; asking for them changes no text."""
    prompts = ["12+34=", [{"role": "user", "content": "Hi"}]]
    out = gen.generate(prompts, n=2, sampling=Sampling(max_new_tokens=6, temperature=0.0, logprobs=True))
    for prompt, completions in zip(prompts, out, strict=True):
        prefix = torch.tensor([gen._encode(prompt)])
        with torch.inference_mode():
            ids = gen.model.generate(prefix, max_new_tokens=6, do_sample=False, eos_token_id=gen.eos_ids)
            logits = gen.model(ids).logits[0, prefix.shape[1] - 1 : -1].log_softmax(-1)
        new = ids[0, prefix.shape[1] :]
        expected = logits.gather(-1, new[:, None]).squeeze(-1)[: completions[0]["num_tokens"]]
        for c in completions:
            assert len(c["logprobs"]) == c["num_tokens"] and c["token_ids"] == new[: c["num_tokens"]].tolist()
            torch.testing.assert_close(torch.tensor(c["logprobs"]), expected, atol=1e-4, rtol=1e-4)
    sampled = Sampling(max_new_tokens=6, temperature=0.7, seed=3)
    plain = gen.generate(prompts, n=2, sampling=sampled)
    with_lp = gen.generate(prompts, n=2, sampling=Sampling(**{**sampled.__dict__, "logprobs": True}))
    assert texts(plain) == texts(with_lp) and "logprobs" not in plain[0][0]
    assert all(len(c["logprobs"]) == c["num_tokens"] and max(c["logprobs"]) <= 0 for cs in with_lp for c in cs)


def test_top_logprobs_are_the_models_top_k(gen: HFGenerator):
    """With `top_logprobs=k`, every generated token carries its text and the model's k likeliest alternatives
    (raw distribution, as vLLM reports them), sampled or greedy; the text does not change."""
    from topk import check_top_logprobs

    prompts = ["12+34=", [{"role": "user", "content": "Hi"}]]
    for sampling in (Sampling(max_new_tokens=6, temperature=0.0), Sampling(max_new_tokens=6, temperature=0.8, seed=2)):
        plain = gen.generate(prompts, n=2, sampling=sampling)
        out = gen.generate(prompts, n=2, sampling=Sampling(**{**sampling.__dict__, "top_logprobs": 3}))
        assert texts(out) == texts(plain)
        checked = sum(check_top_logprobs(cs, gen._encode(p), gen.model, gen.tokenizer, 3)
                      for p, cs in zip(prompts, out, strict=True))
        assert checked >= 8

