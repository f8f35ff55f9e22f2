"""Every operation `generate()` and users apply to a cache keeps its image state right.

The image state (how many images each sample's cached tokens hold, every block's keys/values of its last image)
lives in a layer of the language model's cache, after the decoder's (`image_state_infimm.ImageCacheLayer`), so that
`crop`, `reorder_cache`, `batch_select_indices`, `batch_repeat_interleave`, `reset` and offloading reach it. Each
test applies one operation to a cache holding images (rows with different image counts, left padding) and compares
what follows with the whole prompt run without any cache: logits to 1e-5, or generate()'s tokens and scores
against `generate(..., use_cache=False)`.
"""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from conftest import tiny_model
from helpers_modeling import one_torch_thread  # noqa: F401  (autouse fixture)

from infimm.image_state_infimm import ImageCacheLayer, image_layer, image_state

# The same tiny model, prompts and greedy settings as the prefix-reuse tests.
from test_prefix_reuse import BOS, CACHE, EOC, GREEDY, IMAGE, PAD, _images, _text, model  # noqa: E402,F401


# Two samples with different image counts; the first is left-padded in a batch.
ONE_IMAGE = ([BOS, *_text(3, 1), EOC, IMAGE, *_text(4, 2)], _images(1, 3))
THREE_IMAGES = (
    [BOS, EOC, IMAGE, *_text(2, 4), EOC, IMAGE, *_text(2, 5), EOC, IMAGE, *_text(2, 6)], _images(3, 7)
)


def _batch(rows):
    """Left-padded `input_ids`, `attention_mask`, `(batch, slots, 3, 28, 28)` pixels and `image_mask` for rows of
    (token list, image tensor)."""
    length = max(len(ids) for ids, _ in rows)
    slots = max(1, max(len(images) for _, images in rows))
    batch = dict(
        input_ids=torch.full((len(rows), length), PAD),
        attention_mask=torch.zeros(len(rows), length, dtype=torch.long),
        pixel_values=torch.zeros(len(rows), slots, 3, 28, 28),
        image_mask=torch.zeros(len(rows), slots, dtype=torch.bool),
    )
    for r, (tokens, images) in enumerate(rows):
        batch["input_ids"][r, length - len(tokens):] = torch.tensor(tokens)
        batch["attention_mask"][r, length - len(tokens):] = 1
        batch["pixel_values"][r, : len(images)] = images
        batch["image_mask"][r, : len(images)] = True
    return batch


def _take(batch, rows):
    """The batch's rows `rows` (a row may repeat), padding kept: what a cache holds after selecting them."""
    return {key: value[list(rows)] for key, value in batch.items()}


def _extend(batch, new_tokens, new_images):
    """The full prompts of `batch`'s rows continued by `new_tokens[r]` (the same length in every row) and the
    images of their new `<image>` tokens, `new_images[r]` `(n, 3, 28, 28)`."""
    ids = torch.cat([batch["input_ids"], torch.tensor(new_tokens)], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(ids[:, batch["input_ids"].shape[1]:])], dim=1)
    per_row = [torch.cat([batch["pixel_values"][r][batch["image_mask"][r]], new_images[r]]) for r in range(len(ids))]
    slots = max(1, max(len(images) for images in per_row))
    pixels = torch.zeros(len(ids), slots, 3, 28, 28)
    image_mask = torch.zeros(len(ids), slots, dtype=torch.bool)
    for r, images in enumerate(per_row):
        pixels[r, : len(images)] = images
        image_mask[r, : len(images)] = True
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask)


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------------ forward calls
@torch.no_grad()
def _prefill(model, batch, cache=None):
    """The prompt run once into `cache` (a DynamicCache by default), with the positions generate() gives it."""
    cache = DynamicCache(config=model.config.text_config) if cache is None else cache
    model(**batch, position_ids=_positions(batch["attention_mask"]), **{CACHE: cache})
    return cache


