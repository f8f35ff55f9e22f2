"""InfiMM configuration.

InfiMM (Infi-MM/infimm-*) is a Flamingo-style model: an EVA-CLIP vision tower (timm's ``Eva``), a Perceiver
resampler turning each image into a fixed number of latents, and gated cross-attention blocks placed before
every ``cross_attn_every_n_layers``-th decoder layer of a stock Mistral or Llama causal LM.

One composite config is the single source of shapes:

- ``vision_config``: a ``TimmWrapperConfig`` (timm architecture name + ``model_args``);
- ``text_config``: a real ``MistralConfig`` / ``LlamaConfig``;
- resampler and cross-attention settings, the two special token ids.

``InfiMMConfig.from_preset(name, **overrides)`` builds the released variants; ``from_pretrained`` and ``from_dict``
also read the legacy ``config.json`` of the original release (``visual`` / ``language`` blocks), mapped field by
field by ``release_infimm.legacy_config_to_dict`` (unknown keys and values the tower cannot express are refused).
"""

from .versions_infimm import TRANSFORMERS_REQUIREMENT  # noqa: F401  (first: refuses an unsupported transformers)

import copy

from transformers import AutoConfig, PretrainedConfig
from transformers.utils import logging

from .release_infimm import StrictDataclassError, check_base_fields, is_legacy_config, legacy_config_to_dict


logger = logging.get_logger(__name__)

# Image normalisation of the released processor (OpenAI CLIP statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_ZEPHYR_TEXT = {
    "model_type": "mistral",
    "vocab_size": 32002,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}

_LLAMA2_13B_TEXT = {
    "model_type": "llama",
    "vocab_size": 32002,
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}

# timm architectures closest to the EVA-CLIP towers of the release (README, "The model family").
# Shapes are spelled out so the config alone says how wide the features are.
_EVA02_L_336 = {
    "architecture": "eva02_large_patch14_clip_336",
    "model_args": {"img_size": 336, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16},
}
_EVA01_G_224 = {
    "architecture": "eva_giant_patch14_clip_224",
    "model_args": {"img_size": 224, "patch_size": 14, "embed_dim": 1408, "depth": 40, "num_heads": 16},
}
_EVA02_E_224 = {
    "architecture": "eva02_enormous_patch14_clip_224",
    "model_args": {"img_size": 224, "patch_size": 14, "embed_dim": 1792, "depth": 64, "num_heads": 16},
}

PRESETS = {
    "infimm-zephyr": {"vision_config": _EVA02_L_336, "text_config": _ZEPHYR_TEXT, "chat_format": "zephyr"},
    "infimm-llama13b": {"vision_config": _EVA01_G_224, "text_config": _LLAMA2_13B_TEXT, "chat_format": "llama2"},
    "infimm-vicuna13b": {"vision_config": _EVA02_E_224, "text_config": _LLAMA2_13B_TEXT, "chat_format": "vicuna"},
}


