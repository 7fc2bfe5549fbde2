"""The tiny random 5 Hz LM has the on-disk layout of `acestep-5Hz-lm-0.6B` and loads as one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from acestep_daemon.planner.constraints import CODEBOOK_SIZE, CodeVocabulary
from acestep_daemon.tiny.lm import AUDIO_CODE_SLOTS, LM_FILES, LM_FOLDER

REAL_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "num_hidden_layers": 28,
    "max_window_layers": 28,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "use_sliding_window": False,
    "rope_theta": 1000000,
    "rms_norm_eps": 1e-06,
    "max_position_embeddings": 40960,
}
"""Values the tiny config shares with the real 0.6B LM (whose vocabulary has 217,204 tokens:
151,669 Qwen3 tokens, then the 65,535 audio codes)."""
REAL_FIELDS = (
    "architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id",
    "head_dim", "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
    "max_position_embeddings", "max_window_layers", "model_type", "num_attention_heads",
    "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "rope_scaling", "rope_theta",
    "sliding_window", "tie_word_embeddings", "dtype", "use_cache", "use_sliding_window",
    "vocab_size",
)  # fmt: skip
"""Fields of a Qwen3 config.json as the real folders of the repo have them (`dtype`, as in
its Qwen3-Embedding-0.6B/config.json)."""


def test_folder_has_the_real_file_names(tiny_lm_dir: Path) -> None:
    assert tiny_lm_dir.name == LM_FOLDER
    assert sorted(p.name for p in tiny_lm_dir.iterdir()) == sorted(LM_FILES)


def test_config_is_a_qwen3_causal_lm_with_every_field(tiny_lm_dir: Path) -> None:
    config = json.loads((tiny_lm_dir / "config.json").read_text())
    assert {k: config[k] for k in REAL_CONFIG} == REAL_CONFIG
    assert set(REAL_FIELDS) <= set(config)


def test_weights_have_the_real_key_names_and_tiny_shapes(tiny_lm_dir: Path) -> None:
    config = Qwen3Config.from_pretrained(tiny_lm_dir)
    with torch.device("meta"):
        expected = set(Qwen3ForCausalLM(config).state_dict()) - {"lm_head.weight"}
    weights = load_file(tiny_lm_dir / "model.safetensors")
    assert set(weights) == expected
    assert "model.layers.27.self_attn.q_norm.weight" in weights
    assert sum(t.numel() for t in weights.values()) < 3_000_000
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


def test_tokenizer_ends_with_think_tags_then_the_audio_codes(tiny_lm_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
    think, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert (think, end) == (ids[2] + 1, ids[2] + 2)
    assert tokenizer.encode("<|audio_code_0|><|audio_code_65534|>") == [end + 1, end + 65535]
    assert len(tokenizer) == end + 1 + AUDIO_CODE_SLOTS
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.encode("bpm: 120") == tokenizer.encode("bpm: 120", add_special_tokens=False)
    codes = CodeVocabulary(tokenizer, len(tokenizer))
    assert codes.token_ids.tolist() == list(range(end + 1, end + 1 + CODEBOOK_SIZE))


def test_chat_template_renders_like_the_qwen3_template(tiny_lm_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    conversation = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Remember violet."},
        {"role": "assistant", "content": "<think>Reason.</think>\n\nAnswer."},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nRemember violet."
        "<|im_end|>\n<|im_start|>assistant\n<think>\nReason.\n</think>\n\nAnswer.<|im_end|>\n"
    )


def test_loads_as_a_causal_lm_with_tied_output_head(tiny_lm_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    assert type(model) is Qwen3ForCausalLM
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    weights = load_file(tiny_lm_dir / "model.safetensors")
    assert torch.equal(model.model.embed_tokens.weight, weights["model.embed_tokens.weight"])
