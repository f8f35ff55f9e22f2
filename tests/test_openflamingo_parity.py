"""Parity with OpenFlamingo 2.0.1, the upstream of InfiMM's resampler and gated cross-attention.

OpenFlamingo's `Flamingo` is assembled by hand the way its `create_model_and_transforms` does it (no downloads):
the language model instance is extended with `FlamingoLMMixin`, its decoder-layer attribute is named, and
`Flamingo(...)` wraps it. Its vision encoder is a stand-in: `Flamingo` keeps `vision_encoder.visual` and calls
`visual(images)[1]` on the flattened `(batch * images * frames, 3, H, W)` tensor, so the stand-in returns
`(pooled, tokens)` where `tokens` are what InfiMM feeds its resampler: timm's EVA (built separately, same weights)
run block by block, CLS first, final norm not applied. Resampler, cross-attention and LM weights are copied across
with strict loads. OpenFlamingo's default resampler (6 layers, 64 latents, 8 heads x 64) and cross-attention
(8 heads x 64, ff x4) are the released InfiMM shapes, so the tiny models keep those and shrink everything else.
"""

import sys
import types

import pytest
import torch
from torch import nn

from conftest import tiny_model
from helpers_modeling import eva_last_block_tokens, perturb_norms, reference_eva, standalone_lm
from helpers_modeling import one_torch_thread  # noqa: F401  (autouse fixture)

try:  # OpenFlamingo's package __init__ imports its factory, which imports open_clip; nothing here uses it.
    import open_clip  # noqa: F401
except ImportError:
    sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))

from open_flamingo.src.flamingo import Flamingo  # noqa: E402
from open_flamingo.src.flamingo_lm import FlamingoLMMixin  # noqa: E402
from open_flamingo.src.utils import extend_instance  # noqa: E402

ATOL = 1e-5
IMG = 28  # tiny_config's image size


class _EvaVisual(nn.Module):
    """Plays `open_clip`'s `model.visual` with `output_tokens=True`: returns (pooled, tokens)."""

    def __init__(self, eva):
        super().__init__()
        self.eva = eva
        self.calls = []

    def forward(self, images):
        self.calls.append(tuple(images.shape))
        tokens = eva_last_block_tokens(self.eva, images)
        return self.eva.norm(tokens)[:, 0], tokens


class _ClipStandIn(nn.Module):
    def __init__(self, eva):
        super().__init__()
        self.visual = _EvaVisual(eva)


def _resampler_to_openflamingo(state_dict):
    """`layers.N.attn.*` -> `layers.N.0.*`, `layers.N.ff.K.*` -> `layers.N.1.K.*` (latents, norm unchanged)."""
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "layers":
            parts[2] = {"attn": "0", "ff": "1"}[parts[2]]
        renamed[".".join(parts)] = value
    return renamed


def build_pair(preset):
    """An InfiMM tiny model and an OpenFlamingo `Flamingo` holding the same weights."""
    model = tiny_model(
        preset, seed=3, text_config={"initializer_range": 0.05}, resampler_depth=6, resampler_num_latents=64,
        resampler_heads=8, resampler_head_dim=64, cross_attn_heads=8, cross_attn_head_dim=64,
    )
    perturb_norms(model)
    config = model.config
    # Distinct gate values per block, so a block copied to the wrong decoder layer cannot go unnoticed.
    for offset, block in enumerate(model.model.cross_attention_layers.values()):
        block.attn_gate.data.fill_(0.9 - 0.3 * offset)
        block.ff_gate.data.fill_(0.6 + 0.2 * offset)

    eva = reference_eva(config, model.model.vision_tower.timm_model.state_dict())
    lang_encoder = standalone_lm(model)
    extend_instance(lang_encoder, FlamingoLMMixin)
    lang_encoder.set_decoder_layers_attr_name("model.layers")
    flamingo = Flamingo(
        _ClipStandIn(eva), lang_encoder, eoc_token_id=config.eoc_token_id, media_token_id=config.media_token_id,
        vis_dim=config.vision_hidden_size, cross_attn_every_n_layers=config.cross_attn_every_n_layers,
    ).eval()
    flamingo.perceiver.load_state_dict(_resampler_to_openflamingo(model.model.resampler.state_dict()), strict=True)
    upstream_blocks = flamingo.lang_encoder.gated_cross_attn_layers
    placed = [i for i, block in enumerate(upstream_blocks) if block is not None]
    assert placed == [int(i) for i in model.model.cross_attention_layers] == config.cross_attention_layers
    for index, block in model.model.cross_attention_layers.items():
        upstream_blocks[int(index)].load_state_dict(block.state_dict(), strict=True)
    return model, flamingo


