"""Image keys/values are computed once per generate() call and reused; padding images are never encoded."""

import copy
import threading

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import TextIteratorStreamer

from conftest import TOKENIZER_DIR, tiny_model
from helpers_modeling import ForwardCalls, tower_calls
from infimm.image_state_infimm import image_layer
from infimm.modeling_infimm import _DECODING_KWARG

IMAGE, EOC = 32001, 32000


# The language model's cache is `cache` from transformers 5.24 on and `past_key_values` before (argument and field);
# read off the release number, independently of how the model decides.
CACHE_NAME = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


def _prompt_batch():
    """Two left-padded prompts: one image, then three images (the first sample's image slots are padded)."""
    pad = 2
    ids = torch.tensor(
        [
            [pad, pad, pad, pad, pad, pad, 1, EOC, IMAGE, 11, 12, 13],
            [1, EOC, IMAGE, 5, EOC, IMAGE, 6, 7, EOC, IMAGE, 8, 9],
        ]
    )
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[6], [0]])).long()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 3, 28, 28)
    pixels[0, 1:] = 0
    image_mask = torch.tensor([[True, False, False], [True, True, True]])
    return ids, mask, pixels, image_mask


@torch.no_grad()
def test_cached_image_key_values_equal_recomputed():
    model = tiny_model()
    ids, mask, pixels, image_mask = _prompt_batch()
    prefill = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                    pixel_values=pixels, image_mask=image_mask, use_cache=True)
    # The image state lives in the language model's cache: each block's keys/values of each sample's last image.
    images = image_layer(prefill[CACHE_NAME])
    assert sorted(images.key_values) == model.config.cross_attention_layers
    assert images.image_state.num_images.tolist() == [1, 3]
    next_ids = prefill.logits[:, -1].argmax(-1, keepdim=True)
    step_mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
    positions = step_mask.sum(1, keepdim=True) - 1

    cached = model(
        input_ids=next_ids, attention_mask=step_mask, position_ids=positions,
        **{CACHE_NAME: copy.deepcopy(prefill[CACHE_NAME])},
    )
    recomputed = model(
        input_ids=next_ids, attention_mask=step_mask, position_ids=positions,
        cache=copy.deepcopy(prefill[CACHE_NAME]), pixel_values=pixels, image_mask=image_mask,
    )
    # Independent of both: the whole sequence again, no cache at all (left padding -> explicit positions).
    full_ids = torch.cat([ids, next_ids], dim=1)
    full_positions = (step_mask.cumsum(1) - 1).clamp(min=0)
    full = model(input_ids=full_ids, attention_mask=step_mask, position_ids=full_positions,
                 pixel_values=pixels, image_mask=image_mask, use_cache=False)
    torch.testing.assert_close(cached.logits[:, -1], recomputed.logits[:, -1], rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)


def test_decode_steps_never_project_image_keys_values():
    model = tiny_model()
    ids, mask, pixels, image_mask = _prompt_batch()
    blocks = list(model.model.cross_attention_layers.values())
    counter = ForwardCalls([block.attn.to_kv for block in blocks])
    new_tokens = 6
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    counter.remove()
    assert out.shape[1] == ids.shape[1] + new_tokens
    assert counter.calls == len(blocks)  # prefill only, once per block


@pytest.mark.parametrize("num_beams", [1, 3])
def test_padding_images_never_reach_the_vision_tower(num_beams):
    model = tiny_model()
    ids, mask, pixels, image_mask = _prompt_batch()
    counter = tower_calls(model)
    model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask,
                   max_new_tokens=3, do_sample=False, num_beams=num_beams)
    counter.remove()
    assert counter.calls == 1
    assert counter.rows == int(image_mask.sum())  # 4 real images, however many beams


def test_padding_images_skipped_without_image_mask():
    """Without `image_mask`, the `<image>` token count of each sample says which slots are real."""
    model = tiny_model()
    ids, mask, pixels, _ = _prompt_batch()
    counter = tower_calls(model)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    counter.remove()
    assert counter.rows == 4


def test_beam_search_matches_expanded_images():
    """Sharing one encoding across beams gives the same beams as feeding every beam its own copy of the pixels."""
    model = tiny_model()
    ids, mask, pixels, image_mask = _prompt_batch()
    shared = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask,
                            max_new_tokens=4, do_sample=False, num_beams=2)
    for row in range(ids.shape[0]):
        keep = mask[row].bool()
        alone = model.generate(input_ids=ids[row : row + 1, keep], pixel_values=pixels[row : row + 1],
                               image_mask=image_mask[row : row + 1], max_new_tokens=4, do_sample=False, num_beams=2)
        assert shared[row, -4:].tolist() == alone[0, -4:].tolist()


