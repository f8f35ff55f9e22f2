"""A cached prompt prefix continues exactly, through transformers' documented cache-reuse pattern.

The pattern: run the prefix once, `model(**prefix_inputs, cache=DynamicCache())`, then
`model.generate(**full_inputs, cache=copy.deepcopy(prefix_cache))` with the FULL prompt's `input_ids` and images.
The reference is always the full prompt run without any cache, so every test here compares the cached path with an
independent computation of the same prompt. The image state (how many images the prefix held, each block's keys and
values of the prefix's last image) must travel inside the cache object.
"""

import copy

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from helpers_modeling import tower_calls

from infimm import CACHE_ARGUMENT
from infimm.image_state_infimm import image_layer

IMAGE, EOC, BOS, PAD = 32001, 32000, 1, 2
CACHE = CACHE_ARGUMENT  # `cache` from transformers 5.24, `past_key_values` before
GREEDY = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True, output_scores=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, gates=1.0)


def _text(n, seed):
    return torch.randint(3, 31000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _images(n, seed):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _batch(rows):
    """Left-padded `input_ids`, `attention_mask`, `(batch, slots, 3, 28, 28)` pixels and `image_mask` for rows of
    (token list, image tensor)."""
    length = max(len(ids) for ids, _ in rows)
    slots = max(1, max(len(images) for _, images in rows))
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    pixels = torch.zeros(len(rows), slots, 3, 28, 28)
    image_mask = torch.zeros(len(rows), slots, dtype=torch.bool)
    for r, (tokens, images) in enumerate(rows):
        ids[r, length - len(tokens):] = torch.tensor(tokens)
        mask[r, length - len(tokens):] = 1
        pixels[r, : len(images)] = images
        image_mask[r, : len(images)] = True
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask)


def _extend(prefix, new_tokens, new_images):
    """The full prompt of rows that continue `prefix` (a `_batch`) with the same number of new tokens each."""
    ids = torch.cat([prefix["input_ids"], torch.tensor(new_tokens)], dim=1)
    mask = torch.cat([prefix["attention_mask"], torch.ones(ids.shape[0], ids.shape[1] - prefix["input_ids"].shape[1],
                                                           dtype=torch.long)], dim=1)
    per_row = []
    for r in range(ids.shape[0]):
        old = prefix["pixel_values"][r][prefix["image_mask"][r]]
        per_row.append(torch.cat([old, new_images[r]]))
    slots = max(1, max(len(images) for images in per_row))
    pixels = torch.zeros(ids.shape[0], slots, 3, 28, 28)
    image_mask = torch.zeros(ids.shape[0], slots, dtype=torch.bool)
    for r, images in enumerate(per_row):
        pixels[r, : len(images)] = images
        image_mask[r, : len(images)] = True
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask)


