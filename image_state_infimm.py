"""Which image each token sees, and what a cached prefix holds of its images: the one owner of InfiMM's image state.

The rule (Flamingo, Alayrac et al. 2022, sec. 2.3; README, "Python usage"): a token attends only to the latents of
the most recent `<image>` at or before it; tokens before a sample's first image get a zero attention output; a
sample without any image skips every block (the release's per-sample `flag`). A prompt's prefix is therefore
reusable: after it has run, a continuation needs the language model's cache plus, per sample, how many images the
prefix held and every block's keys/values of its LAST image.

This module turns one forward call's inputs and the cache into an `ImagePlan` (which images to encode, each token's
image, the rows, the state after the call) and keeps that state in an `ImageCacheLayer` inside the cache. A call
runs in one of three modes (`CallMode`): PREFILL (nothing cached), CONTINUE (after a cached prefix) or DECODE (a step
of `generate()` after its prefill, whose generated tokens follow the prompt's last image).

Rows. "Text rows" are the rows of `input_ids`. Several consecutive text rows may share one "image row": the beams
and returned sequences of one prompt in `generate()`, or queries expanded from one cached prefix. Keys/values are
computed and stored per image row; the cross-attention folds the text rows of a group into its query length (exact,
since they attend the same keys), so an image is encoded once however many beams share it.

Why a cache layer. The image state must follow every operation applied to the cache: `crop` (assisted and
prompt-lookup decoding, a chat turn cut back to a shared prefix), `reorder_cache` (beam search),
`batch_select_indices`, `batch_repeat_interleave`, `reset`, offloading, `copy.deepcopy`. transformers' `Cache`
applies each of those by looping over `cache.layers`, so a layer appended after the decoder's layers receives them
all, on whatever cache `generate()` builds (DynamicCache, StaticCache, offloaded), the way mllama's image
keys/values live in the cache layers of its cross-attention layers. An attribute on the cache object is invisible
to those operations; a `Cache` subclass would need `generate()` to build it, and a wrapper around a cache's methods
would be lost by every copy of the cache.

Validation of the caller's tensors (pixel layout, token ids) and the attention reshapes live in
`modeling_infimm.py`; everything here is bookkeeping on tensors.
"""

import enum
import math
from dataclasses import dataclass, replace

import torch
from transformers import cache_utils


# ------------------------------------------------------------------------------------------------ modes, state
class CallMode(enum.Enum):
    PREFILL = "prefill"  # the cache holds no tokens (or there is no cache): every `<image>` of the input is new
    CONTINUE = "continue"  # the cache holds a prefix: its images are not encoded again, new ones are
    DECODE = "decode"  # a generate() step after its prefill: every token follows the last cached image


@dataclass(frozen=True)
class ImageState:
    """What the cached tokens hold of their images, per image row (the keys/values are in `ImageCacheLayer`).

    - `num_images` `(rows,)`: how many images each row's cached tokens hold.
    - `fingerprints` `(rows, most images, 2)` float64: two statistics of each cached image's pixels, so that a
      continuation whose `pixel_values` repeat the prefix's images can be checked to repeat the SAME images.
    - `image_end` `(rows,)`: one past the cache position of each row's last `<image>` token (0: the row has no
      image); a crop to fewer tokens than that removes an image.
    - `text_rows`: the cache's batch size; text row `t` reads image row `t // (text_rows // rows)`.
    - `any_media`: a Python bool, so decode steps skip the blocks of an all-text batch without a device sync.
    """

    num_images: torch.Tensor
    fingerprints: torch.Tensor
    image_end: torch.Tensor
    text_rows: int
    any_media: bool

    @property
    def rows(self) -> int:
        return self.num_images.shape[0]

    @property
    def group(self) -> int:
        """Consecutive text rows per image row."""
        return self.text_rows // self.rows

    @classmethod
    def without_images(cls, text_rows: int, device) -> "ImageState":
        return cls(
            num_images=torch.zeros(text_rows, dtype=torch.long, device=device),
            fingerprints=torch.zeros(text_rows, 0, 2, dtype=torch.float64, device=device),
            image_end=torch.zeros(text_rows, dtype=torch.long, device=device),
            text_rows=text_rows,
            any_media=False,
        )

    def select(self, image_rows: torch.Tensor, text_rows: int) -> "ImageState":
        """The state of image rows `image_rows` `(new rows,)`, one per text row of a cache of `text_rows` rows."""
        return replace(
            self,
            num_images=self.num_images[image_rows],
            fingerprints=self.fingerprints[image_rows],
            image_end=self.image_end[image_rows],
            text_rows=text_rows,
        )

    def __repr__(self):
        return f"ImageState(rows={self.rows}, text_rows={self.text_rows}, num_images={self.num_images.tolist()})"


