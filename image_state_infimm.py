"""Which image each token sees, and the image state a cached prefix leaves for its continuation.

InfiMM's cross-attention is Flamingo's: a token attends only to the latents of the most recent `<image>` at or
before it. A prompt's prefix is therefore reusable: once it has run, a continuation needs the language model's
cache plus, per sample, how many images the prefix held and the keys/values of its LAST image in every block.
That image state (`InfiMMImageState`) lives on the language model's cache object itself (attribute
`infimm_images`), so `copy.deepcopy(cache)`, the cache a `generate(..., return_dict_in_generate=True)` returns and
`cache.batch_repeat_interleave(n)` (the state's rows broadcast over the text rows) all carry it.

Rows. "Text rows" are the rows of `input_ids`. Several consecutive text rows may share one "image row": the beams
and returned sequences of one prompt in `generate()`, or queries expanded from one cached prefix. Keys/values are
computed and stored per image row; the cross-attention folds the text rows of a row group into the query length
(exact, since they attend the same keys), so images are never copied per beam.

Everything here is pure bookkeeping on tensors; the tower and the blocks live in `modeling_infimm.py`.
"""

from dataclasses import dataclass

import torch


STATE_ATTR = "infimm_images"


class InfiMMImageState:
    """The images of a cached prefix, per image row.

    - `num_images` `(rows,)`: how many images the cached tokens of each row hold.
    - `fingerprints` `(rows, max_images, 2)`: two float64 statistics of each cached image's pixels, so that a
      continuation whose pixel_values repeat the prefix's images can be checked to repeat the SAME images.
    - `key_values[layer_idx] = (key, value)`, each `(rows, heads, latents, head_dim)`: every block's keys/values
      of each row's last image (zeros for a row without images; its per-sample flag is 0, so they are never used).
    - `any_media`: a Python bool, so decode steps can skip the blocks of an all-text batch without a device sync.
    """

    def __init__(self, num_images: torch.Tensor, fingerprints: torch.Tensor, any_media: bool | None = None):
        self.num_images = num_images
        self.fingerprints = fingerprints
        self.any_media = bool(num_images.any()) if any_media is None else any_media
        self.key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def rows(self) -> int:
        return self.num_images.shape[0]

    def __repr__(self):
        return (
            f"InfiMMImageState(rows={self.rows}, num_images={self.num_images.tolist()}, "
            f"blocks={sorted(self.key_values)})"
        )


def image_state(cache) -> InfiMMImageState | None:
    """The image state a cache carries (None for a cache without one, e.g. built by a bare language model)."""
    return getattr(cache, STATE_ATTR, None) if cache is not None else None


def set_image_state(cache, state: InfiMMImageState | None):
    setattr(cache, STATE_ATTR, state)


@dataclass
class ImageInputs:
    """What the cross-attention blocks need for one forward call (built once, shared by every block).

    Keys/values of a block are, along the key axis, `[the cached last image (if `cached`)] + [new images]`, each
    `num_latents` long, for `rows` image rows. `mask` `(text rows, 1, tokens, keys)` selects each token's own image
    (None when every token attends the one cached image, as in a decode step); `no_media` `(text rows, tokens)`
    marks tokens before any image, whose attention output is zero. When `store` is set, every block writes its
    keys/values of each row's image `last_slot` into it.
    """

    has_media: torch.Tensor
    rows: int
    num_latents: int = 0
    latents: torch.Tensor | None = None
    cached: InfiMMImageState | None = None
    mask: torch.Tensor | None = None
    no_media: torch.Tensor | None = None
    store: InfiMMImageState | None = None
    last_slot: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------ pixel values
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


def rows_per_image_row(text_rows: int, image_rows: int, what: str = "`pixel_values`") -> int:
    """How many consecutive text rows share one image row (1, or the beam / sequence / expansion count)."""
    if image_rows == 0 or text_rows % image_rows:
        raise ValueError(
            f"{what} has {image_rows} rows but `input_ids` has {text_rows}; give one row of images per sample "
            "(generate() keeps one row per prompt and shares it across beams and returned sequences)."
        )
    return text_rows // image_rows


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