def test_static_cache_and_streamer_give_default_tokens():
    from transformers import AutoTokenizer

    model = tiny_model()
    ids, mask, pixels, image_mask = _prompt_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask,
                  max_new_tokens=6, min_new_tokens=6, do_sample=False)
    default = model.generate(**kwargs)
    static = model.generate(**kwargs, cache_implementation="static")
    assert static.tolist() == default.tolist()

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    single = {k: (v[1:] if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    thread = threading.Thread(target=model.generate, kwargs={**single, "streamer": streamer})
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == tokenizer.decode(default[1, ids.shape[1]:])


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_compiled_forward_generates_the_eager_tokens(cache_implementation):
    """`model.forward = torch.compile(model.forward)` then `generate()`: same tokens as eager. Dynamo's tracing,
    guards and graph breaks are what this checks; the `eager` backend skips code generation to keep it fast."""
    import torch._dynamo

    model = tiny_model()
    ids, mask, pixels, image_mask = _prompt_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask,
                  max_new_tokens=5, min_new_tokens=5, do_sample=False, cache_implementation=cache_implementation)
    eager = model.generate(**kwargs)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager")
    try:
        compiled = model.generate(**kwargs)
    finally:
        del model.forward
        torch._dynamo.reset()
    assert compiled.tolist() == eager.tolist()


@torch.no_grad()
def test_decode_step_traces_as_one_graph():
    """A decode step (image keys/values from the cache) has no graph break, so a compiled decode runs as one graph;
    the prefill's image bookkeeping (which slots are real images) is where breaks are allowed."""
    import torch._dynamo

    model = tiny_model()
    ids, mask, pixels, image_mask = _prompt_batch()
    prefill = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask, use_cache=True)
    next_ids = prefill.logits[:, -1].argmax(-1, keepdim=True)
    step_mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.forward)(
        input_ids=next_ids, attention_mask=step_mask, position_ids=step_mask.sum(1, keepdim=True) - 1,
        **{CACHE_NAME: prefill[CACHE_NAME]}, use_cache=True, **{_DECODING_KWARG: True},
    )
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@torch.no_grad()
def test_cache_is_taken_under_either_name_and_returned_under_the_installed_one():
    """generate() of transformers < 5.24 passes `past_key_values`, later ones `cache`: both mean the same."""
    model = tiny_model()
    ids, mask, pixels, image_mask = _prompt_batch()
    prefill = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask, use_cache=True)
    assert CACHE_NAME in prefill and prefill[CACHE_NAME].get_seq_length() == ids.shape[1]
    assert prefill.to_tuple()[1] is prefill[CACHE_NAME]  # (logits, cache, ...) as the library's outputs order them
    next_ids = prefill.logits[:, -1].argmax(-1, keepdim=True)
    step = dict(input_ids=next_ids, attention_mask=torch.cat([mask, torch.ones_like(next_ids)], dim=1))
    by_name = {
        name: model(**step, **{name: copy.deepcopy(prefill[CACHE_NAME])}).logits for name in ("cache", "past_key_values")
    }
    uncached = model(input_ids=torch.cat([ids, next_ids], dim=1), attention_mask=step["attention_mask"],
                     pixel_values=pixels, image_mask=image_mask, use_cache=False).logits[:, -1:]
    torch.testing.assert_close(by_name["cache"], by_name["past_key_values"], rtol=0, atol=0)
    torch.testing.assert_close(by_name["cache"], uncached, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="past_key_values"):
        model(**step, cache=prefill[CACHE_NAME], past_key_values=prefill[CACHE_NAME])


def test_generate_uses_the_installed_cache_name_without_deprecation_warnings(caplog):
    model = tiny_model()
    ids, mask, pixels, image_mask = _prompt_batch()
    library_logger = transformers.logging.get_logger("transformers")
    transformers.logging.get_logger().warning_once.cache_clear()  # shown once per process otherwise
    library_logger.propagate = True
    try:
        with caplog.at_level("WARNING", logger="transformers"):
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask,
                           max_new_tokens=3, do_sample=False)
    finally:
        library_logger.propagate = False
    assert not [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


def test_continuous_batching_text_only_equals_generate():
    """`generate_batch` / `init_continuous_batching` pack requests into one row over a paged cache: text-only prompts
    give `generate`'s tokens; a prompt with an `<image>` is refused by name."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = tiny_model()
    ids = [[1, 415, 2936, 9060], [1, 330, 1215, 4630, 684, 1416, 264], [1, 4315]]
    with torch.no_grad():
        expected = [model.generate(torch.tensor([row]), max_new_tokens=6, do_sample=False, eos_token_id=2)[0, len(row):]
                    .tolist() for row in ids]
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=2)
    small = ContinuousBatchingConfig(block_size=32, num_blocks=64, max_batch_tokens=256)  # CPU default: 60% of RAM
    out = model.generate_batch(ids, generation_config=config, continuous_batching_config=small)
    assert [out[f"req_{i}"].generated_tokens for i in range(len(ids))] == expected

    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=small)
    manager.start()
    try:
        failed = manager.add_request([1, 32001, 330, 8428], max_new_tokens=2)  # an <image> token
        result = manager.get_result(request_id=failed, timeout=60)
        assert result is not None and "text-only" in str(result.error)
    finally:
        manager.stop(block=True, timeout=60)