@dataclass(frozen=True)
class ImagePlan:
    """One forward call's image work, decided before anything runs (built by `plan_prompt` / `plan_decode`).

    The keys/values of a block are, along the key axis, `[each row's cached last image (if `reads_cache`)] + [this
    call's new images]`, `num_latents` keys each, for `rows` image rows.

    - `has_media` `(text rows,)`: the per-sample flag; None when no row has an image, so no block runs.
    - `encode` `(pixel rows, slots)` bool: the slots of `pixel_values` to encode (real and not cached), or None;
      `new_slots` is the most new images of one row.
    - `mask` `(text rows, 1, tokens, keys)`: True where a token may attend (its own image); None when every token
      attends the cached image alone (a decode step). `no_media` `(text rows, tokens)`: tokens before any image,
      whose attention output is zero.
    - `record_slot` `(rows,)`: the key slot of each row's last image, which every block records in the cache; None
      when the cache keeps its keys/values (no new image, or no cache).
    - `next_state`: the cache's `ImageState` after the call; None to keep the current one.
    """

    mode: CallMode
    rows: int
    num_latents: int
    has_media: torch.Tensor | None = None
    encode: torch.Tensor | None = None
    new_slots: int = 0
    mask: torch.Tensor | None = None
    no_media: torch.Tensor | None = None
    reads_cache: bool = False
    record_slot: torch.Tensor | None = None
    next_state: ImageState | None = None

    @property
    def runs_blocks(self) -> bool:
        return self.has_media is not None

    def place(self, encoded: torch.Tensor) -> torch.Tensor:
        """Resampled latents of the images in `encode` (row-major) `(n, num_latents, dim)` -> the call's latents
        `(rows, new_slots * num_latents, dim)`, each row's new images in order (zeros past a row's last)."""
        pixel_rows = self.encode.shape[0]
        latents = encoded.new_zeros(pixel_rows, self.new_slots, *encoded.shape[1:])
        rank = self.encode.cumsum(1) - 1
        latents[self.encode.nonzero(as_tuple=True)[0], rank[self.encode]] = encoded
        return expand_rows(latents, self.rows).flatten(1, 2)


# ------------------------------------------------------------------------------------------------- cache layer
# The layer kind transformers' `Cache` skips when it looks for an attention layer (the causal mask's sizes) and
# when offloading circles through the layers to prefetch. Releases without it (5.17, say) skip neither, so there
# this layer answers as the first decoder layer would (see `get_mask_sizes`, `prefetch`); coming after every
# decoder layer, it is never the first match of those searches anyway.
_LayerBase = getattr(cache_utils, "DummyLayer", cache_utils.CacheLayerMixin)


