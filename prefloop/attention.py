"""transformers' SDPA attention, with grouped-query attention kept grouped when there is a padding mask on a CPU.

Models with fewer key/value heads than query heads (GQA: SmolLM2, Llama 3, Qwen, Mistral) share each K/V head
among `num_key_value_groups` query heads. transformers 5.19's `sdpa_attention_forward` passes `enable_gqa=True` to
`torch.nn.functional.scaled_dot_product_attention` only when there is no attention mask (CUDA's fast kernels need
none); with a mask -- every left-padded batch -- it first copies K and V `groups` times (`repeat_kv`). In batched
decoding that copy is of the whole KV cache, at every layer and every step. torch's CPU kernel takes a mask and
`enable_gqa` together, and gives the same numbers without the copy (tests/test_attention.py).

`implementation(device)` names the attention to use: this one on CPUs, transformers' `sdpa` elsewhere. `use_on`
switches a loaded model that runs transformers' `sdpa` to it. The hf generator, the train stage and the reward
model use it; training gets the same saving in the forward and in its backward (the gradients equal eager
attention's, tests/test_attention.py). Every case this module does not change (no mask, no GQA, a paged cache,
position biases, another device) goes to transformers' own function unchanged.
"""

from __future__ import annotations

NAME = "prefloop_sdpa"


def sdpa_grouped(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """`sdpa_attention_forward`'s contract: (attention output as (batch, seq, heads, dim), None)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (
        attention_mask is None
        or groups == 1
        or query.device.type != "cpu"
        or key.shape[-1] != value.shape[-1]
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("output_attentions", False)
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # With a mask, transformers' own function passes is_causal=False too: the mask carries causality.
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def implementation(device) -> str:
    """The `attn_implementation` to load a model with on `device` (a torch.device or its type)."""
    if getattr(device, "type", device) != "cpu":
        return "sdpa"
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, sdpa_grouped)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks transformers builds for `sdpa`
    return NAME


def use_on(model, device) -> str:
    """Switch `model` (loaded, not yet wrapped by PEFT) from transformers' `sdpa` to `implementation(device)`; any
    other attention (eager, flash, a model without the attention interface) stays. Returns the one in use."""
    current = model.config._attn_implementation
    wanted = implementation(device)
    if current == "sdpa" and wanted != current:
        model.set_attn_implementation(wanted)
    return model.config._attn_implementation
