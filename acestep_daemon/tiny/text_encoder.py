"""The tiny checkpoint's `Qwen3-Embedding-0.6B/` folder: a working tokenizer and a tiny Qwen3.

The tokenizer is a byte-level BPE with the Qwen2 pre-tokenizer split, trained in
milliseconds on a built-in text, with the three special tokens the front-end
uses. Kept apart from `checkpoint.py` so the text front-end can be tested on its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from tokenizers.trainers import BpeTrainer
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3Model

from acestep_daemon.tiny.weights import random_weights, save_weights

TEXT_HIDDEN = 32
"""Width of the tiny Qwen3 (the real one is 1024); the DiT's text_hidden_dim follows it."""

_EOS = "<|endoftext|>"
_SPECIAL_TOKENS = (_EOS, "<|im_start|>", "<|im_end|>")
_BPE_VOCAB = 512
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TRAINING_TEXT = """\
# Instruction
Fill the audio semantic mask based on the given conditions:
Repaint the mask area based on the given conditions:
Generate audio semantic tokens based on the given conditions:

# Caption
jazz piano trio, upbeat swing, warm upright bass, brushed drums, late night club.
Energetic electronic dance music with a driving four on the floor beat and bright synths.
A calm acoustic guitar ballad with soft female vocals, strings and piano.
Heavy rock anthem, distorted guitars, powerful male vocals, big drums, stadium sound.
Lo-fi hip hop beat, dusty vinyl crackle, mellow keys, relaxed groove for studying.
Orchestral film score, epic brass, choir, timpani, rising tension and release.

# Metas
- bpm: 120
- timesignature: 4
- keyscale: C major
- duration: 30 seconds
- bpm: N/A
- timesignature: 3
- keyscale: F# minor
- duration: 240 seconds

# Languages
en

# Lyric
[verse]
Hello world, the city lights are calling out my name tonight
We keep on dancing through the rain until the morning light
[chorus]
Sing it loud, sing it proud, we are young and we are free
[bridge]
Every heartbeat is a drum, every breath a melody
[Instrumental]
"""


def train_byte_level_bpe(vocab_size: int, extra_text: str = "") -> Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer split, trained on the built-in text.

    `extra_text` is appended to the training text (the tiny LM adds its prompt words).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((_TRAINING_TEXT + extra_text).splitlines(keepends=True), trainer)
    return tokenizer


def save_qwen_tokenizer(
    tokenizer: Tokenizer, folder: Path, chat_template: str, added: Sequence[str]
) -> None:
    """Save as Qwen's checkpoints do: tokenizer.json and its config, vocab.json, merges.txt
    and added_tokens.json (`added`: the tokens it lists). `<|im_end|>` is the eos token,
    `<|endoftext|>` the pad token."""
    fast = Qwen2TokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token=_EOS,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    fast.chat_template = chat_template
    fast.save_pretrained(folder)
    tokenizer.model.save(str(folder))  # vocab.json, merges.txt
    ids = {name: tokenizer.token_to_id(name) for name in added}
    (folder / "added_tokens.json").write_text(json.dumps(ids, indent=2) + "\n")


def write_tiny_tokenizer(folder: Path) -> Tokenizer:
    """Train a byte-level BPE tokenizer (Qwen2 pre-tokenization) and save it Qwen-style.

    Like the current Qwen3-Embedding tokenizer, its post-processor appends
    `<|endoftext|>` to every sequence; `<|endoftext|>` is also the pad token and
    `<|im_end|>` the eos token. Returns the tokenizer that was saved.
    """
    tokenizer = train_byte_level_bpe(_BPE_VOCAB)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in _SPECIAL_TOKENS])
    eos_id = tokenizer.token_to_id(_EOS)
    tokenizer.post_processor = TemplateProcessing(
        single=f"$A:0 {_EOS}:0",
        pair=f"$A:0 {_EOS}:0 $B:1 {_EOS}:1",
        special_tokens=[(_EOS, eos_id)],
    )
    save_qwen_tokenizer(tokenizer, folder, _CHAT_TEMPLATE, _SPECIAL_TOKENS)
    return tokenizer


def write_tiny_text_encoder(folder: Path, generator: torch.Generator) -> None:
    """The whole `Qwen3-Embedding-0.6B/` folder: tokenizer files, config.json, model.safetensors.

    The tiny Qwen3 has the real depth (28 layers, so the real key names) at width
    32; its vocabulary covers every token id. Safetensors keys carry no `model.`
    prefix, like the real file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tiny_tokenizer(folder)
    token_count = tokenizer.get_vocab_size(with_added_tokens=True)
    eos_id = tokenizer.token_to_id(_EOS)
    config = Qwen3Config(
        vocab_size=8 * math.ceil(token_count / 8),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=28,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32768,
        max_window_layers=28,
        rope_theta=1000000,
        rms_norm_eps=1e-06,
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        architectures=["Qwen3ForCausalLM"],
        torch_dtype="float32",
    )
    config.to_json_file(folder / "config.json")
    with torch.device("meta"):
        shapes = Qwen3Model(config).state_dict()
    save_weights(random_weights(shapes, generator), folder / "model.safetensors")
