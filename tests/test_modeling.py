"""Behaviour of `InfiMMForConditionalGeneration` against references built outside it.

References: timm's EVA run block by block, a separately built `MistralForCausalLM` holding the same LM weights,
hand-written loops and losses, and the rules of which image a token sees (README, "Python usage": "Semantics
(from the release)"). The tiny models keep the real vocabulary and token ids; gates are opened so the images matter.
"""

import contextlib
import re
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast, TextIteratorStreamer

from conftest import RELEASE_DIR, TOKENIZER_DIR, tiny_config, tiny_model
from helpers_modeling import eva_last_block_tokens, perturb_norms, reference_eva, standalone_lm
from helpers_modeling import one_torch_thread  # noqa: F401  (autouse fixture)

from infimm import InfiMMConfig, InfiMMForConditionalGeneration, InfiMMModel

MEDIA, EOC, PAD = 32001, 32000, 2
IMG = 28


@pytest.fixture(scope="module")
def net():
    """Read-only tiny model with open gates; weights a little larger than default so images move the logits."""
    model = perturb_norms(tiny_model(gates=1.0, text_config={"initializer_range": 0.05}))
    model.generation_config.eos_token_id = None  # fixed-length generations, comparable step by step
    model.generation_config.pad_token_id = PAD
    return model


def _ids(*rows, seed=0):
    """Random text ids, one row per sample; each row is (length, positions of `<image>`)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length, images in rows:
        row = torch.randint(3, 32000, (length,), generator=g)
        row[list(images)] = MEDIA
        out.append(row)
    return torch.stack(out)


def _pixels(batch, images, seed=0):
    return torch.randn(batch, images, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _logits(model, **inputs):
    with torch.no_grad():
        return model(use_cache=False, **inputs).logits


def _capture_output(module):
    """Forward hook recording `module`'s outputs."""
    seen = []
    handle = module.register_forward_hook(lambda _module, _args, output: seen.append(output.detach().clone()))
    return seen, handle


def _capture_resampler_input(model):
    seen = []
    handle = model.model.resampler.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    return seen, handle


# ---------------------------------------------------------------------------------------------- behaviour
def test_tokens_before_the_first_image_ignore_every_image(net):
    ids = _ids((14, (5, 10)), (14, (7, 8)))
    first = [5, 7]
    a = _logits(net, input_ids=ids, pixel_values=_pixels(2, 2, seed=1))
    b = _logits(net, input_ids=ids, pixel_values=_pixels(2, 2, seed=2))
    for sample, start in enumerate(first):
        torch.testing.assert_close(a[sample, :start], b[sample, :start], atol=1e-6, rtol=0)
        # From the first `<image>` token on (it counts itself), the images matter.
        assert (a[sample, start:] - b[sample, start:]).abs().amax(-1).min() > 1e-3


def test_a_token_sees_only_its_most_recent_image(net):
    """Where an image enters the text (output of the first gated block), a token after `<image>` #2 depends on
    image 2 and not on image 1, and a token between the two images on image 1 only. Further up, image 1 still
    reaches later tokens through causal self-attention over the tokens that saw it (Flamingo's design), so in the
    logits only causality is checked: nothing before `<image>` #2 moves when image 2 changes."""
    ids = _ids((14, (3, 8)))
    base = _pixels(1, 2, seed=3)
    new_first, new_second = base.clone(), base.clone()
    new_first[0, 0] = _pixels(1, 1, seed=4)[0, 0]
    new_second[0, 1] = _pixels(1, 1, seed=5)[0, 0]

    first_block = net.model.cross_attention_layers[str(net.config.cross_attention_layers[0])]
    seen, handle = _capture_output(first_block)
    try:
        logits = [_logits(net, input_ids=ids, pixel_values=p) for p in (base, new_first, new_second)]
    finally:
        handle.remove()
    block_base, block_first, block_second = (output[0] for output in seen)

    def moved(x, y):
        return (x - y).abs().amax(-1)  # per token

    between, after = slice(3, 8), slice(8, 14)
    assert moved(block_base[after], block_second[after]).min() > 1e-4
    torch.testing.assert_close(block_base[after], block_first[after], atol=1e-6, rtol=0)
    assert moved(block_base[between], block_first[between]).min() > 1e-4
    torch.testing.assert_close(block_base[between], block_second[between], atol=1e-6, rtol=0)

    torch.testing.assert_close(logits[0][0, :8], logits[2][0, :8], atol=1e-6, rtol=0)
    assert moved(logits[0][0, 8:], logits[2][0, 8:]).min() > 1e-3


