"""The tiny random 5 Hz LM has the on-disk layout of `acestep-5Hz-lm-0.6B` and loads as one."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from acestep_daemon.checkpoint import TINY_LM, resolve_lm
from acestep_daemon.planner import LMRunner
from acestep_daemon.planner.constraints import CODEBOOK_SIZE, CodeVocabulary
from acestep_daemon.tiny import make_tiny_checkpoint
from acestep_daemon.tiny.lm import AUDIO_CODE_SLOTS, LM_FILES, LM_FOLDER, write_tiny_lm_tokenizer

REAL_CONFIG_FILE = Path(__file__).parent / "fixtures" / "acestep-5Hz-lm-0.6B.config.json"
REAL_CONFIG_SHA256 = "873ca63808b74e1e008ab950114765553b898b489b9e077e80db83348a118384"
"""The published digest of the real 0.6B LM's config.json (see tests/fixtures/README.md)."""
SIZE_FIELDS = {
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id",
    "transformers_version",
}  # fmt: skip
"""Fields whose values are the tiny LM's own (widths, vocabulary, token ids, writer)."""


def test_real_config_fixture_is_the_published_file() -> None:
    assert hashlib.sha256(REAL_CONFIG_FILE.read_bytes()).hexdigest() == REAL_CONFIG_SHA256


def test_folder_has_the_real_file_names(tiny_lm_dir: Path) -> None:
    assert tiny_lm_dir.name == LM_FOLDER
    assert sorted(p.name for p in tiny_lm_dir.iterdir()) == sorted(LM_FILES)


def test_config_has_the_real_fields_and_values_but_the_widths(tiny_lm_dir: Path) -> None:
    config = json.loads((tiny_lm_dir / "config.json").read_text())
    real = json.loads(REAL_CONFIG_FILE.read_text())
    assert set(config) == set(real)
    assert {k: v for k, v in config.items() if k not in SIZE_FIELDS} == {
        k: v for k, v in real.items() if k not in SIZE_FIELDS
    }
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    assert config["pad_token_id"] == config["bos_token_id"] != config["eos_token_id"]


@pytest.mark.parametrize(
    "field", [{"dtype": "bfloat16"}, {"torch_dtype": "float16"}, {"dtype": "float32"}, {}]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loader_takes_the_pipeline_dtype_whatever_the_config_says(
    tiny_lm_dir: Path, tmp_path: Path, field: dict, dtype: torch.dtype
) -> None:
    folder = tmp_path / LM_FOLDER
    shutil.copytree(tiny_lm_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype")
    (folder / "config.json").write_text(json.dumps(config | field))
    runner = LMRunner.load(folder, "cpu", dtype)
    assert {p.dtype for p in runner.model.parameters()} == {dtype}


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


def test_tiny_checkpoint_carries_the_lm_where_a_model_folder_keeps_it(
    tmp_path: Path, tiny_lm_dir: Path
) -> None:
    root = make_tiny_checkpoint(tmp_path / "checkpoint", lm=True)
    folder = resolve_lm(TINY_LM, root, download=False)
    assert folder == root / LM_FOLDER
    for name in LM_FILES:  # seed 0: the LM the planner fixtures were made with
        assert (folder / name).read_bytes() == (tiny_lm_dir / name).read_bytes(), name


def test_padded_tokenizer_has_the_full_size_and_encodes_the_same(
    tmp_path: Path, tiny_lm_dir: Path
) -> None:
    size = 70_000
    write_tiny_lm_tokenizer(tmp_path, vocab_size=size)
    padded = AutoTokenizer.from_pretrained(tmp_path)
    tiny = AutoTokenizer.from_pretrained(tiny_lm_dir)
    assert len(padded) == size
    assert padded.convert_tokens_to_ids("<|audio_code_65534|>") == size - 1
    assert padded.convert_tokens_to_ids("</think>") == size - AUDIO_CODE_SLOTS - 1
    text = "<|im_start|>user\n# Caption\nwarm jazz, 120 bpm<|im_end|>\n<think>\nbpm: 96"
    ids = padded.encode(text)
    assert padded.decode(ids) == text
    assert [padded.convert_ids_to_tokens(i) for i in ids] == tiny.convert_ids_to_tokens(
        tiny.encode(text)
    )
