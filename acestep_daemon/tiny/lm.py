"""A tiny random 5 Hz LM in the on-disk layout of `acestep-5Hz-lm-0.6B`.

The real folder holds a Qwen3 causal LM (`Qwen3ForCausalLM`, tied embeddings, so no
`lm_head.weight` in the file) and a Qwen2 byte-level BPE tokenizer whose vocabulary is the
Qwen3 one followed by `<|audio_code_0|>` … `<|audio_code_65534|>` (65,535 tokens; the
FSQ codebook uses the first 64,000). Here the BPE part is trained in milliseconds on a
built-in text, the special tokens come in the real order (`<|endoftext|>`, `<|im_start|>`,
`<|im_end|>`, `<think>`, `</think>`, then the audio codes), the chat template is the Qwen3
one the real folder ships, and the network has the real depth at width 32. The config has
every field of the real one, `"dtype": "bfloat16"` included (loaders choose their own dtype).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models
from transformers import Qwen3Config, Qwen3ForCausalLM

from acestep_daemon.checkpoint import TINY_LM, lm_folder_name
from acestep_daemon.planner.constraints import audio_code_token
from acestep_daemon.tiny.text_encoder import save_qwen_tokenizer, train_byte_level_bpe
from acestep_daemon.tiny.weights import random_weights, save_weights

LM_FOLDER = lm_folder_name(TINY_LM)
AUDIO_CODE_SLOTS = 65_535
"""Audio-code tokens in the real vocabulary (`<|audio_code_0|>` … `<|audio_code_65534|>`)."""

LM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""Files of the real LM folder that loading reads (README and .gitattributes aside)."""

_BPE_VOCAB = 400
_TEXT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_THINK_TOKENS = ("<think>", "</think>")
_LM_TEXT = """\
<think>
bpm: 120
caption: warm jazz piano trio with brushed drums
duration: 180
keyscale: C# minor
language: en
timesignature: 4
</think>
bpm: 96
duration: 45
keyscale: Bb major
language: zh
timesignature: 3
"""

QWEN3_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \
\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and \
not(message.content.startswith('<tool_response>') and \
message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = \
content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + \
reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
"""The chat template of the Qwen3 tokenizers (`chat_template.jinja` of the LM folders)."""


def pad_bpe(tokenizer: Tokenizer, size: int) -> None:
    """Grow the BPE vocabulary of `tokenizer` (no added tokens yet) to `size` entries.

    The new entries are strings no merge produces, so encoding is unchanged; they only move
    the special and audio-code tokens to the ids they have in a full-size vocabulary.
    """
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(tokenizer.to_str())["model"]["merges"]
    ]
    for index in range(size - len(vocab)):
        vocab[f"<|unused_{index}|>"] = len(vocab)
    tokenizer.model = models.BPE(vocab=vocab, merges=merges)


def write_tiny_lm_tokenizer(folder: Path, vocab_size: int | None = None) -> Tokenizer:
    """Train the byte-level BPE, add the special and audio-code tokens, save it Qwen-style.

    No post-processor: like the real LM tokenizer (and unlike Qwen3-Embedding's), encoding
    appends nothing. `<|im_end|>` is the eos token, `<|endoftext|>` the pad token. With
    `vocab_size` (e.g. the real 217,204) the BPE part is padded so the tokenizer has exactly
    that many tokens, the audio codes last, as in the real one.
    """
    tokenizer = train_byte_level_bpe(_BPE_VOCAB, _LM_TEXT)
    if vocab_size is not None:
        specials = len(_TEXT_SPECIALS) + len(_THINK_TOKENS)
        pad_bpe(tokenizer, vocab_size - specials - AUDIO_CODE_SLOTS)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in _TEXT_SPECIALS])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in _THINK_TOKENS])
    codes = [audio_code_token(i) for i in range(AUDIO_CODE_SLOTS)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in codes])
    save_qwen_tokenizer(
        tokenizer, folder, QWEN3_CHAT_TEMPLATE, (*_TEXT_SPECIALS, *_THINK_TOKENS, *codes)
    )
    return tokenizer


def tiny_lm_config(vocab_size: int, eos_id: int, bos_id: int) -> Qwen3Config:
    """The real 0.6B LM config fields, with tiny widths and the real depth (28 layers).

    `<|endoftext|>` is both bos and pad token, as in the real config.
    """
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=28,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        hidden_act="silu",
        max_position_embeddings=40960,
        max_window_layers=28,
        rope_theta=1000000,
        rope_scaling=None,
        rms_norm_eps=1e-06,
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        sliding_window=None,
        tie_word_embeddings=True,
        use_cache=True,
        initializer_range=0.02,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=bos_id,
        architectures=["Qwen3ForCausalLM"],
        dtype="bfloat16",
    )


def write_tiny_lm(folder: Path, *, seed: int = 0) -> Path:
    """Write the whole tiny LM folder (tokenizer files, config.json, model.safetensors).

    The vocabulary size equals the tokenizer's length, as in the real config (217,204).
    The same seed writes byte-identical weights.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tiny_lm_tokenizer(folder)
    config = tiny_lm_config(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        eos_id=tokenizer.token_to_id("<|im_end|>"),
        bos_id=tokenizer.token_to_id("<|endoftext|>"),
    )
    config.to_json_file(folder / "config.json")
    with torch.device("meta"):
        shapes = Qwen3ForCausalLM(config).state_dict()
    shapes.pop("lm_head.weight")  # tied to model.embed_tokens.weight, absent from the file
    save_weights(
        random_weights(shapes, torch.Generator().manual_seed(seed)), folder / "model.safetensors"
    )
    return folder