def test_text_only_samples_equal_the_bare_language_model(net):
    bare = standalone_lm(net)
    assert type(bare).__name__ == "MistralForCausalLM"
    ids = _ids((12, ()), (12, ()), seed=6)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = PAD, 0
    with torch.no_grad():
        expected = bare(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(_logits(net, input_ids=ids, attention_mask=mask), expected, atol=1e-5, rtol=0)
    # All-zero image slots (batch padding) do not make a sample an image sample.
    got = _logits(net, input_ids=ids, attention_mask=mask, pixel_values=torch.zeros(2, 1, 3, IMG, IMG))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mixed_batch_of_text_only_and_image_samples(net):
    bare = standalone_lm(net)
    ids = _ids((12, (2, 6)), (12, ()), (12, (0,)), seed=7)
    pixels = _pixels(3, 2, seed=8)
    pixels[1] = 0
    pixels[2, 1] = 0
    mixed = _logits(net, input_ids=ids, pixel_values=pixels)
    with torch.no_grad():
        lm_logits = bare(input_ids=ids).logits
    torch.testing.assert_close(mixed[1], lm_logits[1], atol=1e-5, rtol=0)
    # Image samples do not depend on their batch neighbours...
    alone = _logits(net, input_ids=ids[[0, 2]], pixel_values=pixels[[0, 2]])
    torch.testing.assert_close(mixed[[0, 2]], alone, atol=1e-5, rtol=0)
    # ...and from their first image on they are not the bare LM (the blocks ran for them).
    assert (mixed[0, 2:] - lm_logits[0, 2:]).abs().amax(-1).min() > 1e-3
    assert (mixed[2] - lm_logits[2]).abs().amax(-1).min() > 1e-3

    # With `image_mask`, padding slots may hold anything: they are never encoded nor attended.
    noisy = pixels.clone()
    noisy[1] = _pixels(1, 2, seed=9)[0]
    noisy[2, 1] = _pixels(1, 1, seed=10)[0, 0]
    image_mask = torch.tensor([[True, True], [False, False], [True, False]])
    torch.testing.assert_close(
        _logits(net, input_ids=ids, pixel_values=noisy, image_mask=image_mask), mixed, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("preset", ["infimm-zephyr", "infimm-llama13b", "infimm-vicuna13b"])
def test_vision_features_are_the_last_block_before_the_final_norm(preset):
    model = perturb_norms(tiny_model(preset, text_config={"num_hidden_layers": 2}))
    eva = reference_eva(model.config, model.model.vision_tower.timm_model.state_dict())
    pixels = _pixels(2, 2, seed=11)
    pixels[1, 1] = 0  # padding slot: never reaches the tower
    ids = _ids((8, (1, 4)), (8, (2,)), seed=12)
    seen, handle = _capture_resampler_input(model)
    try:
        _logits(model, input_ids=ids, pixel_values=pixels)
    finally:
        handle.remove()
    features = seen[0]
    real_images = torch.stack([pixels[0, 0], pixels[0, 1], pixels[1, 0]])
    with torch.no_grad():
        expected = eva_last_block_tokens(eva, real_images)
    assert features.shape == (3, model.config.num_vision_tokens, model.config.vision_hidden_size) == expected.shape
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    # The final norm is not applied (it would change every token).
    with torch.no_grad():
        assert (eva.norm(expected) - features).abs().amax(-1).min() > 1e-2


# --------------------------------------------------------------------------------------------- generation
def _greedy_by_hand(model, ids, new_tokens, **inputs):
    """Greedy decoding where every step is a full forward pass over the whole sequence, without any cache."""
    step_logits = []
    for _ in range(new_tokens):
        logits = _logits(model, input_ids=ids, **inputs)[:, -1]
        step_logits.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        if "attention_mask" in inputs:
            inputs["attention_mask"] = F.pad(inputs["attention_mask"], (0, 1), value=1)
    return ids, step_logits


def test_cached_greedy_equals_uncached_full_forward_loop(net):
    # Two images, one image, and a text-only sample (its flag must survive into the decode steps).
    ids = _ids((10, (1, 5)), (10, (3,)), (10, ()), seed=13)
    pixels = _pixels(3, 2, seed=14)
    pixels[1, 1] = 0
    pixels[2] = 0
    expected, expected_logits = _greedy_by_hand(net, ids, 6, pixel_values=pixels)
    out = net.generate(
        input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)
    for got, want in zip(out.logits, expected_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    no_cache = net.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(no_cache, expected)


def test_left_padded_batch_equals_each_sample_alone(net):
    a, b = _ids((9, (2, 6)), seed=15), _ids((5, (0,)), seed=16)
    pa, pb = _pixels(1, 2, seed=17), _pixels(1, 1, seed=18)
    ids = torch.full((2, 9), PAD)
    ids[0], ids[1, 4:] = a[0], b[0]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    pixels = torch.zeros(2, 2, 3, IMG, IMG)
    pixels[0], pixels[1, 0] = pa[0], pb[0, 0]
    kwargs = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    batch = net.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    for row, (prompt, images) in enumerate([(a, pa), (b, pb)]):
        alone, alone_logits = _greedy_by_hand(net, prompt, 5, pixel_values=images)
        assert torch.equal(batch.sequences[row, 9:], alone[0, prompt.shape[1]:])
        for got, want in zip(batch.logits, alone_logits, strict=True):
            torch.testing.assert_close(got[row], want[0], atol=1e-5, rtol=0)


def test_beam_search_scores_are_the_sequences_log_probabilities(net):
    ids = _ids((10, (1, 5)), (10, (3,)), seed=19)
    pixels = _pixels(2, 2, seed=20)
    pixels[1, 1] = 0
    out = net.generate(
        input_ids=ids, pixel_values=pixels, max_new_tokens=5, num_beams=3, num_return_sequences=2,
        length_penalty=0.0, do_sample=False, output_scores=True, return_dict_in_generate=True,
    )
    assert out.sequences.shape == (4, 15)
    assert torch.equal(out.sequences[:, :10], ids.repeat_interleave(2, 0))
    # With length_penalty 0 a beam's score is the sum of its tokens' log-probabilities: recompute them by hand.
    log_probs = _logits(net, input_ids=out.sequences, pixel_values=pixels.repeat_interleave(2, 0)).log_softmax(-1)
    hand = log_probs[:, 9:-1].gather(-1, out.sequences[:, 10:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, hand, atol=1e-4, rtol=1e-5)
    # The beams of each sample are returned best first and are distinct.
    assert (out.sequences_scores[0::2] >= out.sequences_scores[1::2]).all()
    assert not torch.equal(out.sequences[0], out.sequences[1])


def test_sampling(net):
    ids = _ids((10, (1, 5)), (10, (3,)), seed=21)
    pixels = _pixels(2, 2, seed=22)
    pixels[1, 1] = 0
    greedy, _ = _greedy_by_hand(net, ids, 4, pixel_values=pixels)
    # top_k = 1 leaves one candidate per step: sampling must then follow the greedy path.
    top1 = net.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)

    def sample(seed):
        torch.manual_seed(seed)
        return net.generate(
            input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=True, top_k=0, top_p=0.9,
            temperature=1.5,
        )

    first = sample(0)
    assert first.shape == (2, 16) and torch.equal(first[:, :10], ids)
    assert ((first >= 0) & (first < net.config.text_config.vocab_size)).all()
    assert torch.equal(sample(0), first)


def test_text_iterator_streamer(net):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)
    assert tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>"]) == [EOC, MEDIA]
    ids = tokenizer("<image>A photo of", return_tensors="pt").input_ids
    assert (ids == MEDIA).sum() == 1
    pixels = _pixels(1, 1, seed=23)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
    result = {}

    def run():
        result["ids"] = net.generate(
            input_ids=ids, pixel_values=pixels, max_new_tokens=7, do_sample=False, streamer=streamer
        )

    thread = threading.Thread(target=run)
    thread.start()
    pieces = list(streamer)
    thread.join()
    new_tokens = result["ids"][0, ids.shape[1]:]
    expected, _ = _greedy_by_hand(net, ids, 7, pixel_values=pixels)
    assert torch.equal(new_tokens, expected[0, ids.shape[1]:])
    assert "".join(pieces) == tokenizer.decode(new_tokens, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------------ loss
def test_loss_is_the_shifted_causal_lm_loss(net):
    ids = _ids((10, (1, 5)), (10, (3,)), seed=24)
    pixels = _pixels(2, 2, seed=25)
    pixels[1, 1] = 0
    labels = ids.clone()
    labels[ids == MEDIA] = -100
    labels[1, :4] = -100
    with torch.no_grad():
        out = net(input_ids=ids, pixel_values=pixels, labels=labels, use_cache=False)
    log_probs = out.logits[:, :-1].double().log_softmax(-1)
    targets = labels[:, 1:]
    valid = targets != -100
    nll = -log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)[valid]
    torch.testing.assert_close(out.loss.double(), nll.mean(), atol=1e-5, rtol=1e-6)

    # Under gradient accumulation the Trainer passes the number of target tokens of the whole accumulated batch.
    for num_items in (37, torch.tensor(37)):
        with torch.no_grad():
            summed = net(
                input_ids=ids, pixel_values=pixels, labels=labels, use_cache=False, num_items_in_batch=num_items
            ).loss
        torch.testing.assert_close(summed.double(), nll.sum() / 37, atol=1e-5, rtol=1e-6)


def test_return_dict_false_gives_loss_then_logits(net):
    ids = _ids((10, (1, 5)), seed=35)
    pixels = _pixels(1, 2, seed=36)
    with torch.no_grad():
        as_tuple = net(input_ids=ids, pixel_values=pixels, labels=ids, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple)
    loss, logits = as_tuple[:2]
    torch.testing.assert_close(logits, _logits(net, input_ids=ids, pixel_values=pixels), atol=0, rtol=0)
    torch.testing.assert_close(loss, F.cross_entropy(logits[0, :-1], ids[0, 1:]), atol=1e-5, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- gradients
def _train_batch(seed=26):
    ids = _ids((10, (1, 5)), (10, ()), (10, (0,)), seed=seed)
    pixels = _pixels(3, 2, seed=seed)
    pixels[1] = 0
    pixels[2, 1] = 0
    return dict(input_ids=ids, pixel_values=pixels, labels=ids, use_cache=False)


def test_every_trainable_parameter_gets_a_gradient():
    model = tiny_model(gates=0.5).train()
    seen, handle = _capture_resampler_input(model)
    model(**_train_batch()).loss.backward()
    handle.remove()
    assert seen[0].grad_fn is not None  # the tower is trainable here, so its graph is built
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0)
    # The tower's final norm is in the checkpoint but unused: features are taken before it.
    assert no_grad == ["model.vision_tower.timm_model.norm.bias", "model.vision_tower.timm_model.norm.weight"]
    for name, param in model.named_parameters():
        if name.endswith("_gate"):
            assert param.grad.abs().item() > 0, name


def test_frozen_vision_tower_builds_no_graph():
    model = tiny_model(gates=0.5).train()
    model.model.vision_tower.requires_grad_(False)
    seen, handle = _capture_resampler_input(model)
    model(**_train_batch()).loss.backward()
    handle.remove()
    assert seen[0].grad_fn is None and not seen[0].requires_grad
    for name, param in model.named_parameters():
        if name.startswith("model.vision_tower."):
            assert param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_model(gates=0.5).train()
    batch = _train_batch(seed=27)
    block = model.model.cross_attention_layers[str(model.config.cross_attention_layers[0])]
    decoder_layer = model.model.language_model.model.layers[0]
    eva_block = model.model.vision_tower.timm_model.blocks[0]
    calls = {"block": 0, "decoder": 0, "eva": 0}
    for key, module in (("block", block.ff), ("decoder", decoder_layer.mlp), ("eva", eva_block.mlp)):
        # A pre-hook: the recompute may stop right after the last saved tensor, before a module returns.
        module.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))

    def step():
        model.zero_grad(set_to_none=True)
        calls.update(block=0, decoder=0, eva=0)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, dict(calls)

    loss, grads, plain_calls = step()
    assert plain_calls == {"block": 1, "decoder": 1, "eva": 1}
    # `activation_checkpointing_enable` is the 5.2x name; older 5.x releases only have the deprecated alias.
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.model.vision_tower.timm_model.set_grad_checkpointing(True)
    ckpt_loss, ckpt_grads, ckpt_calls = step()
    # Checkpointed modules run again during backward.
    # transformers >= 5.2x checkpoints a layer's `forward` (its pre-hook, which runs the block, stays outside);
    # older 5.x checkpointed `__call__`, so the block also reruns inside its decoder layer's recompute.
    from transformers.modeling_layers import GradientCheckpointingLayer

    block_runs = 2 if GradientCheckpointingLayer.__call__ is torch.nn.Module.__call__ else 3
    assert ckpt_calls == {"block": block_runs, "decoder": 2, "eva": 2}
    torch.testing.assert_close(ckpt_loss, loss, atol=1e-6, rtol=0)
    assert grads.keys() == ckpt_grads.keys()
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------- errors
def test_image_token_count_mismatch_names_both_counts(net):
    pixels = _pixels(2, 3, seed=28)
    pixels[0, 2] = 0
    # Sample 1 announces 4 images but 3 are given.
    ids = _ids((12, (1, 5)), (12, (1, 3, 5, 7)), seed=29)
    with pytest.raises(ValueError) as error:
        net(input_ids=ids, pixel_values=pixels)
    message = str(error.value)
    assert re.search(r"\b4\b", message) and re.search(r"\b3\b", message) and "<image>" in message
    # More images than `<image>` tokens.
    ids = _ids((12, (1,)), (12, (1, 3, 5)), seed=29)
    with pytest.raises(ValueError, match=r"\b1\b.*\b2\b"):
        net(input_ids=ids, pixel_values=pixels)
    # `<image>` tokens without any pixel values.
    with pytest.raises(ValueError, match="pixel_values"):
        net(input_ids=ids)


