"""InfiMM: a Flamingo-style vision-language model on stock transformers parts.

Architecture (Alayrac et al. 2022, "Flamingo", as implemented by the InfiMM release):

    pixel_values -> timm EVA tower (last block, before its final norm, CLS kept)
                 -> Perceiver resampler (each image on its own -> `resampler_num_latents` latents)
                 -> gated cross-attention blocks, one before every `cross_attn_every_n_layers`-th decoder layer
                    of a stock Mistral / Llama causal LM.

A text token attends only to the latents of the most recent `<image>` at or before it; tokens before the first
image get a zero attention output, and a sample without any image skips every block (InfiMM's per-sample `flag`).

Layout of the weights: `model.vision_tower.timm_model.*` are timm's own keys, `model.language_model.*` are the
keys of a standalone `MistralForCausalLM` / `LlamaForCausalLM` checkpoint, `model.resampler.*` and
`model.cross_attention_layers.<decoder layer index>.*` are the connector. The blocks run from forward pre-hooks on
their decoder layers, so the language model stays an unmodified library class; the images reach them through
`forward` keyword arguments and nothing is kept on a module between calls.
"""

from .versions_infimm import TRANSFORMERS_REQUIREMENT  # noqa: F401  (first: refuses an unsupported transformers)

import copy
import inspect
import os
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_accelerate_available, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_infimm import InfiMMConfig
from .device_map_infimm import infer_device_map, meta_model
from .image_state_infimm import (
    CallMode,
    ImageCacheLayer,
    ImagePlan,
    attach_image_layer,
    image_state,
    plan_decode,
    plan_prompt,
    real_image_slots,
)
from .release_infimm import HUB_KWARGS


if TYPE_CHECKING:  # ships pipeline_infimm.py with the model code (save_pretrained copies relative imports)
    from .pipeline_infimm import InfiMMImageTextToTextPipeline  # noqa: F401


logger = logging.get_logger(__name__)

# `device_map` strategies for which the blocks are placed with their decoder layers.
_PLANNED_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

# Keyword under which a call's `_BlockImages` travel from `InfiMMModel.forward` through the language model's
# `**kwargs` to the decoder layers' pre-hooks.
_BLOCK_IMAGES_KWARG = "infimm_block_images"


# ------------------------------------------------------------------------------------------------------- outputs
# transformers 5.24 renamed the language model's cache from `past_key_values` to `cache`, as an argument and as an
# output field. The outputs below inherit the installed version's field and `forward` accepts either name, so the
# same file serves the whole supported range.
_CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# The installed release's name, for callers that pass a cache to `generate()` / `forward` on any supported release:
# `model.generate(**inputs, **{CACHE_ARGUMENT: cache})`.
CACHE_ARGUMENT = _CACHE

# Set by `_update_model_kwargs_for_generation` for the steps after a `generate()` prefill: their tokens are
# generated text, which follows the prompt's last image (README, "Python usage": "During generation every new token
# follows the prompt's last image"), so such a step runs in `CallMode.DECODE`: no image bookkeeping, no device sync.
_DECODING_KWARG = "infimm_decoding"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the language-model cache once, as `cache` or as its older name `past_key_values`.")
    return cache if cache is not None else past_key_values


# Releases before 5.24 checkpoint a decoder layer's whole `__call__`, its forward pre-hooks included, so the block
# runs inside the layer's checkpoint with the resampled latents in a keyword argument; reentrant checkpointing
# cannot see them as an input, and the second block's backward finds the resampler's graph freed. From 5.24 the
# layer checkpoints its `forward` and the hooks (hence the blocks, which take the latents positionally) run outside.
_PRE_HOOKS_INSIDE_CHECKPOINT = "__call__" in GradientCheckpointingLayer.__dict__


def _with_default_skips(quantization_config, skips: list[str]):
    """`quantization_config` with `skips` as its list of modules to keep unquantized, when it names none.

    transformers has no class-level list of modules not to quantize: without one in the config it skips the output
    embeddings and the module of the last registered parameter, so the result would hang on module order.
    bitsandbytes calls the list `llm_int8_skip_modules`, torchao and most other backends `modules_to_not_convert`. A
    list the caller gave, even an empty one, is kept; the caller's object is never changed (a copy is returned), and
    the list lands in the saved `config.json`, so a reload quantizes the same modules.
    """
    if isinstance(quantization_config, dict):
        from transformers.quantizers.auto import AutoQuantizationConfig

        quantization_config = AutoQuantizationConfig.from_dict(quantization_config)
    for field in ("llm_int8_skip_modules", "modules_to_not_convert"):
        if hasattr(quantization_config, field):
            if getattr(quantization_config, field) is None:
                quantization_config = copy.deepcopy(quantization_config)
                setattr(quantization_config, field, list(skips))
            break
    return quantization_config


