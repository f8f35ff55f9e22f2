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

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple, is_accelerate_available, logging

from .configuration_infimm import InfiMMConfig
from .device_map_infimm import infer_device_map, meta_model


logger = logging.get_logger(__name__)

# `device_map` strategies for which the blocks are placed with their decoder layers.
_PLANNED_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# `from_pretrained` arguments that say where the config is read from.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")

# Keyword under which the per-call image state travels from `InfiMMModel.forward` through the language model's
# `**kwargs` to the decoder layers' pre-hooks.
_IMAGE_INPUTS_KWARG = "infimm_image_inputs"


# ------------------------------------------------------------------------------------------------------- outputs
class InfiMMImageCache:
    """Per-`generate()` image state, computed once at prefill and reused by every decode step.

    During decoding every new token attends only to the last image of its sample (REFERENCE: "While generating
    with a cache, every new token counts as following the last image of the prompt"), so each block keeps only
    that image's keys/values: `key_values[layer_idx] = (k, v)`, each `(batch, heads, num_latents, head_dim)`.
    `has_media` is the per-sample flag. Beams of one sample share its images, so the cache is never reordered.
    """

    def __init__(self, has_media: torch.Tensor):
        self.has_media = has_media
        self.key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self):
        return len(self.key_values)


# transformers 5.24 renamed the language model's cache from `past_key_values` to `cache`, as an argument and as an
# output field. The outputs below inherit the installed version's field and `forward` accepts either name, so the
# same file serves the whole supported range.
_CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the language-model cache once, as `cache` or as its older name `past_key_values`.")
    return cache if cache is not None else past_key_values


@dataclass
class InfiMMModelOutputWithPast(BaseModelOutputWithPast):
    """The language model's output, plus the resampled images and `image_cache` to carry between generation steps."""

    image_hidden_states: torch.FloatTensor | None = None
    image_cache: InfiMMImageCache | None = None


@dataclass
class InfiMMCausalLMOutputWithPast(CausalLMOutputWithPast):
    image_hidden_states: torch.FloatTensor | None = None
    image_cache: InfiMMImageCache | None = None


@dataclass
class _ImageInputs:
    """What the cross-attention blocks need for one forward call (built once, shared by every block).

    Prefill (`latents` set): `latents` `(batch, images * latents, vision_dim)`, `mask` `(batch, 1, tokens,
    images * latents)` selecting each token's own image, `no_media` `(batch, tokens)` for tokens before the first
    image, `last_image` `(batch,)` index of each sample's last image (to fill `cache`).
    Decode (`latents` is None): the blocks read their keys/values from `cache`.
    """

    has_media: torch.Tensor
    num_latents: int = 0
    latents: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    no_media: torch.Tensor | None = None
    last_image: torch.Tensor | None = None
    cache: InfiMMImageCache | None = None