@pytest.mark.parametrize(
    "shape", [(2, 3, IMG, IMG, 1, 1, 1), (3, IMG, IMG), (2, 1, 2, 3, IMG, IMG)], ids=["7d", "3d", "two-frames"]
)
def test_bad_pixel_shape(net, shape):
    ids = _ids((8, (1,)), (8, (2,)), seed=30)
    with pytest.raises(ValueError, match="pixel_values"):
        net(input_ids=ids, pixel_values=torch.zeros(shape))


def test_bad_image_mask_shape(net):
    ids = _ids((8, (1,)), (8, (2,)), seed=31)
    with pytest.raises(ValueError, match="image_mask"):
        net(input_ids=ids, pixel_values=_pixels(2, 1), image_mask=torch.ones(2, 2, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(media_token_id=32002), "media_token_id"),
        (dict(eoc_token_id=-1), "eoc_token_id"),
        (dict(media_token_id=40000, text_config={"vocab_size": 40000}), "media_token_id"),
        (dict(cross_attn_every_n_layers=0), "cross_attn_every_n_layers"),
        (dict(cross_attn_every_n_layers=5), "cross_attn_every_n_layers"),
        (dict(vision_config={"model_args": {"embed_dim": 30, "num_heads": 4}}), "embed_dim"),
        (dict(vision_config={"model_args": {"img_size": 30}}), "img_size"),
        (dict(resampler_heads=0), "resampler_heads"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_validation_edges():
    with pytest.raises(ValueError, match="infimm-tiny"):
        InfiMMConfig.from_preset("infimm-tiny")
    with pytest.raises(ValueError, match="embed_dim"):
        InfiMMConfig(vision_config={"architecture": "eva02_large_patch14_clip_336",
                                    "model_args": {"img_size": 28, "patch_size": 14}})
    # Bounds are inclusive: one block before the last of 4 layers, or one before every layer.
    assert tiny_config(cross_attn_every_n_layers=4).cross_attention_layers == [3]
    assert tiny_config(cross_attn_every_n_layers=1).cross_attention_layers == [0, 1, 2, 3]
    assert tiny_config(eoc_token_id=0, media_token_id=32001).eoc_token_id == 0


def test_legacy_release_config_gives_the_zephyr_shapes():
    config = InfiMMConfig.from_pretrained(RELEASE_DIR)
    assert config.model_type == "infimm"
    # README, "The model family": an EVA02-CLIP-L/14 tower at 336 px (577 tokens per image), Zephyr-7B with a
    # 32002-token vocabulary.
    assert config.vision_config.architecture == "eva02_large_patch14_clip_336"
    args = config.vision_config.model_args
    assert (args["img_size"], args["patch_size"], args["embed_dim"], args["depth"], args["num_heads"]) == (
        336, 14, 1024, 24, 16
    )
    assert config.num_vision_tokens == 577
    text = config.text_config
    assert text.model_type == "mistral"
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
            text.num_attention_heads, text.num_key_value_heads, text.sliding_window) == (
        32002, 4096, 14336, 32, 32, 8, 4096
    )
    assert config.cross_attention_layers == list(range(1, 32, 2))
    assert (config.media_token_id, config.eoc_token_id) == (MEDIA, EOC)
    assert (config.resampler_depth, config.resampler_num_latents, config.resampler_heads,
            config.resampler_head_dim, config.resampler_ff_mult) == (6, 64, 8, 64, 4)
    assert (config.cross_attn_heads, config.cross_attn_head_dim, config.cross_attn_ff_mult) == (8, 64, 4)
    # ... i.e. the preset, field for field (training switches of the old file are not carried over). The release's
    # `visual` switches ride along explicitly (EVA02-L: 2-D rope on a 16x16 reference grid, SwiGLU with subln, separate
    # q/k/v with q and v biases); tests/test_release_config.py checks the tower equals timm's architecture.
    preset = InfiMMConfig.from_preset("infimm-zephyr")
    assert {key: args[key] for key in preset.vision_config.model_args} == preset.vision_config.model_args
    assert (args["use_rot_pos_emb"], list(args["ref_feat_shape"]), args["swiglu_mlp"], args["scale_mlp"],
            args["scale_attn_inner"], args["qkv_fused"], args["qkv_bias"], args["use_post_norm"]) == (
        True, [16, 16], True, True, True, False, True, False
    )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "sliding_window",
                "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert getattr(config.text_config, key) == getattr(preset.text_config, key), key
    for key in ("freeze_llm", "use_grad_checkpoint", "visual", "language", "seq_length", "use_flash_attn",
                "tokenizer_type", "image_token_id"):
        assert not hasattr(config, key), key


# ------------------------------------------------------------------------------------------ model plumbing
def test_resize_token_embeddings():
    model = tiny_model(gates=1.0)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    model.resize_token_embeddings(32010)
    assert model.get_input_embeddings().weight.shape[0] == 32010
    assert model.get_output_embeddings().weight.shape[0] == 32010
    assert model.config.text_config.vocab_size == 32010
    torch.testing.assert_close(model.get_input_embeddings().weight[:32002], old_in, atol=0, rtol=0)
    torch.testing.assert_close(model.get_output_embeddings().weight[:32002], old_out, atol=0, rtol=0)

    ids = _ids((8, (1,)), seed=32)
    ids[0, 4] = 32007
    labels = ids.clone()
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=_pixels(1, 1), labels=labels, use_cache=False)
    assert out.logits.shape == (1, 8, 32010)
    hand = F.cross_entropy(out.logits[0, :-1], labels[0, 1:])
    torch.testing.assert_close(out.loss, hand, atol=1e-5, rtol=1e-6)