def _accepts_old_cache_name(forward):
    """On releases that call the cache `cache`, `past_key_values=` still works but warns, as library models do."""
    if _CACHE != "cache":
        return forward
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)(forward)


@dataclass
class InfiMMModelOutputWithPast(BaseModelOutputWithPast):
    """The language model's output, plus the resampled new images `(image rows, images, latents, vision_dim)` and,
    when asked for hidden states, the vision tower's (`image_outputs`). The cache carries the image state."""

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class InfiMMCausalLMOutputWithPast(CausalLMOutputWithPast):
    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


# ------------------------------------------------------------------------------------------------------ modules
def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear, no biases (indices 0, 1, 3 match the released checkpoint)."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)"""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attention(module: nn.Module, query, key, value, mask=None) -> torch.Tensor:
    """`query` `(b, heads, q, d)`, `key` / `value` `(b, heads, k, d)`, boolean `mask` `(b, 1, q, k)` or None ->
    `(b, q, heads, d)`.

    Through transformers' attention interface, so `attn_implementation=` and `set_attn_implementation` reach the
    connector as they reach the language model. A per-token image mask is boolean for SDPA (and functions registered
    in the interface, which receive SDPA-style masks), additive for eager; flash / flex / paged kernels cannot
    express it, so masked calls (a prefill with several images) run on SDPA there.
    """
    implementation = module.config._attn_implementation or "sdpa"
    if implementation == "eager":
        if mask is not None:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
        return eager_attention_forward(module, query, key, value, mask, scaling=module.scaling)[0]
    if mask is not None and implementation.startswith(("flash", "flex", "paged", "kernels-")):
        implementation = "sdpa"
    attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    return attention_function(module, query, key, value, mask, scaling=module.scaling, dropout=0.0)[0]


