"""Build the small model folder ``make demo`` fine-tunes: a Hugging Face Llama with its tokenizer.

The folder is bundled in the repository (``examples/finetune/model``, under 1 MB); this script
is how it was made, and makes it again::

    python examples/finetune/make_model.py examples/finetune/model

A byte-level BPE tokenizer (384 tokens, with a chat template) is trained on the bundled text
``data/train.txt``; the model is a 4-block Llama of width 64 with random weights (seed 0),
saved as ``model.safetensors`` beside ``config.json`` and the tokenizer files, the layout
``save_pretrained`` writes and ``stagewise train --model FOLDER`` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).parent
SPECIALS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def make_tokenizer(text_file: Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``text_file``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(text_file)], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 4-block Llama of width 64 with random weights drawn from ``seed``."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=HERE / "model")
    args = parser.parse_args()
    tokenizer = make_tokenizer(HERE / "data" / "train.txt")
    model = make_model(len(tokenizer))
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(tokenizer)} tokens")


if __name__ == "__main__":
    main()