@torch.no_grad()
def _prefix_cache(model, prefix):
    """The prefix run once. With left padding it takes the positions generate() gives a prompt (as for any LM)."""
    cache = DynamicCache(config=model.config.text_config)
    positions = (prefix["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    model(**prefix, position_ids=positions, **{CACHE: cache})
    return cache


@torch.no_grad()
def _assert_continues_exactly(model, prefix, full, expected_encoded, **generate_kwargs):
    """generate() of the full prompt from the prefix's cache == without any cache: tokens and every step's scores."""
    cache = _prefix_cache(model, prefix)
    reference = model.generate(**full, **GREEDY, **generate_kwargs)
    with tower_calls(model) as calls:
        cached = model.generate(**full, **{CACHE: copy.deepcopy(cache)}, **GREEDY, **generate_kwargs)
    assert calls.rows == expected_encoded  # only the images the prefix does not hold
    assert torch.equal(cached.sequences, reference.sequences)
    for got, want in zip(cached.scores, reference.scores, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    return cache


def test_text_only_continuation_encodes_nothing_again(model):
    prefix = _batch([([BOS, *_text(4, 1), EOC, IMAGE, *_text(5, 2)], _images(1, 3))])
    full = _extend(prefix, [_text(4, 4)], [_images(0, 0)])
    _assert_continues_exactly(model, prefix, full, expected_encoded=0)


@pytest.mark.parametrize("new_images", [1, 3])
def test_continuation_with_new_images(model, new_images):
    prefix = _batch([([BOS, *_text(3, 5), EOC, IMAGE, *_text(4, 6)], _images(1, 7))])
    tokens = []
    for k in range(new_images):
        tokens += [*_text(2, 10 + k), EOC, IMAGE]
    tokens += _text(3, 20)
    full = _extend(prefix, [tokens], [_images(new_images, 8)])
    _assert_continues_exactly(model, prefix, full, expected_encoded=new_images)


def test_image_as_the_first_new_token(model):
    prefix = _batch([([BOS, IMAGE, *_text(5, 21), EOC], _images(1, 22))])
    full = _extend(prefix, [[IMAGE, *_text(4, 23)]], [_images(1, 24)])
    _assert_continues_exactly(model, prefix, full, expected_encoded=1)


def test_left_padded_batch_with_different_image_counts(model):
    prefix = _batch([
        ([BOS, *_text(2, 30), EOC, IMAGE, *_text(3, 31)], _images(1, 32)),
        ([BOS, EOC, IMAGE, *_text(4, 33), EOC, IMAGE, *_text(2, 34), EOC, IMAGE, *_text(1, 35)], _images(3, 36)),
    ])
    # Row 0 gains an image, row 1 only text (the same number of new tokens in both rows).
    full = _extend(prefix, [[*_text(2, 37), EOC, IMAGE, *_text(2, 38)], _text(6, 39)], [_images(1, 40), _images(0, 0)])
    _assert_continues_exactly(model, prefix, full, expected_encoded=1)


def test_beam_search_from_an_expanded_prefix_cache(model):
    """As for any language model, the prefix's cache is expanded to the beams first (`batch_repeat_interleave`)."""
    prefix = _batch([([BOS, *_text(3, 41), EOC, IMAGE, *_text(3, 42)], _images(1, 43))])
    full = _extend(prefix, [[*_text(2, 44), EOC, IMAGE, *_text(2, 45)]], [_images(1, 46)])
    cache = _prefix_cache(model, prefix)
    cache.batch_repeat_interleave(3)
    beam = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=4, return_dict_in_generate=True,
                output_scores=True)
    with torch.no_grad():
        reference = model.generate(**full, **beam)
        cached = model.generate(**full, **{CACHE: cache}, **beam)
    assert torch.equal(cached.sequences, reference.sequences)
    torch.testing.assert_close(cached.sequences_scores, reference.sequences_scores, rtol=0, atol=1e-5)


def test_few_shot_queries_share_one_cached_prefix(model):
    """The demonstrations run once (batch 1); each query of a batch continues them with its own image."""
    shots = [BOS, IMAGE, *_text(4, 50), EOC, IMAGE, *_text(3, 51), EOC]
    shot_images = _images(2, 52)
    prefix = _batch([(shots, shot_images)])
    queries = [[IMAGE, *_text(3, 60 + q)] for q in range(3)]
    full = _extend(
        _batch([(shots, shot_images)] * 3), queries, [_images(1, 70 + q) for q in range(3)]
    )
    cache = _prefix_cache(model, prefix)
    cache.batch_repeat_interleave(3)
    with torch.no_grad():
        reference = model.generate(**full, **GREEDY)
        with tower_calls(model) as calls:
            cached = model.generate(**full, **{CACHE: cache}, **GREEDY)
    assert calls.rows == 3
    assert torch.equal(cached.sequences, reference.sequences)
    for got, want in zip(cached.scores, reference.scores, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_forward_over_new_tokens_only_matches_the_full_prompt(model):
    """Without generate(): the continuation's tokens (and, here, only the new images) through forward."""
    prefix = _batch([([BOS, *_text(3, 80), EOC, IMAGE, *_text(3, 81)], _images(1, 82))])
    new = [*_text(2, 83), EOC, IMAGE, *_text(3, 84)]
    new_image = _images(1, 85)
    full = _extend(prefix, [new], [new_image])
    cache = _prefix_cache(model, prefix)
    got = model(input_ids=torch.tensor([new]), attention_mask=full["attention_mask"], pixel_values=new_image[None],
                **{CACHE: cache}).logits
    want = model(**full, use_cache=False).logits[:, -len(new):]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_continue_from_the_cache_a_generate_returned(model):
    """Like transformers' `test_generate_continue_from_past_key_values`, with and without passing the images again."""
    prompt = _batch([([BOS, *_text(3, 90), EOC, IMAGE, *_text(4, 91)], _images(1, 92))])
    one_long = model.generate(**prompt, **{**GREEDY, "max_new_tokens": 6, "min_new_tokens": 6})
    for with_images in (True, False):
        first = model.generate(**prompt, **{**GREEDY, "max_new_tokens": 3, "min_new_tokens": 3})
        mask = torch.ones_like(first.sequences)
        mask[:, : prompt["attention_mask"].shape[1]] = prompt["attention_mask"]
        inputs = dict(input_ids=first.sequences, attention_mask=mask)
        if with_images:
            inputs.update(pixel_values=prompt["pixel_values"], image_mask=prompt["image_mask"])
        second = model.generate(**inputs, **{CACHE: first[CACHE]}, **{**GREEDY, "max_new_tokens": 3,
                                                                      "min_new_tokens": 3})
        assert torch.equal(second.sequences, one_long.sequences), with_images
        for got, want in zip(first.scores + second.scores, one_long.scores, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_cache_of_other_images_is_refused(model):
    prefix = _batch([([BOS, *_text(3, 100), EOC, IMAGE, *_text(3, 101)], _images(1, 102))])
    full = _extend(prefix, [_text(3, 103)], [_images(0, 0)])
    cache = _prefix_cache(model, prefix)
    other = dict(full, pixel_values=_images(1, 104)[None])
    with pytest.raises(ValueError, match="differ from the images of the cached prefix"):
        model.generate(**other, **{CACHE: copy.deepcopy(cache)}, max_new_tokens=2)
    # Two images for a prefix of one and no new `<image>` token: neither all the prompt's images nor the new ones.
    two = dict(full, pixel_values=_images(2, 105)[None], image_mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"holding 1 images with 0 new `<image>` tokens, but pixel_values holds 2"):
        model.generate(**two, **{CACHE: copy.deepcopy(cache)}, max_new_tokens=2)


@torch.no_grad()
def test_a_text_only_prefix_cannot_take_a_first_image(model):
    """The per-sample flag makes text before a sample's first image depend on the sample having an image."""
    prefix = _batch([([BOS, *_text(5, 110)], _images(0, 0))])
    full = _extend(prefix, [[EOC, IMAGE, *_text(3, 111)]], [_images(1, 112)])
    cache = _prefix_cache(model, prefix)
    with pytest.raises(ValueError, match="cannot be continued exactly"):
        model.generate(**full, **{CACHE: cache}, max_new_tokens=2)


def test_the_image_state_travels_with_deepcopy(model):
    prefix = _batch([([BOS, EOC, IMAGE, *_text(3, 120)], _images(1, 121))])
    cache = _prefix_cache(model, prefix)
    copied = copy.deepcopy(cache)
    images, copied_images = image_layer(cache), image_layer(copied)
    assert copied_images is not images and copied_images.image_state.num_images.tolist() == [1]
    for layer, (key, value) in images.key_values.items():
        copied_key, copied_value = copied_images.key_values[layer]
        assert torch.equal(copied_key, key) and torch.equal(copied_value, value)