# ------------------------------------------------------------------------------------------------------ modules
def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear, no biases (indices 0, 1, 3 match the released checkpoint)."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)"""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)"""
    return x.transpose(1, 2).flatten(2)


class InfiMMPerceiverAttention(nn.Module):
    """Latents attend to concat(image features, latents); media and latents are normalised separately."""

    def __init__(self, config: InfiMMConfig):
        super().__init__()
        dim, inner = config.vision_hidden_size, config.resampler_heads * config.resampler_head_dim
        self.heads = config.resampler_heads
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
        out = F.scaled_dot_product_attention(q, _split_heads(k, self.heads), _split_heads(v, self.heads))
        return self.to_out(_merge_heads(out))


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


class InfiMMCrossAttention(nn.Module):
    """Text queries, image-latent keys/values; masked so each token sees only its own image."""

    def __init__(self, config: InfiMMConfig):
        super().__init__()
        text_dim = config.text_config.hidden_size
        inner = config.cross_attn_heads * config.cross_attn_head_dim
        self.heads = config.cross_attn_heads
        self.norm = nn.LayerNorm(text_dim)
        self.to_q = nn.Linear(text_dim, inner, bias=False)
        self.to_kv = nn.Linear(config.vision_hidden_size, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, text_dim, bias=False)

    def key_values(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, n, vision_dim) -> k, v each (batch, heads, n, head_dim)"""
        k, v = self.to_kv(latents.to(self.to_kv.weight.dtype)).chunk(2, dim=-1)
        return _split_heads(k, self.heads), _split_heads(v, self.heads)

    def forward(self, hidden_states, key, value, mask=None, no_media=None):
        q = _split_heads(self.to_q(self.norm(hidden_states)), self.heads)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask)
        out = _merge_heads(out)
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

    def forward(self, hidden_states: torch.Tensor, image_inputs: _ImageInputs) -> torch.Tensor:
        # `.to(device)` calls are no-ops on one device; with a device map they follow this block's layer.
        device = hidden_states.device
        if image_inputs.latents is not None:
            key, value = self.attn.key_values(image_inputs.latents.to(device))
            if image_inputs.cache is not None:
                self._cache_last_image(key, value, image_inputs)
            attn = self.attn(
                hidden_states, key, value, image_inputs.mask.to(device), image_inputs.no_media.to(device)
            )
        else:
            key, value = image_inputs.cache.key_values[self.layer_idx]
            attn = self.attn(hidden_states, key, value)
        flag = image_inputs.has_media.to(device=device, dtype=hidden_states.dtype).view(-1, 1, 1)
        hidden_states = hidden_states + flag * self.attn_gate.tanh() * attn
        return hidden_states + flag * self.ff_gate.tanh() * self.ff(hidden_states)

    def _cache_last_image(self, key, value, image_inputs: _ImageInputs):
        rows = torch.arange(key.shape[0], device=key.device)
        last = image_inputs.last_image.to(key.device)
        num_images = image_inputs.mask.shape[-1] // image_inputs.num_latents
        # (batch, heads, images * latents, d) -> (batch, heads, images, latents, d) -> each sample's last image
        key = key.unflatten(2, (num_images, -1))[rows, :, last]
        value = value.unflatten(2, (num_images, -1))[rows, :, last]
        image_inputs.cache.key_values[self.layer_idx] = (key, value)


def _cross_attention_pre_hook(model, block_key, module, args, kwargs):
    """Runs `model.cross_attention_layers[block_key]` (if the layer has a block) on the layer's input; hides the image
    inputs from the layer itself.

    The block is looked up on the model at every call rather than held by the hook, so a wrapper that replaces it
    (PEFT's `modules_to_save`, say) is what runs.
    """
    image_inputs = kwargs.pop(_IMAGE_INPUTS_KWARG, None)
    if block_key is None or image_inputs is None:
        return args, kwargs
    block = model.cross_attention_layers[block_key]
    if args:
        args = (block(args[0], image_inputs), *args[1:])
    else:
        kwargs["hidden_states"] = block(kwargs["hidden_states"], image_inputs)
    return args, kwargs


# ---------------------------------------------------------------------------------------------- image inputs
def _as_image_batch(pixel_values: torch.Tensor) -> torch.Tensor:
    """Accepts (batch, images, 3, H, W), the release's (batch, images, 1, 3, H, W) and (batch, 3, H, W)."""
    if pixel_values.ndim == 6 and pixel_values.shape[2] == 1:
        return pixel_values.squeeze(2)
    if pixel_values.ndim == 4:
        return pixel_values.unsqueeze(1)
    if pixel_values.ndim != 5:
        raise ValueError(
            "`pixel_values` must be (batch, images, 3, height, width) (or the release's (batch, images, 1, 3, "
            f"height, width)); got shape {tuple(pixel_values.shape)}."
        )
    return pixel_values


def _real_image_slots(pixel_values, image_mask, num_image_tokens) -> torch.Tensor:
    """(batch, slots) bool: which image slots hold a real image; checks them against the `<image>` tokens.

    Without `image_mask`, sample b's first `num_image_tokens[b]` slots are its images and any further slot must be
    all-zero batch padding.
    """
    batch, slots = pixel_values.shape[:2]
    if image_mask is not None:
        if tuple(image_mask.shape) != (batch, slots):
            raise ValueError(
                f"`image_mask` must have shape (batch, images) = {(batch, slots)}; got {tuple(image_mask.shape)}."
            )
        real = image_mask.to(device=pixel_values.device, dtype=torch.bool)
        num_images = real.sum(1)
    else:
        real = torch.arange(slots, device=pixel_values.device)[None] < num_image_tokens[:, None].to(pixel_values.device)
        unannounced = pixel_values.flatten(2).ne(0).any(-1) & ~real
        num_images = real.sum(1) + unannounced.sum(1)
    num_image_tokens = num_image_tokens.to(num_images.device)
    if (num_images != num_image_tokens).any():
        b = int((num_images != num_image_tokens).nonzero()[0, 0])
        raise ValueError(
            f"Sample {b} has {int(num_image_tokens[b])} `<image>` tokens but {int(num_images[b])} images "
            f"(pixel_values has {slots} image slots per sample). Put exactly one `<image>` token in the text for "
            "each image, or pass `image_mask` to mark which slots are padding."
        )
    return real