@pytest.fixture(scope="module", params=["infimm-zephyr", "infimm-llama13b"])
def pair(request):
    model, flamingo = build_pair(request.param)
    expected_lm = {"infimm-zephyr": "MistralForCausalLM", "infimm-llama13b": "LlamaForCausalLM"}[request.param]
    assert type(model.model.language_model).__name__ == expected_lm
    return model, flamingo


def _batch(config, with_text_only=False, seed=0):
    """Three samples with 2, 3 and 1 images (zero slots pad the missing ones), Flamingo's interleaved layout."""
    M, E = config.media_token_id, config.eoc_token_id
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32000, (3, 16), generator=g)
    ids[0, 3], ids[0, 8], ids[0, 7] = M, M, E            # text before the first image, two images
    ids[1, 0], ids[1, 1], ids[1, 9], ids[1, 8] = M, M, M, E  # image first, two adjacent images, a third later
    ids[2, 15] = M                                       # one image, on the last token
    pixels = torch.randn(3, 3, 3, IMG, IMG, generator=g)
    pixels[0, 2] = 0
    pixels[2, 1:] = 0
    if with_text_only:
        ids[2] = torch.randint(3, 32000, (16,), generator=g)
        pixels[2] = 0
    return ids, pixels


def _ours(model, ids, pixels, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, use_cache=False, **kwargs).logits


def _upstream(flamingo, ids, pixels, **kwargs):
    with torch.no_grad():
        return flamingo(vision_x=pixels.unsqueeze(2), lang_x=ids, **kwargs).logits


def test_logits_match_openflamingo(pair):
    model, flamingo = pair
    ids, pixels = _batch(model.config)
    expected = _upstream(flamingo, ids, pixels)
    # OpenFlamingo flattens (batch, images, frames) before its vision encoder.
    assert flamingo.vision_encoder.calls[-1] == (3 * 3, 3, IMG, IMG)
    torch.testing.assert_close(_ours(model, ids, pixels), expected, atol=ATOL, rtol=0)
    # The release's 6-D layout (batch, images, 1, 3, H, W) is the same input.
    torch.testing.assert_close(_ours(model, ids, pixels.unsqueeze(2)), expected, atol=ATOL, rtol=0)

    # The comparison is sensitive: other images move the logits by far more than the tolerance.
    other = torch.randn_like(pixels) * (pixels != 0)
    assert (_upstream(flamingo, ids, other) - expected).abs().max() > 100 * ATOL


def test_logits_match_openflamingo_left_padded(pair):
    model, flamingo = pair
    ids, pixels = _batch(model.config, seed=1)
    attention_mask = torch.ones_like(ids)
    # Sample 2 is left-padded by 5 tokens (pad = eos = 2); its image token stays in the real part.
    ids[2, :5] = model.config.text_config.pad_token_id
    attention_mask[2, :5] = 0
    expected = _upstream(flamingo, ids, pixels, attention_mask=attention_mask)
    ours = _ours(model, ids, pixels, attention_mask=attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=ATOL, rtol=0)


def test_text_only_sample_differs_from_openflamingo_by_the_per_sample_flag(pair):
    """Why text-only samples are left out of the parity batches.

    OpenFlamingo applies every gated block to every sample: a sample without `<image>` gets a zero cross-attention
    output but still the `tanh(ff_gate) * ff(x)` residual. InfiMM multiplies both residuals by a per-sample flag
    (1 only if the sample holds an `<image>` token), so its text-only samples are exactly the bare language model.
    Samples with images agree with OpenFlamingo in the same batch.
    """
    model, flamingo = pair
    ids, pixels = _batch(model.config, with_text_only=True, seed=2)
    ours, upstream = _ours(model, ids, pixels), _upstream(flamingo, ids, pixels)
    torch.testing.assert_close(ours[:2], upstream[:2], atol=ATOL, rtol=0)

    with torch.no_grad():
        bare = standalone_lm(model)(input_ids=ids[2:]).logits[0]
    torch.testing.assert_close(ours[2], bare, atol=ATOL, rtol=0)
    assert (upstream[2] - bare).abs().max() > 100 * ATOL