@torch.no_grad()
def _continued(model, cache, full, new):
    """Logits of the last `new` tokens of `full` fed after `cache`, with all of the prompt's images again."""
    mask = full["attention_mask"]
    return model(
        input_ids=full["input_ids"][:, -new:], attention_mask=mask, position_ids=_positions(mask)[:, -new:],
        pixel_values=full["pixel_values"], image_mask=full["image_mask"], **{CACHE: cache},
    ).logits


@torch.no_grad()
def _uncached(model, full, new):
    """The same logits from the whole prompt, no cache at all."""
    return model(**full, position_ids=_positions(full["attention_mask"]), use_cache=False).logits[:, -new:]


def _assert_generates_the_uncached_answer(model, inputs, search=None, **cache_kwargs):
    """generate() with `cache_kwargs` (a cache, an assistant, ...) gives the tokens and scores of the same search
    (`search`: beam settings, greedy by default) run with `use_cache=False`, which feeds the whole sequence at each
    step."""
    search = {**GREEDY, **(search or {})}
    with torch.no_grad():
        got = model.generate(**inputs, **search, **cache_kwargs)
        want = model.generate(**inputs, **search, use_cache=False)
    assert torch.equal(got.sequences, want.sequences)
    for got_scores, want_scores in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(got_scores, want_scores, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- crop
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_crop_back_to_the_prompt_then_continue_differently(model, kind):
    """Generated text is cropped away (as assisted decoding and a chat turn do), then other text follows."""
    prompt = _batch([ONE_IMAGE, THREE_IMAGES])
    cache = None if kind == "dynamic" else StaticCache(config=model.config.text_config, max_cache_len=48)
    cache = _prefill(model, prompt, cache)
    if not all(hasattr(layer, "crop") for layer in cache.layers):
        pytest.skip("this transformers release cannot crop a static sliding-window cache")
    first = _extend(prompt, [_text(3, 10), _text(3, 11)], [_images(0, 0)] * 2)
    _continued(model, cache, first, 3)
    cache.crop(-3)
    assert image_state(cache).num_images.tolist() == [1, 3]
    second = _extend(
        prompt, [[*_text(1, 12), EOC, IMAGE, *_text(1, 13)], _text(4, 14)], [_images(1, 15), _images(0, 0)]
    )
    torch.testing.assert_close(_continued(model, cache, second, 4), _uncached(model, second, 4), rtol=0, atol=1e-5)


def test_crop_that_removes_an_image_is_refused(model):
    """The cache keeps each sample's last image only, and the text before it was computed with it present: no
    continuation of a prefix cut before an image would be exact, so the crop says so (and so does a later call)."""
    prompt = _batch([ONE_IMAGE, THREE_IMAGES])
    cache = _prefill(model, prompt)
    with pytest.raises(ValueError, match=r"removes an `<image>`"):
        cache.crop(-3)  # the second sample's last `<image>` is 3 tokens from the end
    shorter = _take(prompt, [0, 1])
    shorter.update(input_ids=shorter["input_ids"][:, :-3], attention_mask=shorter["attention_mask"][:, :-3])
    with pytest.raises(ValueError, match=r"removes an `<image>`"):
        _continued(model, cache, _extend(shorter, [_text(2, 16)] * 2, [_images(0, 0)] * 2), 2)


def test_crop_to_nothing_leaves_an_empty_cache(model):
    prompt = _batch([ONE_IMAGE, THREE_IMAGES])
    cache = _prefill(model, prompt)
    cache.crop(-prompt["input_ids"].shape[1])
    other = _batch([THREE_IMAGES, (_text(5, 17), _images(0, 0))])
    with torch.no_grad():
        got = model(**other, position_ids=_positions(other["attention_mask"]), **{CACHE: cache}).logits
    torch.testing.assert_close(got, _uncached(model, other, other["input_ids"].shape[1]), rtol=0, atol=1e-5)
    assert image_state(cache).num_images.tolist() == [3, 0]


@pytest.fixture
def crops(monkeypatch):
    """The token counts the image layers of all caches are cropped by."""
    seen, crop = [], ImageCacheLayer.crop

    def recording(self, tokens_to_remove):
        seen.append(tokens_to_remove)
        return crop(self, tokens_to_remove)

    monkeypatch.setattr(ImageCacheLayer, "crop", recording)
    return seen


def test_assisted_decoding_crops_rejected_drafts(model, crops):
    """A different InfiMM drafts 3 tokens a step; the rejected ones are cropped from both models' caches."""
    inputs = _take(_batch([THREE_IMAGES]), [0])
    draft = tiny_model(seed=6, gates=1.0)
    draft.generation_config.num_assistant_tokens = 3
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    _assert_generates_the_uncached_answer(model, inputs, assistant_model=draft)
    assert any(count < 0 for count in crops)


def test_prompt_lookup_decoding_crops_rejected_drafts(model, crops):
    """The prompt ends with a bigram it holds earlier, so the lookup drafts the tokens that followed it there."""
    repeated = _text(4, 18)
    tokens = [BOS, EOC, IMAGE, *repeated, EOC, IMAGE, *_text(2, 19), *repeated[:2]]
    inputs = _batch([(tokens, _images(2, 20))])
    _assert_generates_the_uncached_answer(model, inputs, prompt_lookup_num_tokens=3)
    assert any(count < 0 for count in crops)


# --------------------------------------------------------------------------------------------- reorder, select
def test_beam_search_with_different_image_counts(model):
    """`reorder_cache` at every beam step; the beams of one prompt share its images."""
    _assert_generates_the_uncached_answer(
        model, _batch([ONE_IMAGE, THREE_IMAGES]), search=dict(num_beams=3, num_return_sequences=2)
    )


def test_reorder_cache_across_samples(model):
    """Rows moved to other rows take their images along (beam search only moves rows within a prompt's beams)."""
    prompt = _batch([ONE_IMAGE, THREE_IMAGES])
    cache = _prefill(model, prompt)
    cache.reorder_cache(torch.tensor([1, 0]))
    full = _extend(_take(prompt, [1, 0]), [_text(3, 21), [EOC, IMAGE, *_text(1, 22)]], [_images(0, 0), _images(1, 23)])
    torch.testing.assert_close(_continued(model, cache, full, 3), _uncached(model, full, 3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [[0], [1], [1, 0, 1]])
def test_batch_select_indices(model, rows):
    prompt = _batch([ONE_IMAGE, THREE_IMAGES])
    cache = _prefill(model, prompt)
    cache.batch_select_indices(torch.tensor(rows))
    full = _extend(_take(prompt, rows), [_text(3, 24 + i) for i in range(len(rows))], [_images(0, 0)] * len(rows))
    torch.testing.assert_close(_continued(model, cache, full, 3), _uncached(model, full, 3), rtol=0, atol=1e-5)
    assert image_state(cache).num_images.tolist() == [[1, 3][r] for r in rows]


# ---------------------------------------------------------------------------------------------------- expansion
def test_batch_repeat_interleave_then_new_images_per_row(model):
    """Each prompt expanded to two rows; every row continues its own way, one of them with a new image."""
    prompt = _batch([ONE_IMAGE, THREE_IMAGES])
    cache = _prefill(model, prompt)
    cache.batch_repeat_interleave(2)
    new = [[EOC, IMAGE, *_text(2, 30)], _text(4, 31), _text(4, 32), [*_text(2, 33), EOC, IMAGE]]
    images = [_images(1, 34), _images(0, 0), _images(0, 0), _images(1, 35)]
    full = _extend(_take(prompt, [0, 0, 1, 1]), new, images)
    torch.testing.assert_close(_continued(model, cache, full, 4), _uncached(model, full, 4), rtol=0, atol=1e-5)


def test_batch_repeat_interleave_then_reorder_across_prompts(model):
    """Rows that shared one image row (an expanded prompt) moved across prompts keep reading their own images."""
    prompt = _batch([ONE_IMAGE, THREE_IMAGES])
    cache = _prefill(model, prompt)
    cache.batch_repeat_interleave(2)
    cache.reorder_cache(torch.tensor([2, 0, 3, 1]))
    full = _extend(_take(prompt, [1, 0, 1, 0]), [_text(3, 40 + r) for r in range(4)], [_images(0, 0)] * 4)
    torch.testing.assert_close(_continued(model, cache, full, 3), _uncached(model, full, 3), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------- reset, kinds
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_reset_then_another_prompt(model, kind):
    """A reset cache serves a new prompt (other images, other counts) as a new cache would, through generate()."""
    cache = (DynamicCache(config=model.config.text_config) if kind == "dynamic"
             else StaticCache(config=model.config.text_config, max_cache_len=48))
    _prefill(model, _batch([ONE_IMAGE, THREE_IMAGES]), cache)
    cache.reset()
    kept = [layer.keys for layer in cache.layers if getattr(layer, "keys", None) is not None]
    if kind == "dynamic" and any(keys.numel() for keys in kept):
        pytest.skip("this transformers release zeroes a dynamic cache's keys on reset instead of dropping them")
    other = _batch([(THREE_IMAGES[0], _images(3, 50)), ([BOS, EOC, IMAGE, *_text(4, 51)], _images(1, 52))])
    _assert_generates_the_uncached_answer(model, other, **{CACHE: cache})
    cache.reset()
    assert image_state(cache) is None


def test_static_cache_continues_a_prefix(model):
    prompt = _batch([ONE_IMAGE, THREE_IMAGES])
    cache = _prefill(model, prompt, StaticCache(config=model.config.text_config, max_cache_len=48))
    full = _extend(prompt, [[EOC, IMAGE, *_text(2, 60)], _text(4, 61)], [_images(1, 62), _images(0, 0)])
    _assert_generates_the_uncached_answer(model, full, **{CACHE: cache})


def test_a_lazily_built_cache_gets_its_image_layer_after_the_decoder_layers(model):
    """`DynamicCache()` adds decoder layers as they are first written: the image layer must come after them all."""
    cache = _prefill(model, _batch([ONE_IMAGE]), DynamicCache())
    layers = model.config.text_config.num_hidden_layers
    assert len(cache.layers) == layers + 1 and image_layer(cache) is cache.layers[layers]
    assert cache.get_seq_length() == len(ONE_IMAGE[0])


class _HostStream:
    """Stands in for a CUDA stream where there is none: offloading's copies to and from the CPU are then no-ops,
    but `generate()` runs the offloading cache's own code (prefetch circle, offload after each update)."""

    def wait_stream(self, other):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_offloaded_cache_through_its_own_code_on_the_host(model, monkeypatch):
    monkeypatch.setattr(torch, "Stream", _HostStream)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: _HostStream())
    _assert_generates_the_uncached_answer(model, _batch([ONE_IMAGE, THREE_IMAGES]), cache_implementation="offloaded")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves the cache between a GPU and the CPU")
def test_offloaded_cache_on_a_gpu():
    net = tiny_model(seed=3, gates=1.0).to("cuda")
    inputs = {key: value.to("cuda") for key, value in _batch([ONE_IMAGE, THREE_IMAGES]).items()}
    with torch.no_grad():
        got = net.generate(**inputs, **GREEDY, cache_implementation="offloaded")
        want = net.generate(**inputs, **GREEDY, use_cache=False)
    assert torch.equal(got.sequences, want.sequences)
    for got_scores, want_scores in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(got_scores, want_scores, rtol=1e-4, atol=1e-4)
