"""InfiMM behaves as transformers' own VLMs do where the library's common tests look.

Each test checks a convention the way `ModelTesterMixin` / `GenerationTesterMixin` check it, with the gates open so
that the image path matters: `inputs_embeds` equals `input_ids`, assisted and prompt-lookup decoding equal greedy,
`get_image_features` returns the library's output type, eager equals SDPA for the connector too, and bad
`pixel_values` are refused at the door with the fix in the message.
"""

import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conftest import tiny_model
from helpers_modeling import eva_hidden_states, eva_last_block_tokens, perturb_norms, reference_eva, standalone_lm
from helpers_modeling import one_torch_thread  # noqa: F401  (autouse fixture)

from infimm import InfiMMForConditionalGeneration

MEDIA, EOC, PAD, BOS = 32001, 32000, 2, 1
IMG = 28
CACHE = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"
GREEDY = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6)


@pytest.fixture(scope="module")
def net():
    model = perturb_norms(tiny_model(seed=5, gates=1.0, text_config={"initializer_range": 0.05}))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def _inputs(seed=0):
    """Two left-padded samples with two and one images (the second's second slot is padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 31000, (2, 12), generator=g)
    ids[0, [1, 6]] = MEDIA
    ids[1, 5] = MEDIA
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = PAD, 0
    pixels = torch.randn(2, 2, 3, IMG, IMG, generator=g)
    pixels[1, 1] = 0
    image_mask = torch.tensor([[True, True], [True, False]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=image_mask)


# ------------------------------------------------------------------------------------------------ inputs_embeds
@torch.no_grad()
def test_inputs_embeds_match_input_ids(net):
    """The image positions are found from the `<image>` embedding when only embeddings are given."""
    inputs = _inputs(1)
    ids = inputs.pop("input_ids")
    embeds = net.get_input_embeddings()(ids)
    by_ids = net(input_ids=ids, **inputs, use_cache=False).logits
    by_embeds = net(inputs_embeds=embeds, **inputs, use_cache=False).logits
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=1e-6)
    # And the images matter here: shutting the gates moves the logits.
    with_gates_shut = tiny_model(seed=5, gates=0.0)
    with_gates_shut.load_state_dict({k: v for k, v in net.state_dict().items() if "gate" not in k}, strict=False)
    assert (with_gates_shut(inputs_embeds=embeds, **inputs, use_cache=False).logits - by_ids).abs().max() > 1e-2


@torch.no_grad()
def test_generate_from_inputs_embeds_equals_generate_from_input_ids(net):
    inputs = _inputs(2)
    ids = inputs.pop("input_ids")
    from_ids = net.generate(input_ids=ids, **inputs, **GREEDY)
    from_embeds = net.generate(inputs_embeds=net.get_input_embeddings()(ids), **inputs, **GREEDY)
    # From embeddings, generate() returns the new tokens only.
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])


# ------------------------------------------------------------------------------------------- assisted decoding
@torch.no_grad()
def test_assisted_decoding_with_an_infimm_assistant_equals_greedy(net):
    inputs = {key: value[:1] for key, value in _inputs(3).items()}  # assisted decoding takes one sample
    greedy = net.generate(**inputs, **GREEDY)
    draft = tiny_model(seed=6, gates=1.0)  # a different InfiMM as the draft model
    draft.generation_config.num_assistant_tokens = 3
    assert torch.equal(net.generate(**inputs, assistant_model=draft, **GREEDY), greedy)
    # The same model as its own assistant accepts every draft token: still the greedy answer.
    assert torch.equal(net.generate(**inputs, assistant_model=net, **GREEDY), greedy)


@torch.no_grad()
def test_assisted_decoding_with_a_text_only_assistant_equals_greedy(net):
    """A draft LM that takes no images (here the bare language model of the same weights) gets the text alone."""
    inputs = {key: value[:1] for key, value in _inputs(4).items()}
    greedy = net.generate(**inputs, **GREEDY)
    draft = standalone_lm(net).eval()
    assert torch.equal(net.generate(**inputs, assistant_model=draft, **GREEDY), greedy)


@torch.no_grad()
def test_prompt_lookup_decoding_equals_greedy(net):
    inputs = {key: value[:1] for key, value in _inputs(5).items()}
    greedy = net.generate(**inputs, **GREEDY)
    assert torch.equal(net.generate(**inputs, prompt_lookup_num_tokens=2, **GREEDY), greedy)


# ---------------------------------------------------------------------------------------- get_image_features
@torch.no_grad()
def test_get_image_features_follows_the_library_output(net):
    images = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))
    out = net.get_image_features(images)
    assert isinstance(out, BaseModelOutputWithPooling)
    # Independent reference: timm's own EVA with the same weights, run block by block, final norm not applied.
    eva = reference_eva(net.config, net.model.vision_tower.timm_model.state_dict())
    features = eva_last_block_tokens(eva, images)
    torch.testing.assert_close(out.last_hidden_state, features, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, net.model.resampler(features), rtol=0, atol=1e-5)
    assert out.hidden_states is None and out.attentions is None
    as_tuple = net.get_image_features(images, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)

    everything = net.get_image_features(images, output_hidden_states=True)
    # transformers' convention: the embeddings, then one entry per block (depth + 1)
    expected = eva_hidden_states(eva, images)
    assert len(everything.hidden_states) == len(eva.blocks) + 1 == len(expected)
    for got, want in zip(everything.hidden_states, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(everything.pooler_output, out.pooler_output, rtol=0, atol=0)


@torch.no_grad()
def test_get_image_features_takes_the_models_own_pixel_values(net):
    """(batch, images, 3, H, W) with `image_mask`: one entry per sample, padding slots left out."""
    inputs = _inputs(8)
    out = net.get_image_features(inputs["pixel_values"], image_mask=inputs["image_mask"])
    tokens = net.config.num_vision_tokens
    latents = net.config.resampler_num_latents
    assert out.last_hidden_state.shape == (2, 2 * tokens, net.config.vision_hidden_size)
    assert [entry.shape[0] for entry in out.pooler_output] == [2 * latents, latents]
    alone = net.get_image_features(inputs["pixel_values"][inputs["image_mask"]])
    torch.testing.assert_close(out.pooler_output[1], alone.pooler_output[2], rtol=0, atol=1e-6)
    assert out.last_hidden_state[1, tokens:].abs().max() == 0  # the padding slot
    # Without `image_mask`, all-zero slots are padding.
    same = net.get_image_features(inputs["pixel_values"])
    assert [entry.shape[0] for entry in same.pooler_output] == [2 * latents, latents]


@torch.no_grad()
def test_forward_returns_the_vision_outputs_when_asked(net):
    inputs = _inputs(9)
    out = net(**inputs, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == net.config.text_config.num_hidden_layers + 1
    depth = net.config.vision_config.model_args["depth"]
    assert len(out.image_outputs.hidden_states) == depth + 1
    # Laid out as get_image_features lays out the model's own (batch, images, ...) pixel values: one entry per sample.
    features = net.get_image_features(inputs["pixel_values"], image_mask=inputs["image_mask"])
    torch.testing.assert_close(out.image_outputs.last_hidden_state, features.last_hidden_state, rtol=0, atol=1e-6)
    assert len(out.image_outputs.pooler_output) == len(features.pooler_output) == 2
    for got, expected in zip(out.image_outputs.pooler_output, features.pooler_output):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert out.image_hidden_states.shape == (2, 2, net.config.resampler_num_latents, net.config.vision_hidden_size)


def test_reentrant_checkpointing_gives_the_plain_gradients():
    """`gradient_checkpointing_kwargs={"use_reentrant": True}` trains the resampler and the blocks with the gradients
    of a run without checkpointing (the resampled latents reach every block as a checkpoint input)."""

    def gradients(checkpointing):
        model = tiny_model(seed=0, gates=1.0).train()
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 31000, (2, 7), generator=g)
        ids[:, [1, 4]] = MEDIA
        pixels = torch.randn(2, 2, 3, IMG, IMG, generator=g)
        model(input_ids=ids, pixel_values=pixels, labels=ids, use_cache=False).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients(None)
    for kwargs in ({"use_reentrant": True}, {"use_reentrant": False}):
        if kwargs["use_reentrant"] and "__call__" in GradientCheckpointingLayer.__dict__:
            # transformers < 5.24 checkpoints a layer's `__call__`, pre-hooks included (read off the library): the
            # blocks would run inside it with the latents hidden in a keyword, so the model refuses, naming the fix.
            with pytest.raises(ValueError, match="use_reentrant=False"):
                gradients(kwargs)
            continue
        checkpointed = gradients(kwargs)
        assert checkpointed.keys() == plain.keys()
        assert any(name.startswith("model.resampler.") for name in plain)
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- attention
@torch.no_grad()
def test_connector_eager_equals_sdpa(net, tmp_path):
    """`set_attn_implementation` reaches the resampler and the cross-attention (mask, padding, tokens before the
    first image included)."""
    net.save_pretrained(tmp_path)
    model = InfiMMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    inputs = _inputs(10)
    sdpa = model(**inputs, use_cache=False).logits
    calls = []
    hook = model.model.cross_attention_layers["1"].attn.register_forward_hook(
        lambda module, args, output: calls.append(module.config._attn_implementation)
    )
    model.set_attn_implementation("eager")
    eager = model(**inputs, use_cache=False).logits
    hook.remove()
    assert calls == ["eager"]
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(eager[real], sdpa[real], rtol=0, atol=1e-5)
    generated = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        generated[implementation] = model.generate(**inputs, **GREEDY)
    assert torch.equal(generated["eager"], generated["sdpa"])


def test_default_attention_kernel_is_pinned(net, tmp_path):
    """Loaded without `attn_implementation`, transformers picks the kernel; outputs depend on it (within float
    rounding, see above), so a release that moves the default is noticed here: SDPA for the language model and the
    connector on CPU."""
    net.save_pretrained(tmp_path)
    model = InfiMMForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"
    calls = []
    hook = model.model.cross_attention_layers["1"].attn.register_forward_hook(
        lambda module, args, output: calls.append(module.config._attn_implementation)
    )
    with torch.no_grad():
        model(**_inputs(11), use_cache=False)
    hook.remove()
    assert calls == ["sdpa"]


# ------------------------------------------------------------------------------------------ cache argument
@torch.no_grad()
def test_old_cache_name_warns_where_the_library_renamed_it(net):
    inputs = {key: value[:1] for key, value in _inputs(11).items()}
    prefill = net(**inputs)
    step = dict(input_ids=torch.tensor([[5]]),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(**step, past_key_values=prefill[CACHE])
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]
    # transformers 5.24 renamed the argument; its own models warn about the old name, earlier releases use it.
    assert len(deprecations) == (1 if CACHE == "cache" else 0)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "pixels, message",
    [
        (torch.randn(1, 1, 3, 14, 14), r"3 x 28 x 28.*got 3 x 14 x 14"),
        (torch.randn(1, 1, 1, IMG, IMG), r"3 x 28 x 28.*got 1 x 28 x 28"),
        (torch.randint(0, 255, (1, 1, 3, IMG, IMG), dtype=torch.uint8), "floating-point"),
        (torch.randn(3, IMG, IMG), r"\(batch, images, 3, height, width\)"),
    ],
    ids=["wrong-size", "one-channel", "uint8", "3d"],
)
def test_bad_pixel_values_are_refused_with_the_fix(net, pixels, message):
    ids = torch.tensor([[BOS, EOC, MEDIA, 5, 6]])
    with pytest.raises(ValueError, match=message) as error:
        net(input_ids=ids, pixel_values=pixels)
    assert "processor" in str(error.value)
    with pytest.raises(ValueError, match=message):
        net.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2)


def test_image_tokens_without_images_are_refused(net):
    """A decision, documented in the README: `<image>` ids without pixel values raise rather than run as text, so a
    forgotten image never passes silently."""
    with pytest.raises(ValueError, match=r"1 `<image>` tokens but no `pixel_values`"):
        net(input_ids=torch.tensor([[BOS, MEDIA, 5]]))