def _rows_per_image_row(text_rows: int, image_rows: int) -> int:
    """How many consecutive text rows share one row of `pixel_values` (1, or the beam / sequence count)."""
    if image_rows == 0 or text_rows % image_rows:
        raise ValueError(
            f"`pixel_values` has {image_rows} rows but `input_ids` has {text_rows}; give one row of images per "
            "sample (generate() keeps one row per prompt and shares it across beams and returned sequences)."
        )
    return text_rows // image_rows


def _token_image_mask(media_index: torch.Tensor, num_images: int, num_latents: int):
    """Cross-attention mask from each token's image number (0 = before any image; k = k-th image).

    Returns `mask` (batch, 1, tokens, images * latents), True where a token may attend, and `no_media`
    (batch, tokens). Rows of tokens without an image are fully opened (an all-False row makes SDPA return NaN);
    their output is zeroed afterwards.
    """
    image_of_latent = torch.arange(1, num_images + 1, device=media_index.device).repeat_interleave(num_latents)
    no_media = media_index == 0
    mask = (media_index.unsqueeze(-1) == image_of_latent) | no_media.unsqueeze(-1)
    return mask.unsqueeze(1), no_media


# ----------------------------------------------------------------------------------------------------- models
class InfiMMPreTrainedModel(PreTrainedModel):
    config_class = InfiMMConfig
    config: InfiMMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["InfiMMGatedCrossAttentionBlock", "InfiMMPerceiverResampler"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _can_compile_fullgraph = False

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

    def enable_vision_checkpointing(self, enable: bool = True):
        """Activation checkpointing inside the timm tower (the model-wide switch reaches only transformers layers).

        The tower is frozen in every InfiMM training stage, so this only pays off when it is trained.
        """
        self.vision_tower.timm_model.set_grad_checkpointing(enable)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> resampled latents (images, num_latents, vision_dim).

        The tower's features are the last block's output before its final norm, CLS token first (REFERENCE:
        "Vision features"). The tower runs without autograd unless one of its parameters is trainable.
        """
        last_block = len(self.vision_tower.timm_model.blocks) - 1
        track = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(track):
            # Through the wrapper's own call (so device-map / offload hooks run): timm's `forward_intermediates`.
            patches, prefix = self.vision_tower(
                pixel_values, output_hidden_states=[last_block], do_pooling=False, return_dict=True,
                norm=False, output_fmt="NLC", return_prefix_tokens=True,
            ).hidden_states[0]
            features = torch.cat([prefix, patches], dim=1)
        return self.resampler(features.to(self.resampler.latents.dtype))

    def _image_inputs(self, input_ids, pixel_values, image_mask, image_cache, continuing, use_cache):
        """Builds the per-call `_ImageInputs` (None when no sample has an image) and the resampled images."""
        if continuing and image_cache is not None:
            # Decode step: no device sync, no work that grows with the number of images.
            return _ImageInputs(has_media=image_cache.has_media, cache=image_cache), None
        if input_ids is None:
            if pixel_values is not None:
                raise ValueError("`pixel_values` need `input_ids`: the `<image>` tokens say where each image goes.")
            return None, None
        is_media = input_ids == self.config.media_token_id
        num_image_tokens = is_media.sum(1)
        if pixel_values is None:
            if not continuing and bool(num_image_tokens.any()):
                raise ValueError(
                    f"`input_ids` hold {int(num_image_tokens.sum())} `<image>` tokens but no `pixel_values` were given."
                )
            return None, None
        pixel_values = _as_image_batch(pixel_values)
        repeat = _rows_per_image_row(input_ids.shape[0], pixel_values.shape[0])
        if not continuing:
            per_row_tokens = num_image_tokens[::repeat]
            if repeat > 1 and (num_image_tokens.view(-1, repeat) != per_row_tokens[:, None]).any():
                raise ValueError("Text rows sharing one row of `pixel_values` must hold the same number of images.")
            real = _real_image_slots(pixel_values, image_mask, per_row_tokens)
            media_index = is_media.cumsum(1)
        else:
            # Continuing a cached sequence without an image cache: every new token follows the last image.
            real = image_mask.bool() if image_mask is not None else pixel_values.flatten(2).ne(0).any(-1)
            media_index = real.sum(1).repeat_interleave(repeat)[:, None].expand_as(input_ids)
        num_images = real.sum(1).to(input_ids.device).repeat_interleave(repeat)
        has_media = num_images > 0
        if not bool(has_media.any()):
            return None, None

        # Encode real images only, once per row of `pixel_values`: batch padding never reaches the tower, and
        # beams / returned sequences of one prompt share its encoding.
        latents = self.get_image_features(pixel_values[real])
        max_images, num_latents = int(num_images.max()), latents.shape[1]
        packed = latents.new_zeros(pixel_values.shape[0], max_images, num_latents, latents.shape[-1])
        rows, _ = real.nonzero(as_tuple=True)
        packed[rows, (real.cumsum(1) - 1)[real]] = latents
        packed = packed.repeat_interleave(repeat, dim=0) if repeat > 1 else packed
        mask, no_media = _token_image_mask(media_index.clamp(max=max_images), max_images, num_latents)
        image_inputs = _ImageInputs(
            has_media=has_media,
            num_latents=num_latents,
            latents=packed.flatten(1, 2),
            mask=mask,
            no_media=no_media,
            last_image=(num_images - 1).clamp(min=0),
            cache=InfiMMImageCache(has_media) if use_cache else None,
        )
        return image_inputs, packed

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
        image_cache: InfiMMImageCache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> InfiMMModelOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, images, 3, height, width)`):
            Images of each sample, in the order of its `<image>` tokens; zero slots pad samples with fewer images.
        image_mask (`torch.Tensor` of shape `(batch, images)`, *optional*):
            True for real images, False for padding slots (the processor returns it).
        image_cache (`InfiMMImageCache`, *optional*):
            Image keys/values from the prefill of the same `generate()` call.
        past_key_values (`Cache`, *optional*):
            The name of `cache` before transformers 5.24; either is accepted.
        """
        cache = _one_cache(cache, past_key_values)
        if use_cache is None:
            use_cache = self.config.text_config.use_cache
        # A step after the prompt: the prefill's image cache is the sign (so decode steps never ask a static cache
        # for its length, which would sync with the device); otherwise the cache's length.
        continuing = cache is not None and (image_cache is not None or cache.get_seq_length() > 0)
        image_inputs, image_hidden_states = self._image_inputs(
            input_ids, pixel_values, image_mask, image_cache, continuing, use_cache
        )
        if image_inputs is not None:
            kwargs[_IMAGE_INPUTS_KWARG] = image_inputs
        outputs = self.language_model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{_CACHE: cache},
            **kwargs,
        )
        if image_inputs is not None:
            image_cache = image_inputs.cache
        elif not continuing:
            image_cache = None
        return InfiMMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{_CACHE: getattr(outputs, _CACHE)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_hidden_states,
            image_cache=image_cache if use_cache else None,
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
        config and weight names on the fly, when the `infimm` package (with `convert_weights`) is installed."""
        try:  # optional and package-only: Hub remote code never needs it
            from convert_weights.legacy import is_legacy_checkpoint, load_legacy_model
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
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        dtype = config.dtype if dtype in (None, "auto") else dtype
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        meta = meta_model(cls, config, dtype=dtype)
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

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    def enable_vision_checkpointing(self, enable: bool = True):
        self.model.enable_vision_checkpointing(enable)

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
        image_cache: InfiMMImageCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
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
            image_cache=image_cache,
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
            image_cache=outputs.image_cache,
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beams and returned sequences of one prompt share its images: keep one row of pixels per prompt so each
        # image is encoded once (the forward repeats the resampled latents instead).
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
        model_kwargs["image_cache"] = getattr(outputs, "image_cache", None)
        return model_kwargs


__all__ = ["InfiMMPreTrainedModel", "InfiMMModel", "InfiMMForConditionalGeneration", "InfiMMImageCache"]