class ImageCacheLayer(_LayerBase):
    """The image state of a cache, appended after its decoder layers (`attach_image_layer`).

    Holds the `ImageState` of the cached tokens and `key_values[decoder layer index] = (key, value)`, each `(rows,
    heads, num_latents, head_dim)`: every block's keys/values of each row's last image (zeros for a row without
    images, whose flag is 0, so they are never used). The model writes them through `update`, as the decoder
    writes its tokens through `Cache.update`; the cache's own operations keep them right.
    """

    is_compileable = True  # a decode step reads fixed tensors (so a StaticCache stays compileable)
    is_croppable = True
    is_sliding = False
    supports_early_init = False  # nothing to allocate before the first call

    def __init__(self, decoder_layer):
        super().__init__()
        self.image_state: ImageState | None = None
        self.key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Set by a crop that removed an image: the token count it left (see `crop`).
        self.cropped_to: int | None = None
        # The cache's first decoder layer: how many tokens the cache holds (after a crop), and what this layer
        # answers for on releases without `DummyLayer`.
        self.decoder_layer = decoder_layer

    def __repr__(self):
        return f"ImageCacheLayer({self.image_state!r}, blocks={sorted(self.key_values)})"

    # ---------------------------------------------------------------------------------------- the model's side
    def check_continuable(self) -> None:
        """Refuses to continue a cache whose crop removed an image (Python state only: no device sync)."""
        if self.cropped_to is not None:
            raise ValueError(_cropped_past_an_image(self.cropped_to))

    def advance(self, plan: ImagePlan) -> None:
        """Takes the state the plan leaves (before the blocks run: they read and record keys/values only)."""
        if plan.mode is CallMode.PREFILL:
            self.key_values, self.cropped_to = {}, None
        if plan.next_state is not None:
            self.image_state = plan.next_state

    def update(self, key_states, value_states, block_idx: int, plan: ImagePlan):
        """Block `block_idx`'s keys/values for this call, `(plan.rows, heads, slots * num_latents, head_dim)`: each
        row's cached last image (when the plan reads the cache) then the call's new images (`key_states` /
        `value_states`, None when there are none); records each row's last image when the plan says so."""
        keys, values = [], []
        if plan.reads_cache:
            key, value = self.key_values[block_idx]
            if key_states is not None:  # on the block's device (a device map may place blocks apart)
                key, value = key.to(key_states.device), value.to(value_states.device)
            keys.append(expand_rows(key, plan.rows))
            values.append(expand_rows(value, plan.rows))
        if key_states is not None:
            keys.append(key_states)
            values.append(value_states)
        key, value = (keys[0], values[0]) if len(keys) == 1 else (torch.cat(keys, 2), torch.cat(values, 2))
        if plan.record_slot is not None:
            self.key_values[block_idx] = (_last_image(key, plan), _last_image(value, plan))
        return key, value

    # ------------------------------------------------------------------------------------ the cache's operations
    def crop(self, tokens_to_remove: int) -> None:
        """Keeps the state when the crop removes tokens after each row's last image (generated text: assisted and
        prompt-lookup decoding, a chat turn cut back to its shared prefix). A crop that removes an image raises: the
        cache keeps only each row's last image, and the per-sample flag computed the text before that image with
        the image present, so no continuation of the shorter prefix would be exact."""
        if self.image_state is None or tokens_to_remove == 0:
            return
        # `Cache.crop` crops its layers in order, so the decoder layers (before this one) are cropped already.
        length = int(self.decoder_layer.get_seq_length())
        if length == 0:
            self.reset()
            return
        if bool((self.image_state.image_end > length).any()):
            self.cropped_to = length
            raise ValueError(_cropped_past_an_image(length))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_text_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_text_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        # Text row t becomes rows t * repeats ... t * repeats + repeats - 1: each still reads image row t // group.
        if self.image_state is not None:
            self.image_state = replace(self.image_state, text_rows=self.image_state.text_rows * repeats)

    def reset(self) -> None:
        self.image_state, self.key_values, self.cropped_to = None, {}, None

    def offload(self) -> None:
        """Never offloaded: every decode step reads these keys/values, one image per row (not per token)."""

    def prefetch(self) -> None:
        # Reached only on releases without `DummyLayer`, where offloading's prefetch circle comes here after the
        # last decoder layer instead of going back to the first.
        self.decoder_layer.prefetch()

    def _select_text_rows(self, indices) -> None:
        """Text row i of the result is text row `indices[i]`. Reads the image rows through the old grouping, after
        which each text row has its own image row (beams moved across groups stay exact; the copies are one
        image's keys/values per row)."""
        state = self.image_state
        if state is None:
            return
        indices = torch.as_tensor(indices, device=state.num_images.device)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(1)
        image_rows = indices // state.group
        self.image_state = state.select(image_rows, text_rows=indices.shape[0])
        self.key_values = {
            block: (key[image_rows.to(key.device)], value[image_rows.to(value.device)])
            for block, (key, value) in self.key_values.items()
        }

    # ------------------------------------------------------------- what `Cache` may ask of any of its layers
    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def get_seq_length(self) -> int:
        return self.decoder_layer.get_seq_length()

    def get_mask_sizes(self, *args, **kwargs):
        return self.decoder_layer.get_mask_sizes(*args, **kwargs)

    def get_max_length(self) -> int:
        return -1