@contextlib.contextmanager
def _uninitialised_memory_is_nan():
    """Makes a weight that no init touched show up as NaN instead of whatever the allocator returned."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]


def _load_without(tmp_path, model, dropped):
    """Saves `model`, removes `dropped` from the checkpoint, loads it back; returns (parameters, saved state)."""
    model.save_pretrained(tmp_path)
    (weights_file,) = tmp_path.glob("*.safetensors")
    state = load_file(weights_file)
    assert dropped <= state.keys()
    save_file({k: v for k, v in state.items() if k not in dropped}, weights_file, metadata={"format": "pt"})
    with _uninitialised_memory_is_nan():
        loaded, info = InfiMMForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == dropped
    params = dict(loaded.named_parameters())
    for name, value in state.items():
        if name not in dropped:
            assert torch.equal(params[name], value), name
    for name in dropped:
        assert torch.isfinite(params[name]).all(), name
    return params


def test_missing_connector_weights_are_initialised_on_load(tmp_path):
    model = tiny_model(gates=0.7)
    gates = {f"model.cross_attention_layers.{i}.{g}" for i in (1, 3) for g in ("attn_gate", "ff_gate")}
    linears = {"model.resampler.layers.0.attn.to_kv.weight", "model.cross_attention_layers.1.attn.to_q.weight"}
    norm = "model.cross_attention_layers.3.attn.norm.weight"
    params = _load_without(tmp_path, model, gates | linears | {"model.resampler.latents", norm})
    for name in gates:
        assert params[name].item() == 0.0, name  # a fresh block is the identity
    assert 0.6 < params["model.resampler.latents"].std() < 1.4  # torch.randn, as the Flamingo resampler
    std = model.config.text_config.initializer_range
    for name in linears:
        assert 0.7 * std < params[name].std() < 1.3 * std, name
    assert torch.equal(params[norm], torch.ones(64))


def test_missing_vision_position_parameters_are_initialised_on_load(tmp_path):
    """timm's `cls_token` and `pos_embed` are left out by the timm wrapper's own init."""
    model = tiny_model()
    dropped = {"model.vision_tower.timm_model.cls_token", "model.vision_tower.timm_model.pos_embed"}
    params = _load_without(tmp_path, model, dropped)
    for name in dropped:
        assert 0 < params[name].std() < 0.05, name  # trunc_normal(std=0.02), as timm initialises them


def test_headless_model_loads_from_a_full_checkpoint(net, tmp_path):
    """`InfiMMModel` (no head) from a saved `InfiMMForConditionalGeneration`, as for feature extraction."""
    net.save_pretrained(tmp_path)
    headless, info = InfiMMModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = _ids((10, (1, 5)), (10, ()), seed=37)
    pixels = _pixels(2, 2, seed=38)
    pixels[1] = 0
    with torch.no_grad():
        hidden = headless.eval()(input_ids=ids, pixel_values=pixels, use_cache=False).last_hidden_state
        bare_hidden = standalone_lm(net).model(input_ids=ids[1:]).last_hidden_state
    torch.testing.assert_close(hidden[1:], bare_hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(net.lm_head(hidden), _logits(net, input_ids=ids, pixel_values=pixels), atol=1e-5, rtol=0)


def test_sdpa_and_eager_attention_agree(net, tmp_path):
    net.save_pretrained(tmp_path)
    eager = InfiMMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = InfiMMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert eager.model.language_model.config._attn_implementation == "eager"
    assert sdpa.model.language_model.config._attn_implementation == "sdpa"
    ids = _ids((10, (1, 5)), (10, (6,)), seed=33)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = PAD, 0
    pixels = _pixels(2, 2, seed=34)
    pixels[1, 1] = 0
    got, want = (_logits(m, input_ids=ids, attention_mask=mask, pixel_values=pixels) for m in (sdpa, eager))
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def counting_attention():
    """An attention function registered with transformers (the route `flash_attention_2` and hub kernels take),
    recording which module called it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    callers = []

    def counting_sdpa(module, *args, **kwargs):
        callers.append(type(module).__name__)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("infimm_test_counting_sdpa", counting_sdpa)
    AttentionMaskInterface.register("infimm_test_counting_sdpa", sdpa_mask)
    return "infimm_test_counting_sdpa", callers


