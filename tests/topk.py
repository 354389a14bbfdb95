"""Check a backend's `top_logprobs` against the model's own distribution (a teacher-forced transformers forward)."""

from __future__ import annotations

import torch


def check_top_logprobs(completions, prompt_ids: list[int], model, tokenizer, k: int, first_only: bool = False) -> int:
    """Each step's alternatives are the model's k most likely next tokens with their log-probs, and `tokens`
    spell the text. Returns the number of steps checked. `first_only`: only the first step, which depends on the
    prompt alone (for servers, which return no token ids to replay the rest exactly)."""
    checked = 0
    for c in completions:
        ids = tokenizer(c["text"], add_special_tokens=False)["input_ids"] if "token_ids" not in c else c["token_ids"]
        assert len(c["tokens"]) == len(c["top_logprobs"]) == c["num_tokens"]
        special = set(tokenizer.all_special_tokens)  # the text is decoded without them; EOS may end the tokens
        assert "".join(t for t in c["tokens"] if t not in special) == c["text"]
        ids = ids[: c["num_tokens"]]
        with torch.inference_mode():
            logprobs = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 :].float().log_softmax(-1)
        for step, alternatives in enumerate(c["top_logprobs"][: 1 if first_only else len(ids)]):
            values, top_ids = logprobs[step].topk(k)
            expected = sorted(values.tolist(), reverse=True)
            got = sorted(alternatives.values(), reverse=True)
            assert len(got) <= k
            # Token texts that collide (e.g. several special tokens decoding to "") merge, so compare the best ones.
            torch.testing.assert_close(torch.tensor(got[:1]), torch.tensor(expected[:1]), atol=2e-4, rtol=1e-4)
            for tid, value in zip(top_ids.tolist(), values.tolist(), strict=True):
                text = tokenizer.decode([tid])
                if text in alternatives and list(alternatives).count(text) == 1 and text.strip():
                    assert alternatives[text] >= value - 2e-4
            checked += 1
    return checked