def _merge(base: dict, overrides: dict) -> dict:
    """Recursive dict merge (overrides win), used for preset overrides such as `vision_config={"model_args": ...}`."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class InfiMMConfig(PretrainedConfig):
    r"""
    Configuration of an InfiMM model.

    Args:
        vision_config (`dict` or `TimmWrapperConfig`): timm EVA tower, `architecture` plus `model_args`
            (`img_size`, `patch_size`, `embed_dim`, `depth`, `num_heads`, ...).
        text_config (`dict` or `PretrainedConfig`): the language model's config; `model_type` picks Mistral or Llama.
        resampler_depth, resampler_num_latents, resampler_heads, resampler_head_dim, resampler_ff_mult: Perceiver
            resampler shape (the release's code and weights: 6 layers, 64 latents, 8 heads x 64, ff x4).
        cross_attn_every_n_layers (`int`): a gated cross-attention block runs before decoder layer `i` whenever
            `(i + 1) % n == 0`.
        cross_attn_heads, cross_attn_head_dim, cross_attn_ff_mult: gated cross-attention shape.
        media_token_id (`int`): id of `<image>`; eoc_token_id (`int`): id of `<|endofchunk|>`.
        chat_format (`str`): which chat template the processor uses (`zephyr`, `vicuna`, `llama2` or `none`).
    """

    model_type = "infimm"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        resampler_depth: int = 6,
        resampler_num_latents: int = 64,
        resampler_heads: int = 8,
        resampler_head_dim: int = 64,
        resampler_ff_mult: int = 4,
        cross_attn_every_n_layers: int = 2,
        cross_attn_heads: int = 8,
        cross_attn_head_dim: int = 64,
        cross_attn_ff_mult: int = 4,
        media_token_id: int = 32001,
        eoc_token_id: int = 32000,
        chat_format: str = "zephyr",
        **kwargs,
    ):
        if vision_config is None:
            vision_config = copy.deepcopy(_EVA02_L_336)
        if isinstance(vision_config, dict):
            vision_config = dict(vision_config)
            vision_config.setdefault("model_type", "timm_wrapper")
            vision_config.setdefault("do_pooling", False)
            vision_config.setdefault("num_labels", 0)
            model_type = vision_config.pop("model_type")
            vision_config = AutoConfig.for_model(model_type, **vision_config)
        if text_config is None:
            text_config = copy.deepcopy(_ZEPHYR_TEXT)
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", "mistral")
            text_config = AutoConfig.for_model(model_type, **text_config)
        self.vision_config = vision_config
        self.text_config = text_config
        self.resampler_depth = resampler_depth
        self.resampler_num_latents = resampler_num_latents
        self.resampler_heads = resampler_heads
        self.resampler_head_dim = resampler_head_dim
        self.resampler_ff_mult = resampler_ff_mult
        self.cross_attn_every_n_layers = cross_attn_every_n_layers
        self.cross_attn_heads = cross_attn_heads
        self.cross_attn_head_dim = cross_attn_head_dim
        self.cross_attn_ff_mult = cross_attn_ff_mult
        self.media_token_id = media_token_id
        self.eoc_token_id = eoc_token_id
        self.chat_format = chat_format
        kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self.validate_infimm()

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def vision_hidden_size(self) -> int:
        return int(self.vision_config.model_args["embed_dim"])

    @property
    def image_size(self) -> int:
        return int(self.vision_config.model_args["img_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.model_args["patch_size"])

    @property
    def num_vision_tokens(self) -> int:
        """Tokens per image handed to the resampler: CLS plus every patch (577 at 336 px, patch 14)."""
        return 1 + (self.image_size // self.patch_size) ** 2

    @property
    def cross_attention_layers(self) -> list[int]:
        """Decoder layer indices preceded by a gated cross-attention block."""
        n = self.cross_attn_every_n_layers
        return [i for i in range(self.text_config.num_hidden_layers) if (i + 1) % n == 0]

    # ---------------------------------------------------------------------------------------------- validation
    def validate_infimm(self):
        """Checks that the parts fit together; raises `ValueError` naming the offending field."""
        model_args = self.vision_config.model_args or {}
        for key in ("img_size", "patch_size", "embed_dim"):
            if key not in model_args:
                raise ValueError(
                    f"`vision_config.model_args` must name `{key}` (the config is the single source of shapes); "
                    f"got {sorted(model_args)}."
                )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"`vision_config.model_args.img_size` ({self.image_size}) must be a multiple of `patch_size` "
                f"({self.patch_size})."
            )
        if "num_heads" in model_args and self.vision_hidden_size % int(model_args["num_heads"]):
            raise ValueError(
                f"`vision_config.model_args.embed_dim` ({self.vision_hidden_size}) is not divisible by "
                f"`num_heads` ({model_args['num_heads']})."
            )
        num_layers = self.text_config.num_hidden_layers
        n = self.cross_attn_every_n_layers
        if not isinstance(n, int) or n < 1 or n > num_layers:
            raise ValueError(
                f"`cross_attn_every_n_layers` must be an integer between 1 and the number of decoder layers "
                f"({num_layers}); got {n!r}."
            )
        for name in ("resampler_depth", "resampler_num_latents", "resampler_heads", "resampler_head_dim",
                     "resampler_ff_mult", "cross_attn_heads", "cross_attn_head_dim", "cross_attn_ff_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        vocab_size = self.text_config.vocab_size
        for name in ("media_token_id", "eoc_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < vocab_size:
                raise ValueError(
                    f"`{name}` ({value!r}) must be a token id inside the language model's vocabulary "
                    f"(text_config.vocab_size = {vocab_size}); resize the vocabulary or fix the id."
                )
        if self.media_token_id == self.eoc_token_id:
            raise ValueError(f"`media_token_id` and `eoc_token_id` must differ; both are {self.media_token_id}.")
        if self.chat_format not in ("zephyr", "vicuna", "llama2", "none"):
            raise ValueError(
                f"`chat_format` must be one of 'zephyr', 'vicuna', 'llama2', 'none'; got {self.chat_format!r}."
            )

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "InfiMMConfig":
        """Config of a released variant; `overrides` replace any field, nested dicts are merged.

        Example: `InfiMMConfig.from_preset("infimm-zephyr", text_config={"num_hidden_layers": 2})`.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**_merge(PRESETS[name], overrides))

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if is_legacy_config(config_dict):
            config_dict = {"model_type": cls.model_type, **legacy_config_to_dict(config_dict)}
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Also reads the original release's format. A field of the wrong kind is a `ValueError` naming it, not an
        AttributeError or TypeError from deep inside a sub-config."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"An InfiMM config is a JSON object; got {type(config_dict).__name__}.")
        if is_legacy_config(config_dict):
            config_dict = legacy_config_to_dict(config_dict)
        check_base_fields(config_dict)
        for key in ("vision_config", "text_config"):
            value = config_dict.get(key)
            if value is not None and not isinstance(value, (dict, PretrainedConfig)):
                raise ValueError(f"`{key}` must be a JSON object (a sub-config) or absent; got {value!r}.")
            if isinstance(value, dict):
                check_base_fields(value, f"{key}.")
        try:
            return super().from_dict(config_dict, **kwargs)
        except (TypeError, KeyError, AttributeError, IndexError, StrictDataclassError) as error:
            raise ValueError(f"Not a valid InfiMM config: {type(error).__name__}: {error}. Compare the field it "
                             "names with a config saved by this package (or `InfiMMConfig.from_preset`).") from error

    def to_dict(self):
        output = super().to_dict()
        for key in ("vision_config", "text_config"):
            value = getattr(self, key)
            output[key] = value.to_dict() if hasattr(value, "to_dict") else value
        return output


__all__ = ["InfiMMConfig", "PRESETS", "CLIP_MEAN", "CLIP_STD", "legacy_config_to_dict"]
