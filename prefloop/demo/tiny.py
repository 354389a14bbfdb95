"""Tiny Llama-style models built locally: the demo's policy and the tests' fixtures.

Nothing here downloads anything. The tokenizer is character level (one token per character, so one token per
digit, which makes arithmetic learnable by a sub-million-parameter model), and it carries a small chat template
so the same model exercises both prompt styles (raw text and messages).

    python -m prefloop.demo.tiny /tmp/tiny [--context 4096]   # writes a randomly initialised model + tokenizer
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# A plain-text chat format. The assistant turn ends with EOS so DPO on conversational pairs teaches the model to
# stop; the trailing newline keeps "prompt + generation prompt" a token prefix of "prompt + answer" (TRL needs it).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ m['role'] + ': ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@dataclass
class TinyConfig:
    """Shape of the tiny Llama. The defaults give ~0.8M parameters: enough to learn 2-digit addition on a CPU."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 128
    seed: int = 0


def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast` over printable ASCII, with pad/bos/eos and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK] + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own token; `Fuse` joins them back without inserting spaces.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=TinyConfig.max_position_embeddings,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, config: TinyConfig | None = None):
    """A randomly initialised `LlamaForCausalLM` sized by `config`, agreeing with `tokenizer` on special tokens."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = config or TinyConfig()
    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def save_tiny(out_dir: str | Path, config: TinyConfig | None = None) -> Path:
    """Build a random tiny model + tokenizer and `save_pretrained` both into `out_dir` (loadable by path)."""
    out = Path(out_dir)
    config = config or TinyConfig()
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = config.max_position_embeddings
    model = build_model(tokenizer, config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m prefloop.demo.tiny", description="Build a random tiny model.")
    parser.add_argument("out", nargs="?", default="tiny-model")
    parser.add_argument("--context", type=int, default=TinyConfig.max_position_embeddings,
                        help="max_position_embeddings (judge prompts need a few thousand)")
    args = parser.parse_args(argv)
    print(save_tiny(args.out, TinyConfig(max_position_embeddings=args.context)))


if __name__ == "__main__":
    main()