# Pixels a fingerprint reads per image: enough spread-out samples that two different photographs never agree,
# few enough that checking a long cached prefix (32 shots x 16 queries) costs nothing next to the forward.
_FINGERPRINT_SAMPLES = 4096


def fingerprints(images: torch.Tensor) -> torch.Tensor:
    """`(n, 3, H, W)` -> `(n, 2)` float64: the mean and a position-weighted mean of an evenly strided sample of each
    image's pixels (the same positions for every image of one size)."""
    flat = images.flatten(1)
    flat = flat[:, :: max(1, flat.shape[1] // _FINGERPRINT_SAMPLES)].double()
    ramp = torch.linspace(-1.0, 1.0, flat.shape[1], device=flat.device, dtype=torch.float64)
    return torch.stack([flat.mean(1), (flat * ramp).mean(1)], dim=1)


def images_per_row(counts: torch.Tensor, group: int) -> torch.Tensor:
    """Per-text-row counts `(text rows,)` -> per-image-row counts, checking that a row group agrees."""
    per_row = counts[::group]
    if group > 1 and (counts.view(-1, group) != per_row[:, None]).any():
        raise ValueError("Text rows sharing one row of `pixel_values` must hold the same number of images.")
    return per_row


def expand_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeats each row of `x` so that it has `rows` rows (x's rows must divide `rows`)."""
    return x if x.shape[0] == rows else x.repeat_interleave(rows // x.shape[0], dim=0)


def token_slots(is_media: torch.Tensor, cached_images: torch.Tensor, cached_slot: bool, num_new: int, num_latents: int):
    """The mask selecting each token's image among `[cached last image] + new images`.

    `is_media` `(text rows, tokens)` marks the new `<image>` tokens; `cached_images` `(text rows,)` counts the
    images already cached for each row. A token's image is its row's latest: the n-th new image if n new `<image>`
    tokens are at or before it, else the cached last image (if the row has one), else none.
    Returns `(mask, no_media)`: `mask` `(text rows, 1, tokens, slots * num_latents)` True where a token may attend,
    or None when every token attends the single cached slot; `no_media` `(text rows, tokens)` or None.
    Rows of tokens without an image are fully opened (an all-False row makes SDPA return NaN) and zeroed later.
    """
    new_index = is_media.cumsum(1)  # 0 = before this call's first image
    no_media = (new_index == 0) & (cached_images == 0)[:, None]
    if num_new == 0:
        # Every token attends the cached last image; rows without one have flag 0 and are never used.
        return None, None
    slot = new_index if cached_slot else new_index - 1
    slots = num_new + int(cached_slot)
    slot_of_key = torch.arange(slots, device=is_media.device).repeat_interleave(num_latents)
    mask = (slot.unsqueeze(-1) == slot_of_key) | no_media.unsqueeze(-1)
    return mask.unsqueeze(1), no_media


def fold_rows(query: torch.Tensor, mask: torch.Tensor | None, rows: int):
    """`(text rows, heads, T, d)` queries -> `(rows, heads, group * T, d)`, the text rows of a group side by side.

    Rows of a group attend the same keys, so folding them into the query axis is exact and spares copying the
    keys/values per beam. The mask is folded the same way.
    """
    text_rows, heads, length, dim = query.shape
    group = text_rows // rows
    if group == 1:
        return query, mask
    query = query.view(rows, group, heads, length, dim).transpose(1, 2).reshape(rows, heads, group * length, dim)
    if mask is not None:
        mask = mask.view(rows, group, 1, length, mask.shape[-1]).transpose(1, 2).reshape(rows, 1, group * length, -1)
    return query, mask


def unfold_rows(out: torch.Tensor, text_rows: int) -> torch.Tensor:
    """Inverse of `fold_rows` for the attention output `(rows, group * T, heads, d)` -> `(text rows, T, heads, d)`."""
    rows, folded, heads, dim = out.shape
    group = text_rows // rows
    if group == 1:
        return out
    return out.view(rows, group, folded // group, heads, dim).reshape(text_rows, folded // group, heads, dim)


__all__ = ["InfiMMImageState", "image_state", "set_image_state"]