class _AttentionModule(nn.Module):
    """What transformers' attention functions read off their module: config, scaling, kv groups, causality."""

    is_causal = False  # cross-attention and the resampler see every key (SDPA would otherwise truncate the keys)
    num_key_value_groups = 1

    def __init__(self, config: InfiMMConfig, heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.heads = heads
        self.scaling = head_dim**-0.5


class InfiMMPerceiverAttention(_AttentionModule):
    """Latents attend to concat(image features, latents); media and latents are normalised separately."""

    def __init__(self, config: InfiMMConfig):
        super().__init__(config, config.resampler_heads, config.resampler_head_dim)
        dim, inner = config.vision_hidden_size, config.resampler_heads * config.resampler_head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # media (n, tokens, dim), latents (n, num_latents, dim)
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = _split_heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        out = _attention(self, q, _split_heads(k, self.heads), _split_heads(v, self.heads))
        return self.to_out(out.flatten(2))


class InfiMMPerceiverLayer(nn.Module):
    def __init__(self, config: InfiMMConfig):
        super().__init__()
        self.attn = InfiMMPerceiverAttention(config)
        self.ff = _feed_forward(config.vision_hidden_size, config.resampler_ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = self.attn(media, latents) + latents
        return self.ff(latents) + latents


class InfiMMPerceiverResampler(nn.Module):
    """Perceiver resampler (Flamingo sec. 2.1): any number of vision tokens -> `num_latents` tokens per image."""

    def __init__(self, config: InfiMMConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(config.resampler_num_latents, config.vision_hidden_size))
        self.layers = nn.ModuleList([InfiMMPerceiverLayer(config) for _ in range(config.resampler_depth)])
        self.norm = nn.LayerNorm(config.vision_hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features (n, vision_tokens, dim) -> (n, num_latents, dim)
        latents = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(features, latents)
        return self.norm(latents)


def _fold_rows(query: torch.Tensor, mask: torch.Tensor | None, rows: int):
    """`(text rows, heads, T, d)` queries -> `(rows, heads, group * T, d)`, the text rows of a group side by side.

    The text rows of a group (beams, returned sequences, queries of one prefix) attend the same image keys, so
    folding them into the query axis is exact and spares copying the keys/values per text row. The mask
    `(text rows, 1, T, keys)` is folded the same way.
    """
    text_rows, heads, length, dim = query.shape
    group = text_rows // rows
    if group == 1:
        return query, mask
    query = query.view(rows, group, heads, length, dim).transpose(1, 2).reshape(rows, heads, group * length, dim)
    if mask is not None:
        mask = mask.view(rows, group, 1, length, mask.shape[-1]).transpose(1, 2).reshape(rows, 1, group * length, -1)
    return query, mask


def _unfold_rows(out: torch.Tensor, text_rows: int) -> torch.Tensor:
    """Inverse of `_fold_rows` for the attention output `(rows, group * T, heads, d)` -> `(text rows, T, heads, d)`."""
    rows, folded, heads, dim = out.shape
    group = text_rows // rows
    if group == 1:
        return out
    return out.view(rows, group, folded // group, heads, dim).reshape(text_rows, folded // group, heads, dim)


class InfiMMCrossAttention(_AttentionModule):
    """Text queries, image-latent keys/values; masked so each token sees only its own image."""

    def __init__(self, config: InfiMMConfig):
        super().__init__(config, config.cross_attn_heads, config.cross_attn_head_dim)
        text_dim = config.text_config.hidden_size
        inner = config.cross_attn_heads * config.cross_attn_head_dim
        self.norm = nn.LayerNorm(text_dim)
        self.to_q = nn.Linear(text_dim, inner, bias=False)
        self.to_kv = nn.Linear(config.vision_hidden_size, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, text_dim, bias=False)

    def key_values(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, n, vision_dim) -> k, v each (rows, heads, n, head_dim)"""
        # The text-side compute dtype (this block's norm stays float): a quantized `to_kv.weight` holds int8 / uint8.
        k, v = self.to_kv(latents.to(self.norm.weight.dtype)).chunk(2, dim=-1)
        return _split_heads(k, self.heads), _split_heads(v, self.heads)

    def forward(self, hidden_states, key, value, mask=None, no_media=None):
        """`hidden_states` `(text rows, T, text_dim)`; `key` / `value` `(image rows, heads, keys, head_dim)`, the
        image rows dividing the text rows (each shared by a group of consecutive text rows)."""
        q = _split_heads(self.to_q(self.norm(hidden_states)), self.heads)
        q, mask = _fold_rows(q, mask, key.shape[0])
        out = _unfold_rows(_attention(self, q, key, value, mask), hidden_states.shape[0]).flatten(2)
        if no_media is not None:
            # Tokens before the first image: their mask row was opened to avoid NaNs; their output is zero.
            out = out.masked_fill(no_media.unsqueeze(-1), 0.0)
        return self.to_out(out)


class InfiMMGatedCrossAttentionBlock(GradientCheckpointingLayer):
    """x += flag * tanh(attn_gate) * xattn(x, images); x += flag * tanh(ff_gate) * ff(x). Gates start at 0."""

    def __init__(self, config: InfiMMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn = InfiMMCrossAttention(config)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = _feed_forward(config.text_config.hidden_size, config.cross_attn_ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, hidden_states: torch.Tensor, latents: torch.Tensor | None, plan: ImagePlan,
        image_cache: ImageCacheLayer | None = None,
    ) -> torch.Tensor:
        """`latents` `(image rows, new images * latents, vision_dim)`: this call's new images (None when there are
        none); `plan` says which image each token sees; `image_cache` (the cache's image layer, None without a
        cache) gives the cached last images and records this call's."""
        # `latents` comes positionally so that reentrant activation checkpointing (`use_reentrant=True`) treats it
        # as an input; hidden in another argument, each block's recomputation would backpropagate into the
        # resampler's graph and the second block would find it freed.
        # `.to(device)` calls are no-ops on one device; with a device map they follow this block's layer.
        device = hidden_states.device
        key = value = None
        if latents is not None:
            key, value = self.attn.key_values(latents.to(device))
        if image_cache is not None:
            key, value = image_cache.update(key, value, self.layer_idx, plan)
        mask = None if plan.mask is None else plan.mask.to(device)
        no_media = None if plan.no_media is None else plan.no_media.to(device)
        attn = self.attn(hidden_states, key.to(device), value.to(device), mask, no_media)
        flag = plan.has_media.to(device=device, dtype=hidden_states.dtype).view(-1, 1, 1)
        hidden_states = hidden_states + flag * self.attn_gate.tanh() * attn
        return hidden_states + flag * self.ff_gate.tanh() * self.ff(hidden_states)


class _BlockImages(NamedTuple):
    """What every block of one forward call reads: the plan, the new images' latents `(image rows, new images *
    latents, vision_dim)` (None when the call encodes none) and the cache's image layer (None without a cache)."""

    plan: ImagePlan
    latents: torch.Tensor | None
    image_cache: ImageCacheLayer | None


def _cross_attention_pre_hook(model, block_key, module, args, kwargs):
    """Runs `model.cross_attention_layers[block_key]` (if the layer has a block) on the layer's input; hides the
    images from the layer itself.

    The block is looked up on the model at every call rather than held by the hook, so a wrapper that replaces it
    (PEFT's `modules_to_save`, say) is what runs.
    """
    images = kwargs.pop(_BLOCK_IMAGES_KWARG, None)
    if block_key is None or images is None:
        return args, kwargs
    block = model.cross_attention_layers[block_key]
    if args:
        args = (block(args[0], images.latents, images.plan, images.image_cache), *args[1:])
    else:
        kwargs["hidden_states"] = block(kwargs["hidden_states"], images.latents, images.plan, images.image_cache)
    return args, kwargs


# ----------------------------------------------------------------------------------------------------- models
def check_text_inputs(input_ids, length: int, cache_length: int, text_config) -> None:
    """Refuses, at the door, token inputs the language model would fail on deep inside PyTorch or silently
    mishandle: no tokens, ids outside the vocabulary, more positions than the model was trained for. Runs where the
    caller's tokens enter (a prompt, a continuation of `cache_length` cached tokens), not in generated steps."""
    if length == 0:
        raise ValueError(
            "The input holds no tokens (`input_ids` of length 0). Give at least one token, e.g. the processor's "
            "output for a prompt."
        )
    if input_ids is not None:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= text_config.vocab_size:
            raise ValueError(
                f"`input_ids` hold ids outside the vocabulary (0 to {text_config.vocab_size - 1}): smallest {low}, "
                f"largest {high}. Tokenize with the model's own processor or tokenizer; padding must use a real id "
                "(the release pads with `</s>`) and be masked by `attention_mask`, not marked with -100 or -1."
            )
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit and cache_length + length > limit:
        raise ValueError(
            f"The sequence is {cache_length + length} tokens ({cache_length} cached + {length} new) but the language "
            f"model has {limit} positions. Shorten the prompt: the processor truncates with `truncation=True, "
            f"max_length=...` (on the left, as the release did), or start a new conversation."
        )


def as_image_batch(pixel_values: torch.Tensor, image_size: int) -> torch.Tensor:
    """`(batch, images, 3, H, W)`; also takes the release's `(batch, images, 1, 3, H, W)` and `(batch, 3, H, W)`.

    Checks what the tower can take here, where the fix is obvious, rather than deep inside timm.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(
            f"`pixel_values` must be a torch.Tensor; got {type(pixel_values).__name__}. The processor returns them "
            "(`InfiMMProcessor(images=..., text=..., return_tensors='pt')`)."
        )
    if pixel_values.ndim == 6 and pixel_values.shape[2] == 1:
        pixel_values = pixel_values.squeeze(2)
    elif pixel_values.ndim == 4:
        pixel_values = pixel_values.unsqueeze(1)
    if pixel_values.ndim != 5:
        raise ValueError(
            "`pixel_values` must be (batch, images, 3, height, width) (or the release's (batch, images, 1, 3, "
            f"height, width)); got shape {tuple(pixel_values.shape)}. The processor produces this layout."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"`pixel_values` must be a floating-point tensor of normalised pixels; got dtype {pixel_values.dtype}. "
            "Pass images through the processor, which resizes, rescales and normalises them."
        )
    channels, height, width = pixel_values.shape[-3:]
    if channels != 3 or height != image_size or width != image_size:
        raise ValueError(
            f"`pixel_values` images must be 3 x {image_size} x {image_size} (RGB at the vision tower's size); got "
            f"{channels} x {height} x {width}. The model's processor resizes, crops and converts images to this."
        )
    # One reduction where images enter (never in a decode step): NaN or inf would spread through every attention
    # output and come out as finite-looking garbage tokens.
    if not bool(torch.isfinite(pixel_values).all()):
        bad = (~torch.isfinite(pixel_values)).flatten(2).any(-1).nonzero().tolist()
        raise ValueError(
            f"`pixel_values` hold NaN or infinite values (in (sample, image) {bad[:4]}"
            f"{' and more' if len(bad) > 4 else ''}). Check how they were computed: the processor only produces "
            "finite values, so build them with it, or replace the bad images."
        )
    return pixel_values


def _verify_folder_checksums(folder) -> None:
    """`from_pretrained(..., verify_checksums=True)`: the converter's check of a local folder, before any weight loads."""
    if not os.path.isdir(folder):
        raise ValueError(f"`verify_checksums=True` checks a local folder; {folder!r} is not one. Download the "
                         "snapshot first (huggingface_hub.snapshot_download) and pass its path.")
    try:
        from infimm.convert_weights.verify import verify_checksums
    except ImportError as err:
        raise ValueError("`verify_checksums=True` needs the infimm package (`pip install infimm`), whose converter "
                         "recorded the checksums and checks them.") from err
    verify_checksums(folder)


class InfiMMPreTrainedModel(PreTrainedModel):
    config_class = InfiMMConfig
    config: InfiMMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["InfiMMGatedCrossAttentionBlock", "InfiMMPerceiverResampler"]
    # Kept in the float dtype by quantized loading (`from_pretrained(quantization_config=...)`) unless the config
    # names its own skip list (`llm_int8_skip_modules` / `modules_to_not_convert`), which then replaces this one.
    # The vision tower and the resampler run once per image and their output feeds every cross-attention block, so
    # their rounding error would reach every token after an image; `lm_head` writes the logits. Without a list
    # transformers skips only the output embeddings and the last registered Linear (here the last block's `ff.3`),
    # so the result would hang on module order. Module names as transformers matches them against module and
    # parameter names (a prefix ending at a module boundary), with and without `model.` for both model classes.
    _modules_to_not_quantize = [
        "model.vision_tower", "vision_tower", "model.resampler", "resampler",
        "model.language_model.lm_head", "language_model.lm_head",
    ]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    # A decode step traces as one graph (its image keys/values come from the cache); the prefill's image bookkeeping
    # breaks the graph, as transformers expects of prefill, which it runs eagerly when it compiles the decode steps.
    _can_compile_fullgraph = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, verify_checksums: bool = False, **kwargs):
        """With a `quantization_config` that names no modules to skip, `_modules_to_not_quantize` stay float.

        `verify_checksums=True` first checks a local folder's shards against the SHA-256 the converter recorded
        when it wrote them (safetensors carries no checksum of its own, so a flipped byte would otherwise load
        silently); it reads every shard once, hence off by default. Needs the `infimm` package (its converter).
        """
        if verify_checksums:
            _verify_folder_checksums(pretrained_model_name_or_path)
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = _with_default_skips(
                kwargs["quantization_config"], cls._modules_to_not_quantize
            )
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        """Refuses reentrant checkpointing where the installed transformers runs the blocks inside the layers'
        checkpoints (see `_PRE_HOOKS_INSIDE_CHECKPOINT`), which would fail in the backward of an image batch."""
        options = getattr(gradient_checkpointing_func, "keywords", None) or {}
        if enable and options.get("use_reentrant") and _PRE_HOOKS_INSIDE_CHECKPOINT:
            raise ValueError(
                "Reentrant activation checkpointing (`use_reentrant=True`) needs transformers >= 5.24 with InfiMM; "
                "use the default `use_reentrant=False`, or upgrade transformers."
            )
        if gradient_checkpointing_func is not None:
            kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
        super()._set_gradient_checkpointing(enable=enable, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, InfiMMPerceiverResampler):
            init.normal_(module.latents, mean=0.0, std=1.0)  # torch.randn, as the Flamingo resampler
        elif isinstance(module, InfiMMGatedCrossAttentionBlock):
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def initialize_weights(self):
        super().initialize_weights()
        # timm's `cls_token` / `pos_embed` are bare parameters of the Eva module, which neither the timm wrapper's
        # init nor a per-module `_init_weights` reaches; initialise them here when the checkpoint lacks them.
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, InfiMMModel):
                    tower = module.vision_tower.timm_model
                    for name in ("cls_token", "pos_embed"):
                        param = getattr(tower, name, None)
                        if isinstance(param, nn.Parameter) and not getattr(param, "_is_hf_initialized", False):
                            init.trunc_normal_(param, std=0.02)
                            param._is_hf_initialized = True


class InfiMMModel(InfiMMPreTrainedModel):
    """Vision tower, resampler, cross-attention blocks and the language model; returns hidden states.

    `language_model` is the full causal LM (head included) so that its keys are exactly those of a standalone
    checkpoint; this class runs only its decoder (`language_model.model`), `InfiMMForConditionalGeneration` adds
    the head.
    """

    def __init__(self, config: InfiMMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.resampler = InfiMMPerceiverResampler(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.cross_attention_layers = nn.ModuleDict(
            {str(i): InfiMMGatedCrossAttentionBlock(config, i) for i in config.cross_attention_layers}
        )
        for i, layer in enumerate(self.language_model.model.layers):
            block_key = str(i) if str(i) in self.cross_attention_layers else None
            layer.register_forward_pre_hook(partial(_cross_attention_pre_hook, self, block_key), with_kwargs=True)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # A full checkpoint stores this model under `model.`; transformers strips that prefix, but one of its
        # built-in renames (for `model.language_model.model.*` of other VLMs) fires first and misplaces the LM.
        key_mapping = {r"^model\.language_model\.model\.": "language_model.model.", **(kwargs.pop("key_mapping", None) or {})}
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, key_mapping=key_mapping, **kwargs)

    def extra_repr(self) -> str:
        # The blocks run from forward pre-hooks, which the module tree does not show: say where.
        layers = ", ".join(self.cross_attention_layers)
        return f"cross_attention_layers run before decoder layers [{layers}] (forward pre-hooks)"

    def enable_vision_checkpointing(self, enable: bool = True):
        """Activation checkpointing inside the timm tower (the model-wide switch reaches only transformers layers).

        The tower is frozen in every InfiMM training stage, so this only pays off when it is trained.
        """
        self.vision_tower.timm_model.set_grad_checkpointing(enable)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _encode_images(self, images: torch.Tensor, output_hidden_states: bool = False):
        """`(n, 3, H, W)` -> tower features `(n, tokens, vision_dim)`, resampled latents `(n, latents, vision_dim)` and,
        if asked, the tower's hidden states as transformers lays them out: the embeddings (the first block's input)
        followed by every block's output, `depth + 1` tensors.

        The features are the last block's output before the tower's final norm, CLS token first, as the release
        feeds its resampler (README, "Conventions shared with transformers' VLMs"); the final norm and head are
        unused by design (they stay in the checkpoint, which is timm's own layout). The tower runs without autograd
        unless one of its parameters is trainable.
        """
        tower_blocks = self.vision_tower.timm_model.blocks
        depth = len(tower_blocks)
        track = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        embeddings = []
        # timm's `forward_intermediates` returns block outputs only; the embeddings are the first block's input.
        hook = tower_blocks[0].register_forward_pre_hook(lambda _, args: embeddings.append(args[0])) \
            if output_hidden_states else None
        try:
            with torch.set_grad_enabled(track):
                # Through the wrapper's own call (so device-map / offload hooks run): timm's `forward_intermediates`.
                blocks = self.vision_tower(
                    images, output_hidden_states=list(range(depth)) if output_hidden_states else [depth - 1],
                    do_pooling=False, return_dict=True, norm=False, output_fmt="NLC", return_prefix_tokens=True,
                ).hidden_states
                blocks = tuple(torch.cat([prefix, patches], dim=1) for patches, prefix in blocks)
        finally:
            if hook is not None:
                hook.remove()
        features = blocks[-1]
        latents = self.resampler(features.to(self.resampler.latents.dtype))
        return features, latents, (embeddings[0], *blocks) if output_hidden_states else None

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """The vision tower's features and the resampled latents that the cross-attention blocks attend to.

        `pixel_values` `(images, 3, H, W)`: `last_hidden_state` `(images, tokens, vision_dim)` (the last block before
        the final norm, CLS first) and `pooler_output` `(images, latents, vision_dim)`. The model's own
        `(batch, images, 3, H, W)` (with `image_mask`, or all-zero padding slots): per sample, `last_hidden_state`
        `(batch, images * tokens, vision_dim)` with zeros for padding slots and `pooler_output` a tuple holding each
        sample's `(its images * latents, vision_dim)`. `hidden_states` holds the tower's embeddings and every block's
        output (`depth + 1`, transformers' convention) when asked.
        The tower exposes no attention maps (timm), so `attentions` is None.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        per_sample = pixel_values.ndim != 4
        if per_sample:
            pixel_values = as_image_batch(pixel_values, self.config.image_size)
            real, _ = real_image_slots(pixel_values, image_mask)
            images = pixel_values[real]
        else:
            images = as_image_batch(pixel_values, self.config.image_size).squeeze(1)
        features, latents, hidden_states = self._encode_images(images, output_hidden_states)
        if per_sample:
            output = self._per_sample_image_outputs(features, latents, hidden_states, real)
        else:
            output = BaseModelOutputWithPooling(
                last_hidden_state=features, pooler_output=latents, hidden_states=hidden_states
            )
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _per_sample_image_outputs(features, latents, hidden_states, real) -> BaseModelOutputWithPooling:
        """Encoded images `(n, ...)` laid out per row of `real` `(rows, slots)`: `last_hidden_state`
        `(rows, slots * tokens, vision_dim)` with zeros for the slots not encoded, `pooler_output` a tuple holding each
        row's `(its images * latents, vision_dim)`; `hidden_states` stay per image."""
        packed = features.new_zeros(real.shape[0], real.shape[1], *features.shape[1:])
        packed[real] = features
        counts = real.sum(1).tolist()
        return BaseModelOutputWithPooling(
            last_hidden_state=packed.flatten(1, 2),
            pooler_output=tuple(chunk.flatten(0, 1) for chunk in latents.split(counts)),
            hidden_states=hidden_states,
        )

    def _image_media(self, input_ids, inputs_embeds) -> torch.Tensor | None:
        """`(rows, tokens)` bool: where the `<image>` tokens are, from `input_ids` or, without them, from the
        embeddings (rows equal to the `<image>` embedding), as transformers' own VLMs do."""
        if input_ids is not None:
            return input_ids == self.config.media_token_id
        if inputs_embeds is None:
            return None
        media = self.get_input_embeddings()(
            torch.tensor(self.config.media_token_id, device=inputs_embeds.device)
        ).to(inputs_embeds.dtype)
        return (inputs_embeds == media).all(-1)

    def _plan_images(self, input_ids, inputs_embeds, pixel_values, image_mask, attention_mask, cache, decoding):
        """`(plan, image_cache, pixel_values)`: this call's `ImagePlan`, the cache's image layer (None without a
        cache) and the pixel values in the model's layout (checked here, where they enter)."""
        image_cache = None
        if cache is not None:
            image_cache = attach_image_layer(cache, self.config.text_config.num_hidden_layers)
        num_latents = self.config.resampler_num_latents
        if decoding and image_cache is not None and image_cache.image_state is not None:
            text_rows = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
            return plan_decode(image_cache, text_rows, num_latents), image_cache, None
        is_media = self._image_media(input_ids, inputs_embeds)
        if is_media is None:
            raise ValueError("You have to specify either `input_ids` or `inputs_embeds`.")
        cache_length = int(cache.get_seq_length()) if cache is not None else 0
        check_text_inputs(input_ids, is_media.shape[1], cache_length, self.config.text_config)
        if pixel_values is not None:
            pixel_values = as_image_batch(pixel_values, self.config.image_size)
        mode = CallMode.CONTINUE if cache_length > 0 else CallMode.PREFILL
        plan = plan_prompt(
            mode, is_media, pixel_values, image_mask, attention_mask, image_cache, cache_length, num_latents
        )
        return plan, image_cache, pixel_values

    def _encode_planned(self, plan: ImagePlan, pixel_values, output_hidden_states: bool):
        """`(latents, image_outputs)`: the new images the plan names, encoded once per image row (batch padding and
        a cached prefix's images never reach the tower, and the beams / returned sequences of one prompt share their
        encoding), as the blocks read them `(image rows, new images * latents, vision_dim)`, and the vision outputs
        laid out as `get_image_features(pixel_values, image_mask)` lays them out; (None, None) without new images."""
        if plan.encode is None:
            return None, None
        features, encoded, blocks = self._encode_images(pixel_values[plan.encode], output_hidden_states)
        return plan.place(encoded), self._per_sample_image_outputs(features, encoded, blocks, plan.encode)

    def _text_only_paged_forward(self, input_ids, pixel_values, attention_mask, position_ids, cache, inputs_embeds,
                                 use_cache, output_hidden_states, **kwargs) -> "InfiMMModelOutputWithPast":
        """Continuous batching (`generate_batch`, `init_continuous_batching`, `serve --continuous-batching`) packs its
        requests into one row over a paged cache, which has no layers for the image state and no sequence length.
        It takes token ids only, so its prompts are text-only, and a text-only prompt runs no cross-attention block:
        the step is exactly the language model's, which supports the paged cache."""
        media = self._image_media(input_ids, inputs_embeds)
        if pixel_values is not None or (media is not None and bool(media.any())):
            raise ValueError(
                "Continuous batching runs text-only InfiMM prompts: this one has an `<image>` token. Run prompts "
                "with images through `generate()` (`infimm serve --continuous-batching` does so by itself)."
            )
        kwargs.pop(_DECODING_KWARG, None)
        # Handed on as `cache=`, the name continuous batching uses on every release: before 5.24 it is not the
        # language model's cache argument but reaches the attention functions, which update the paged cache.
        outputs = self.language_model.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, cache=cache, **kwargs,
        )
        return InfiMMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state, **{_CACHE: getattr(outputs, _CACHE)},
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )

    @_accepts_old_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> InfiMMModelOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, images, 3, height, width)`):
            Images of each sample, in the order of its `<image>` tokens; zero slots pad samples with fewer images.
            Continuing a cached prefix, they may repeat the prefix's images (checked, not encoded again) or hold only
            the new ones.
        image_mask (`torch.Tensor` of shape `(batch, images)`, *optional*):
            True for real images, False for padding slots (the processor returns it).
        cache (`Cache`, *optional*):
            The language model's cache; it also holds the image state of the tokens it holds (a layer after the
            decoder's, see `image_state_infimm`), so a cached prefix continues exactly.
        past_key_values (`Cache`, *optional*):
            The name of `cache` before transformers 5.24; either is accepted.
        """
        cache = _one_cache(cache, past_key_values)
        if isinstance(cache, PagedAttentionCache):
            return self._text_only_paged_forward(input_ids, pixel_values, attention_mask, position_ids, cache,
                                                 inputs_embeds, use_cache, output_hidden_states, **kwargs)
        decoding = kwargs.pop(_DECODING_KWARG, False)
        if use_cache is None:
            use_cache = self.config.text_config.use_cache
        if use_cache and cache is None:
            # Created here rather than inside the language model so that the image state can live in it.
            cache = DynamicCache(config=self.config.text_config)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )

        plan, image_cache, pixel_values = self._plan_images(
            input_ids, inputs_embeds, pixel_values, image_mask, attention_mask, cache, decoding
        )
        latents, image_outputs = self._encode_planned(plan, pixel_values, bool(output_hidden_states))
        if image_cache is not None:
            image_cache.advance(plan)
        if plan.runs_blocks:
            kwargs[_BLOCK_IMAGES_KWARG] = _BlockImages(plan, latents, image_cache)
        outputs = self.language_model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **{_CACHE: cache},
            **kwargs,
        )
        image_hidden_states = None
        if image_outputs is not None:
            image_hidden_states = latents.unflatten(1, (-1, self.config.resampler_num_latents))
        return InfiMMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{_CACHE: getattr(outputs, _CACHE)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_hidden_states,
            image_outputs=image_outputs,
        )


class InfiMMForConditionalGeneration(InfiMMPreTrainedModel, GenerationMixin):
    """InfiMM with its language-model head: logits, the shifted causal-LM loss, and `generate()`."""

    def __init__(self, config: InfiMMConfig):
        super().__init__(config)
        self.model = InfiMMModel(config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Also loads a snapshot of the original release (legacy config.json, `pytorch_model.bin`), mapping its
        config and weight names on the fly, when the `infimm` package (with `infimm.convert_weights`) is installed."""
        try:  # optional and package-only: Hub remote code never needs it
            from infimm.convert_weights.legacy import is_legacy_checkpoint, load_legacy_model
        except ImportError:
            is_legacy_checkpoint = load_legacy_model = None
        if (
            load_legacy_model is not None
            and pretrained_model_name_or_path is not None
            and is_legacy_checkpoint(pretrained_model_name_or_path, **kwargs)
        ):
            return load_legacy_model(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        if isinstance(kwargs.get("device_map"), str) and kwargs["device_map"] in _PLANNED_DEVICE_MAPS:
            kwargs["device_map"] = cls._plan_device_map(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def _plan_device_map(cls, pretrained_model_name_or_path, kwargs):
        """accelerate's automatic map with each cross-attention block on its decoder layer's device and the vision
        tower kept off disk (see `device_map_infimm`), planned on a model without storage."""
        if not is_accelerate_available():  # transformers itself explains that `device_map` needs accelerate
            return kwargs["device_map"]
        config = kwargs.get("config")
        if not isinstance(config, PreTrainedConfig):
            hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        dtype = config.dtype if dtype in (None, "auto") else dtype
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        meta = meta_model(config, dtype=dtype, model_class=cls)
        return infer_device_map(meta, max_memory=kwargs.get("max_memory"), dtype=dtype, strategy=kwargs["device_map"])

    @property
    def lm_head(self) -> nn.Module:
        return self.model.language_model.get_output_embeddings()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.model.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.model.language_model.set_output_embeddings(new_embeddings)

    def get_image_features(self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None, **kwargs):
        return self.model.get_image_features(pixel_values, image_mask=image_mask, **kwargs)

    def enable_vision_checkpointing(self, enable: bool = True):
        self.model.enable_vision_checkpointing(enable)

    @_accepts_old_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> InfiMMCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch, tokens)`, *optional*):
            Targets for the causal LM loss (shifted inside); -100 is ignored. With `num_items_in_batch` in `kwargs`
            (as Trainer passes under gradient accumulation) the summed loss is divided by it.
        past_key_values (`Cache`, *optional*):
            The name of `cache` before transformers 5.24; either is accepted.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_mask=image_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return InfiMMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{_CACHE: getattr(outputs, _CACHE)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            image_outputs=outputs.image_outputs,
        )

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, image_mask=None, inputs_embeds=None,
                                      is_first_iteration=False, **kwargs):
        """The library's preparation; the images also reach a forward whose cache holds no image state yet.

        transformers hands `pixel_values` only to the first step of a `generate()` call. An assistant model in
        assisted decoding is first called with `is_first_iteration=False`, so it would see the prompt's `<image>`
        tokens without their images; a cache without image state is the sign that the images are still needed.
        """
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if is_first_iteration or not kwargs.get("use_cache", True) or image_state(cache) is None:
            model_inputs.update(pixel_values=pixel_values, image_mask=image_mask)
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beams and returned sequences of one prompt share its images: keep one row of pixels per prompt so each
        # image is encoded once (the cross-attention folds a prompt's text rows onto its image row).
        images = {key: model_kwargs.pop(key) for key in ("pixel_values", "image_mask") if key in model_kwargs}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(images)
        return input_ids, model_kwargs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        # The steps after this one feed generated tokens (see `_DECODING_KWARG`).
        model_kwargs[_DECODING_KWARG] = getattr(outputs, _CACHE, None) is not None
        return model_kwargs

    def _get_candidate_generator(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
                                 assistant_model=None, **kwargs):
        """An assistant that takes no images (a text-only draft model sharing the vocabulary) gets the prompt's
        text alone; transformers would otherwise refuse it for the unused image arguments."""
        generator = super()._get_candidate_generator(
            generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
            assistant_model=assistant_model, **kwargs,
        )
        assistant_kwargs = getattr(generator, "assistant_kwargs", None)
        if assistant_model is not None and assistant_kwargs is not None:
            accepted = inspect.signature(assistant_model.forward).parameters
            for key in ("pixel_values", "image_mask", _DECODING_KWARG):
                if key not in accepted:
                    assistant_kwargs.pop(key, None)
        return generator


__all__ = ["CACHE_ARGUMENT", "InfiMMPreTrainedModel", "InfiMMModel", "InfiMMForConditionalGeneration"]
