"""prefloop's CPU tiles for TRL's fused LM head (prefloop/train/kernels.py): TRL really projects in those tiles, and
the per-token log-probs and their gradients equal `log_softmax` of the model's own logits."""

from __future__ import annotations

import pytest
import torch
import trl.kernels.chunked_logprob as chunked
import trl.trainer.utils as trl_utils
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from prefloop.train import kernels

VOCAB = 9000  # three vocabulary tiles of 4,096 (the last one partial)
BATCH, LENGTH = 2, 400  # 2 x 399 scored positions: two token tiles of 512


@pytest.fixture
def restore_trl(monkeypatch):
    """Leave TRL's module globals as they were after the test."""
    for module, attr in ((chunked, "TOKEN_CHUNK_SIZE"), (trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE")):
        monkeypatch.setattr(module, attr, getattr(module, attr))


def model_and_batch():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=LENGTH)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH))
    labels = ids.clone()
    labels[:, :50] = -100  # a prompt
    return model, ids, labels


def mm_shapes(fn) -> list[list]:
    """The (left, right) input shapes of every `aten::mm` that `fn()` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [e.input_shapes[:2] for e in prof.events() if e.name == "aten::mm"]


def test_cpu_tiles_are_what_trl_projects_in_and_give_the_models_own_log_probs(restore_trl):
    assert kernels.size_lm_head_tiles("cpu") == kernels.CPU_TILES == (512, 4096)
    model, ids, labels = model_and_batch()

    # The independent source: log_softmax of the model's own (unfused) logits, at the next-token labels.
    logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    expected = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = expected.masked_fill(target == -100, 0)
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    add_fused_lm_head(model)
    out = {}
    shapes = mm_shapes(lambda: out.update(lp=model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs))
    torch.testing.assert_close(out["lp"], expected, atol=1e-4, rtol=1e-4)
    out["lp"].sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name], atol=1e-4, rtol=1e-3, msg=name)

    # On a CPU TRL scores every position: 798 tokens = tiles of 512 and 286; vocabulary = 4,096, 4,096 and 808.
    head = sorted((tuple(a), tuple(b)) for a, b in shapes if b[1] > 64)  # wider than any layer: the LM head tiles
    assert head == sorted(((t, 32), (32, v)) for t in (512, 286) for v in (4096, 4096, 808))


def test_other_devices_keep_trls_tiles(restore_trl):
    before = (chunked.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    assert kernels.size_lm_head_tiles("cuda") is None
    assert (chunked.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE) == before


def test_a_trl_without_the_globals_keeps_its_own_and_says_so(restore_trl, monkeypatch, caplog):
    before = chunked.TOKEN_CHUNK_SIZE
    monkeypatch.delattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE")
    with caplog.at_level("INFO", logger="prefloop.train.kernels"):
        assert kernels.size_lm_head_tiles("cpu") is None
    assert chunked.TOKEN_CHUNK_SIZE == before  # nothing half-set
    assert "its own LM-head tiles stay" in caplog.text