@pytest.mark.parametrize("per_part", [False, True], ids=["whole-model", "text_config-only"])
def test_language_model_runs_the_requested_attention_implementation(net, tmp_path, counting_attention, per_part):
    name, callers = counting_attention
    net.save_pretrained(tmp_path)
    requested = {"text_config": name} if per_part else name
    custom = InfiMMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=requested).eval()
    sdpa = InfiMMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert custom.model.language_model.config._attn_implementation == name
    ids = _ids((10, (1, 5)), seed=35)
    pixels = _pixels(1, 2, seed=36)
    self_attn = type(custom.model.language_model.model.layers[0].self_attn).__name__
    # Decoder layers 0-3 with blocks before layers 1 and 3. Asked for the whole model, the connector takes the
    # implementation too: the resampler's 2 layers (all images at once), then each block before its layer.
    if per_part:
        resampler, step = [], [self_attn] * 4
    else:
        resampler = ["InfiMMPerceiverAttention"] * 2
        step = [self_attn, "InfiMMCrossAttention", self_attn, self_attn, "InfiMMCrossAttention", self_attn]
    callers.clear()
    got = _logits(custom, input_ids=ids, pixel_values=pixels)
    assert callers == resampler + step
    torch.testing.assert_close(got, _logits(sdpa, input_ids=ids, pixel_values=pixels), atol=0, rtol=0)
    callers.clear()
    out = custom.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3 and callers == resampler + step * 3  # prefill + 2 decode steps


def test_flash_attention_2_is_passed_to_the_language_model(net, tmp_path):
    """Where flash-attn is installed the LM gets it; elsewhere transformers' own error says what is missing."""
    import importlib.util

    net.save_pretrained(tmp_path)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="FlashAttention2"):
            InfiMMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    else:
        loaded = InfiMMForConditionalGeneration.from_pretrained(
            tmp_path, attn_implementation="flash_attention_2", dtype=torch.bfloat16
        )
        assert loaded.model.language_model.config._attn_implementation == "flash_attention_2"
