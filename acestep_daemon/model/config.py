"""The ACE-Step v1.5 architecture as a dataclass, read from the checkpoint's `config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class AceStepConfig:
    """Hyper-parameters of the DiT, condition encoder, audio tokenizer and detokenizer.

    Field names and defaults are those of the turbo `config.json`; `from_dict` ignores every
    other key (training settings, `auto_map`, ...). XL checkpoints add the four `encoder_*`
    fields: the condition encoder, audio tokenizer, detokenizer and `null_condition_emb` are
    then built at the encoder width, and `decoder.condition_embedder` maps it to the decoder
    width. Their presence also selects the two XL code differences (timbre CLS token, float32
    quantizer); the 2 B checkpoints leave them out.
    """

    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    use_sliding_window: bool = True
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    in_channels: int = 192
    audio_acoustic_hidden_dim: int = 64
    patch_size: int = 2
    text_hidden_dim: int = 1024
    timbre_hidden_dim: int = 64
    num_lyric_encoder_hidden_layers: int = 8
    num_timbre_encoder_hidden_layers: int = 4
    num_attention_pooler_hidden_layers: int = 2
    pool_window_size: int = 5
    fsq_dim: int = 2048
    fsq_input_levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)
    fsq_input_num_quantizers: int = 1
    encoder_hidden_size: int | None = None
    encoder_intermediate_size: int | None = None
    encoder_num_attention_heads: int | None = None
    encoder_num_key_value_heads: int | None = None
    rope_inv_freq_in_model_dtype: bool = True
    """Port switch, not a config.json key: round the RoPE frequencies to the activation dtype
    before use, as the official model does after `.to(dtype)` casts its `inv_freq` buffers."""

    def __post_init__(self) -> None:
        if self.hidden_act != "silu" or self.rope_scaling is not None:
            raise ValueError(
                "only hidden_act 'silu' and default RoPE (rope_scaling null) are implemented"
            )
        if not self.layer_types:
            # Official default: even layer indices slide, odd ones attend fully.
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "fsq_input_levels", tuple(self.fsq_input_levels))

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> AceStepConfig:
        """Build from a parsed `config.json`; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def is_xl(self) -> bool:
        """Whether this is an XL checkpoint (its config.json names the encoder widths)."""
        return self.encoder_hidden_size is not None

    @property
    def encoder_width(self) -> int:
        """Width of the condition sequence the DiT cross-attends to."""
        return self.encoder_hidden_size or self.hidden_size

    def for_encoder(self) -> AceStepConfig:
        """The configuration of the encoder side (condition encoder, tokenizer, detokenizer).

        Official `AceStepConditionGenerationModel.__init__`: a copy with the `encoder_*` values
        as hidden size, MLP width and head counts; everything else (depths, head_dim, windows)
        is shared with the decoder.
        """
        if not self.is_xl:
            return self
        return dataclasses.replace(
            self,
            hidden_size=self.encoder_hidden_size,
            intermediate_size=self.encoder_intermediate_size or self.intermediate_size,
            num_attention_heads=self.encoder_num_attention_heads or self.num_attention_heads,
            num_key_value_heads=self.encoder_num_key_value_heads or self.num_key_value_heads,
        )

    def is_sliding(self, layer_index: int) -> bool:
        """Whether layer `layer_index` of any stack uses the banded window.

        Every stack (DiT, lyric, timbre, pooler, detokenizer) indexes the same `layer_types`.
        """
        return self.use_sliding_window and self.layer_types[layer_index] == SLIDING