def _last_image(key: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
    """`(rows, heads, slots * num_latents, head_dim)` -> `(rows, heads, num_latents, head_dim)`: each row's key slot
    `plan.record_slot`."""
    rows = torch.arange(key.shape[0], device=key.device)
    return key.unflatten(2, (-1, plan.num_latents))[rows, :, plan.record_slot.to(key.device)]


def _cropped_past_an_image(length: int) -> str:
    return (
        f"The cache was cropped to {length} tokens, which removes an `<image>` of its prompt. An InfiMM cache keeps "
        "each sample's last image only and computed the text before it with the image present, so it can be cropped "
        "only to after every sample's last `<image>` token (e.g. back to the end of the prompt). Run the shorter "
        "prompt without this cache instead."
    )


def image_layer(cache) -> ImageCacheLayer | None:
    """The cache's image layer, or None (no cache, or one no InfiMM call has used). Found by what it holds rather
    than by class, so a cache made by the Hub copy of this module is read by the package's and vice versa."""
    layers = getattr(cache, "layers", None)
    if layers and hasattr(layers[-1], "image_state") and hasattr(layers[-1], "key_values"):
        return layers[-1]
    return None


def image_state(cache) -> ImageState | None:
    """The image state of the tokens a cache holds (None: it holds none, or no InfiMM call has used it)."""
    layer = image_layer(cache)
    return layer.image_state if layer is not None else None


def attach_image_layer(cache, decoder_layers: int) -> ImageCacheLayer:
    """The cache's image layer, appended after its `decoder_layers` decoder layers on first use."""
    layer = image_layer(cache)
    if layer is not None:
        return layer
    if not isinstance(cache, cache_utils.Cache):
        raise ValueError(
            f"InfiMM keeps the image state of its cache in the cache's layers, so the cache must be a transformers "
            f"`Cache`; got {type(cache).__name__}. Pass a `DynamicCache(config=model.config.text_config)` or a "
            "`StaticCache`, or let the model create one."
        )
    if cache.layer_class_to_replicate is not None:  # a cache that adds decoder layers as they are first written
        while len(cache.layers) < decoder_layers:
            cache.layers.append(cache.layer_class_to_replicate())
    if len(cache.layers) < decoder_layers:
        raise ValueError(
            f"The cache has {len(cache.layers)} layers but the language model has {decoder_layers} decoder layers. "
            "Build the cache for this model, e.g. `DynamicCache(config=model.config.text_config)`."
        )
    layer = ImageCacheLayer(cache.layers[0])
    cache.layers.append(layer)
    return layer


# ----------------------------------------------------------------------------------------------------- planning
def plan_decode(layer: ImageCacheLayer, text_rows: int, num_latents: int) -> ImagePlan:
    """A generate() step after its prefill: every token attends its row's cached last image. Python and tensor
    indexing only (no device sync), so a decode step traces as one graph."""
    layer.check_continuable()
    state = layer.image_state
    if not state.any_media:
        return ImagePlan(CallMode.DECODE, rows=state.rows, num_latents=num_latents)
    rows_per_image_row(text_rows, state.rows, "The cache's image state")
    return ImagePlan(
        CallMode.DECODE, rows=state.rows, num_latents=num_latents,
        has_media=expand_rows(state.num_images > 0, text_rows), reads_cache=True,
    )


def plan_prompt(
    mode: CallMode,
    is_media: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    layer: ImageCacheLayer | None,
    cache_length: int,
    num_latents: int,
) -> ImagePlan:
    """The plan of a call that feeds the caller's tokens: PREFILL (`cache_length` 0) or CONTINUE.

    `is_media` `(text rows, tokens)` marks the `<image>` tokens; `pixel_values` `(pixel rows, slots, 3, H, W)` are
    checked already (`modeling_infimm.as_image_batch`); `layer` is the cache's image layer (None without a cache).
    Continuing, `pixel_values` may repeat the prefix's images (checked, not encoded again) or hold only the new ones.
    """
    text_rows = is_media.shape[0]
    new_tokens = is_media.sum(1)
    prefix = None
    if mode is CallMode.CONTINUE and layer is not None:
        layer.check_continuable()
        prefix = layer.image_state
    cached_counts = _cached_counts(prefix, text_rows, is_media.device)
    encode, prints = _new_images(pixel_values, image_mask, new_tokens, cached_counts, prefix)
    if mode is CallMode.CONTINUE and encode is not None:
        _check_first_image_after_text(cached_counts, new_tokens, attention_mask, is_media.shape[1])

    reads_cache = prefix is not None and prefix.any_media
    if encode is None and not reads_cache:
        next_state = ImageState.without_images(text_rows, is_media.device) if layer is not None else None
        return ImagePlan(mode, rows=text_rows, num_latents=num_latents,
                         next_state=next_state if prefix is None else None)

    # Image rows of this call's keys: the cached rows, the new images' rows, or both when one expands the other (a
    # prefix cached once, continued by a batch of queries).
    rows = math.lcm(prefix.rows if reads_cache else 1, encode.shape[0] if encode is not None else 1)
    rows_per_image_row(text_rows, rows)
    new_counts = encode.sum(1) if encode is not None else None
    new_slots = int(new_counts.max()) if encode is not None else 0
    mask, no_media = token_slots(is_media, cached_counts, reads_cache, new_slots, num_latents)
    plan = ImagePlan(
        mode, rows=rows, num_latents=num_latents, has_media=(cached_counts + new_tokens) > 0, encode=encode,
        new_slots=new_slots, mask=mask, no_media=no_media, reads_cache=reads_cache,
    )
    if layer is None or encode is None:
        return plan  # no cache, or the cache's images stay what they are
    cached_per_row = cached_counts[:: text_rows // rows]
    new_per_row = expand_rows(new_counts.to(cached_per_row.device), rows)
    holding = prefix if reads_cache else None  # a prefix without images leaves nothing to carry over
    return replace(
        plan,
        record_slot=(new_per_row + int(reads_cache) - 1).clamp(min=0),
        next_state=ImageState(
            num_images=cached_per_row + new_per_row,
            fingerprints=_joined_fingerprints(holding, cached_per_row, prints, encode, rows),
            image_end=_image_end(holding, is_media, cache_length, rows),
            text_rows=text_rows,
            any_media=True,
        ),
    )


def _cached_counts(prefix: ImageState | None, text_rows: int, device) -> torch.Tensor:
    """`(text rows,)`: how many images each text row's cached tokens hold."""
    if prefix is None:
        return torch.zeros(text_rows, dtype=torch.long, device=device)
    rows_per_image_row(text_rows, prefix.rows, "The cache's image state")
    return expand_rows(prefix.num_images.to(device), text_rows)


def _new_images(pixel_values, image_mask, new_tokens, cached_counts, prefix):
    """`(encode, prints)`: which slots of `pixel_values` to encode `(pixel rows, slots)` (None when none), and the
    fingerprints of every real image, one `(its images, 2)` tensor per pixel row (None without `pixel_values`).

    A row's `<image>` tokens must match its real images: all of the prompt's (the prefix's first, checked against
    its fingerprints, then the new ones) or only the new ones.
    """
    if pixel_values is None:
        if bool(new_tokens.any()):
            raise ValueError(
                f"The input holds {int(new_tokens.sum())} `<image>` tokens but no `pixel_values` were given. Pass "
                "the images (the processor returns `pixel_values`), or remove the `<image>` tokens from the text."
            )
        return None, None
    text_rows, pixel_rows = new_tokens.shape[0], pixel_values.shape[0]
    group = rows_per_image_row(text_rows, pixel_rows)
    tokens = images_per_row(new_tokens, group)
    real, count = real_image_slots(pixel_values, image_mask)
    repeated = _repeated_image_counts(count, tokens, cached_counts[::group], prefix, pixel_values.shape[1])
    # One pass over every real image (a strided sample of each): the repeated ones are checked against the prefix's,
    # the new ones kept for the next call.
    prints = fingerprints(pixel_values)[real].split(count.tolist())
    if bool(repeated.any()):
        _check_repeated_images(prints, repeated, prefix, text_rows, group)
    encode = real & (real.cumsum(1) > repeated[:, None])
    return (encode if bool(encode.any()) else None), prints


def _repeated_image_counts(count, tokens, cached, prefix, slots) -> torch.Tensor:
    """`(pixel rows,)`: how many leading real images of each row repeat the prefix's (0: the row holds only new
    images), from each row's real images `count`, new `<image>` tokens `tokens` and images `cached` in the prefix.
    Refuses counts that fit neither all of the prompt's images nor only the new ones."""
    prefix_holds_images = prefix is not None and bool(cached.any())
    full = count == (cached + tokens if prefix_holds_images else tokens)
    only_new = count == tokens
    if not bool((full | only_new).all()):
        b = int((~(full | only_new)).nonzero()[0, 0])
        if not prefix_holds_images:
            raise ValueError(
                f"Sample {b} has {int(tokens[b])} `<image>` tokens but {int(count[b])} images (pixel_values has "
                f"{slots} image slots per sample). Put exactly one `<image>` token in the text for each image, or "
                "pass `image_mask` to mark which slots are padding."
            )
        raise ValueError(
            f"Sample {b} continues a cached prefix holding {int(cached[b])} images with {int(tokens[b])} new "
            f"`<image>` tokens, but pixel_values holds {int(count[b])} images for it. Pass all of the prompt's "
            f"images ({int(cached[b] + tokens[b])}) or only the new ones ({int(tokens[b])})."
        )
    return torch.where(full, cached, torch.zeros_like(cached))


def _check_repeated_images(prints, repeated, prefix, text_rows, group) -> None:
    """The images a continuation repeats must be the prefix's own (compared by fingerprint)."""
    for row in repeated.nonzero()[:, 0].tolist():
        n = int(repeated[row])
        state_row = row * group // (text_rows // prefix.rows)  # through the row's first text row
        stored = prefix.fingerprints[state_row, :n].to(prints[row].device)
        if not torch.allclose(prints[row][:n], stored, rtol=1e-3, atol=1e-3):
            raise ValueError(
                f"Sample {row}: the first {n} images of pixel_values differ from the images of the cached prefix. A "
                "cache continues only the prompt it was computed for: pass the same images, or run the whole prompt "
                "without the cache."
            )


def _check_first_image_after_text(cached_counts, new_tokens, attention_mask, new_length) -> None:
    """A sample's text before its first image is computed with the per-sample flag on (the release's `flag`): a
    cached prefix that held text but no image was computed with it off, so it cannot take a first image."""
    prefix_has_text = torch.ones_like(cached_counts, dtype=torch.bool)
    if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[1] > new_length:
        prefix_has_text = attention_mask[:, :-new_length].to(cached_counts.device).bool().any(1)
    late = (cached_counts == 0) & (new_tokens.to(cached_counts.device) > 0) & prefix_has_text
    if bool(late.any()):
        b = int(late.nonzero()[0, 0])
        raise ValueError(
            f"Sample {b}: the cached prefix holds text but no image, and the continuation adds its first image. "
            "InfiMM's per-sample flag makes the text before a sample's first image depend on whether the sample "
            "has an image at all, so this cache cannot be continued exactly: run the whole prompt without it."
        )


def _joined_fingerprints(prefix, cached_per_row, prints, encode, rows) -> torch.Tensor:
    """`(rows, images, 2)`: each row's cached images' fingerprints, then its new ones' (the last of its real
    images, those `encode` marks)."""
    pixel_rows = encode.shape[0]
    per_row = []
    for r in range(rows):
        row_prints = prints[r * pixel_rows // rows]
        new = row_prints[row_prints.shape[0] - int(encode[r * pixel_rows // rows].sum()):]
        cached = int(cached_per_row[r])
        old = prefix.fingerprints[r * prefix.rows // rows, :cached] if prefix is not None else new[:0]
        per_row.append(torch.cat([old.to(new.device), new]))
    out = torch.zeros(rows, max(t.shape[0] for t in per_row), 2, dtype=torch.float64, device=cached_per_row.device)
    for r, row_prints in enumerate(per_row):
        out[r, : row_prints.shape[0]] = row_prints
    return out


def _image_end(prefix, is_media, cache_length: int, rows: int) -> torch.Tensor:
    """`(rows,)`: one past the cache position of each row's last `<image>` token, from this call's tokens (which
    start at `cache_length`), else the prefix's; the latest of a row group's text rows."""
    positions = torch.arange(is_media.shape[1], device=is_media.device)
    last = torch.where(is_media, positions, -1).amax(1).view(rows, -1).amax(1)
    before = expand_rows(prefix.image_end.to(last.device), rows) if prefix is not None else torch.zeros_like(last)
    return torch.where(last >= 0, cache_length + last + 1, before)


# ------------------------------------------------------------------------------------------ rows and image slots
def rows_per_image_row(text_rows: int, image_rows: int, what: str = "`pixel_values`") -> int:
    """How many consecutive text rows share one image row (1, or the beam / sequence / expansion count)."""
    if image_rows == 0 or text_rows % image_rows:
        raise ValueError(
            f"{what} has {image_rows} rows but `input_ids` has {text_rows}; give one row of images per sample "
            "(generate() keeps one row per prompt and shares it across beams and returned sequences)."
        )
    return text_rows // image_rows


def images_per_row(counts: torch.Tensor, group: int) -> torch.Tensor:
    """Per-text-row counts `(text rows,)` -> per-image-row counts, checking that a row group agrees."""
    per_row = counts[::group]
    if group > 1 and (counts.view(-1, group) != per_row[:, None]).any():
        raise ValueError("Text rows sharing one row of `pixel_values` must hold the same number of images.")
    return per_row


def expand_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeats each row of `x` so that it has `rows` rows (x's rows must divide `rows`)."""
    return x if x.shape[0] == rows else x.repeat_interleave(rows // x.shape[0], dim=0)


def real_image_slots(pixel_values: torch.Tensor, image_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(real, count)`: which slots of `(rows, slots, ...)` pixel values may hold an image, and how many do.

    With `image_mask` it says so. Without, all-zero slots are batch padding, and `count` is one past the last
    non-zero slot (a zero slot before a real one still counts, so nothing real is ever dropped).
    """
    rows, slots = pixel_values.shape[:2]
    if image_mask is not None:
        if tuple(image_mask.shape) != (rows, slots):
            raise ValueError(
                f"`image_mask` must have shape (batch, images) = {(rows, slots)}; got {tuple(image_mask.shape)}."
            )
        real = image_mask.to(device=pixel_values.device, dtype=torch.bool)
        return real, real.sum(1)
    nonzero = pixel_values.flatten(2).ne(0).any(-1)
    positions = torch.arange(1, slots + 1, device=pixel_values.device)
    count = (nonzero * positions).amax(1)
    return positions[None] <= count[:, None], count


def token_slots(is_media, cached_counts, reads_cache: bool, new_slots: int, num_latents: int):
    """The mask selecting each token's image among `[cached last image] + new images`.

    `is_media` `(text rows, tokens)` marks the new `<image>` tokens; `cached_counts` `(text rows,)` counts the
    images already cached for each row. A token's image is its row's latest: the n-th new image if n new `<image>`
    tokens are at or before it, else the cached last image (if the row has one), else none.
    Returns `(mask, no_media)`: `mask` `(text rows, 1, tokens, slots * num_latents)` True where a token may attend,
    or None when every token attends the single cached slot; `no_media` `(text rows, tokens)` or None.
    Rows of tokens without an image are fully opened (an all-False row makes SDPA return NaN) and zeroed later.
    """
    new_index = is_media.cumsum(1)  # 0 = before this call's first image
    no_media = (new_index == 0) & (cached_counts == 0)[:, None]
    if new_slots == 0:
        # Every token attends the cached last image; rows without one have flag 0 and are never used.
        return None, None
    slot = new_index if reads_cache else new_index - 1
    slot_of_key = torch.arange(new_slots + int(reads_cache), device=is_media.device).repeat_interleave(num_latents)
    mask = (slot.unsqueeze(-1) == slot_of_key) | no_media.unsqueeze(-1)
    return mask.unsqueeze(1), no_media


# Pixels a fingerprint reads per image: enough spread-out samples that two different photographs never agree,
# few enough that checking a long cached prefix (32 shots x 16 queries) costs nothing next to the forward.
_FINGERPRINT_SAMPLES = 4096


def fingerprints(images: torch.Tensor) -> torch.Tensor:
    """`(..., 3, H, W)` -> `(..., 2)` float64: the mean and a position-weighted mean of an evenly strided sample of
    each image's pixels (the same positions for every image of one size). Strided before any copy, so a batch's
    `(rows, slots, 3, H, W)` costs `_FINGERPRINT_SAMPLES` values per slot."""
    flat = images.flatten(-3)
    flat = flat[..., :: max(1, flat.shape[-1] // _FINGERPRINT_SAMPLES)].double()
    ramp = torch.linspace(-1.0, 1.0, flat.shape[-1], device=flat.device, dtype=torch.float64)
    return torch.stack([flat.mean(-1), (flat * ramp).mean(-1)], dim=-1)


__all__ = ["CallMode", "ImageCacheLayer", "ImagePlan", "ImageState", "image_layer", "image_state"]
