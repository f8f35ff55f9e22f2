"""The release's `config.json`: every field is honoured or refused.

The release builds its vision tower with EVA-CLIP's `EVAVisionTransformer` from the `visual` block. For every field
that changes the math, a tiny release-style config with a value other than the release's default builds (through
`InfiMMConfig`, as the model does) a timm tower whose structure and output are checked against this file's own
hand-written EVA-CLIP forward (`eva_clip_tokens`) and rotary tables (`eva_clip_rope`), written from EVA-CLIP's
formulas, with the same weights. Values the tower cannot express, contradictions and unknown keys must raise a
`ValueError` naming the field. The real release config must build exactly timm's `eva02_large_patch14_clip_336`.
End to end, a tiny release snapshot with a non-default rotary reference grid converts and loads with that grid, also
as remote code in a process without the package.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.eva import EvaBlock, EvaBlockPostNorm
from torch import nn
from transformers import AutoModel

import convert_fixtures as fixtures
from conftest import RELEASE_DIR, REPO, tiny_model
from helpers_modeling import one_torch_thread, save_remote_code_folder  # noqa: F401  (autouse fixture)

from infimm.convert_weights import Options, convert, load_legacy_model
from infimm import InfiMMConfig, InfiMMForConditionalGeneration


# A tiny tower with EVA02-CLIP-L's switches (the release's zephyr tower): 28 px, patch 14, width 32, 2 blocks.
BASE_VISUAL = {
    "image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14, "mlp_ratio": 2.6667,
    "eva_model_name": "eva-clip-l-14-336", "drop_path_rate": 0.0, "xattn": False, "fusedLN": True, "rope": True,
    "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True, "subln": True, "embed_dim": 24,
}
# EVA-CLIP `CLIPVisionCfg` defaults of the switches, where a field is absent.
RELEASE_DEFAULTS = {"qkv_bias": True, "ls_init_value": None, "rope": False, "pt_hw_seq_len": 16, "intp_freq": False,
                    "postnorm": False, "naiveswiglu": False, "subln": False}
EPS = 1e-6  # EVA-CLIP's LayerNorm eps


def release_config(visual=None, language=None, **top) -> dict:
    """A release-style config.json (written by hand, as the release lays it out) with a tiny Mistral."""
    config = {
        "_name_or_path": "./", "architectures": ["InfiMMZephyrModel"],
        "auto_map": {"AutoConfig": "configuration_infimm_zephyr.InfiMMConfig",
                     "AutoModelForCausalLM": "modeling_infimm_zephyr.InfiMMZephyrModel"},
        "model_type": "infimm-zephyr", "seq_length": 1024, "tokenizer_type": "LlamaTokenizer",
        "torch_dtype": "float32", "transformers_version": "4.35.2", "use_cache": True, "use_flash_attn": False,
        "cross_attn_every_n_layers": 2, "use_grad_checkpoint": False, "freeze_llm": True,
        "image_token_id": 32001, "eoc_token_id": 32000,
        "visual": {**BASE_VISUAL, **(visual or {})},
        "language": {
            "_name_or_path": "HuggingFaceH4/zephyr-7b-beta", "architectures": ["MistralForCausalLM"],
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
            "intermediate_size": 128, "max_position_embeddings": 512, "model_type": "mistral",
            "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2, "pad_token_id": 2,
            "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
            "torch_dtype": "float32", "transformers_version": "4.35.0", "use_cache": True, "vocab_size": 32002,
            **(language or {}),
        },
    }
    config.update(top)
    return config


def without(mapping: dict, *keys) -> dict:
    return {key: value for key, value in mapping.items() if key not in keys}


def build_tower(release: dict, seed: int = 0) -> nn.Module:
    """The timm tower the model builds from the mapped config, every parameter random (no init value hides a
    misplaced norm, bias or layer scale)."""
    config = InfiMMConfig.from_dict(release)
    tower = AutoModel.from_config(config.vision_config).timm_model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tower.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return tower


# ------------------------------------------------------------------------------- EVA-CLIP, written out by hand
def eva_clip_rope(head_width: int, pt_hw_seq_len: int, grid: int, intp_freq: bool):
    """EVA-CLIP `VisionRotaryEmbeddingFast` (dim = head_width / 2, theta 10000) as built by `EVAVisionTransformer`
    (ft_seq_len = grid when `intp_freq`, else pt_hw_seq_len): (sin, cos), each (ft * ft, head_width)."""
    dim = head_width // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    ft = grid if intp_freq else pt_hw_seq_len
    t = torch.arange(ft) / ft * pt_hw_seq_len
    freqs = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (ft, dim): f0 f0 f1 f1 ...
    freqs = torch.cat([freqs[:, None, :].expand(ft, ft, dim), freqs[None, :, :].expand(ft, ft, dim)], dim=-1)
    return freqs.sin().reshape(ft * ft, -1), freqs.cos().reshape(ft * ft, -1)


def _rotate_pairs(x):
    """EVA-CLIP's `rotate_half`: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def _ln(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, EPS)


def _qkv(attn):
    """(wq, wk, wv, bq, bv) of a timm attention, fused or not; biases None where there are none."""
    if attn.qkv is not None:
        wq, wk, wv = attn.qkv.weight.chunk(3)
        return wq, wk, wv, attn.q_bias, attn.v_bias
    assert attn.k_proj.bias is None  # EVA-CLIP has no k bias
    return attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.q_proj.bias, attn.v_proj.bias


def _layer_scale(v: dict) -> bool:
    """EVA-CLIP's blocks get gamma_1 / gamma_2 only for an `ls_init_value` above 0."""
    return v["ls_init_value"] is not None and v["ls_init_value"] > 0


def eva_clip_tokens(tower, pixels, visual: dict):
    """EVA-CLIP's forward up to the last block (the release's math), driven by the release fields `visual` (defaults
    applied) and reading the weights off `tower`: every token, final norm not applied."""
    v = {**RELEASE_DEFAULTS, **visual}
    heads, head_width, patch = v["width"] // v["head_width"], v["head_width"], v["patch_size"]
    grid = v["image_size"] // patch
    x = F.conv2d(pixels, tower.patch_embed.proj.weight, tower.patch_embed.proj.bias, stride=patch)
    x = x.flatten(2).transpose(1, 2)  # (B, grid * grid, width)
    x = torch.cat([tower.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + tower.pos_embed
    sin, cos = eva_clip_rope(head_width, v["pt_hw_seq_len"], grid, v["intp_freq"]) if v["rope"] else (None, None)

    def attention(block, h):
        wq, wk, wv, bq, bv = _qkv(block.attn)
        split = lambda t: t.unflatten(-1, (heads, head_width)).transpose(1, 2)  # noqa: E731  (B, heads, N, hd)
        q, k, val = split(F.linear(h, wq, bq)), split(F.linear(h, wk)), split(F.linear(h, wv, bv))
        if sin is not None:  # the CLS token gets no rotary embedding
            q = torch.cat([q[:, :, :1], q[:, :, 1:] * cos + _rotate_pairs(q[:, :, 1:]) * sin], dim=2)
            k = torch.cat([k[:, :, :1], k[:, :, 1:] * cos + _rotate_pairs(k[:, :, 1:]) * sin], dim=2)
        weights = (q @ k.transpose(-2, -1) * head_width ** -0.5).softmax(-1)
        out = (weights @ val).transpose(1, 2).flatten(2)
        if v["subln"]:
            out = _ln(out, block.attn.norm)  # inner_attn_ln
        return F.linear(out, block.attn.proj.weight, block.attn.proj.bias)

    def mlp(block, h):
        m = block.mlp
        if v["naiveswiglu"]:  # w1 gated by SiLU, times w2, (ffn_ln), w3
            hidden = F.silu(F.linear(h, m.fc1_g.weight, m.fc1_g.bias)) * F.linear(h, m.fc1_x.weight, m.fc1_x.bias)
        else:  # fc1, exact GELU, (ffn_ln), fc2
            hidden = F.gelu(F.linear(h, m.fc1.weight, m.fc1.bias))
        if v["subln"]:
            hidden = _ln(hidden, m.norm)
        return F.linear(hidden, m.fc2.weight, m.fc2.bias)

    for block in tower.blocks:
        if v["postnorm"]:
            x = x + _ln(attention(block, x), block.norm1)
            x = x + _ln(mlp(block, x), block.norm2)
        elif _layer_scale(v):
            x = x + block.gamma_1 * attention(block, _ln(x, block.norm1))
            x = x + block.gamma_2 * mlp(block, _ln(x, block.norm2))
        else:
            x = x + attention(block, _ln(x, block.norm1))
            x = x + mlp(block, _ln(x, block.norm2))
    return x


def tower_tokens(tower, pixels):
    """What the built tower computes up to its last block (InfiMM's features)."""
    captured = {}
    handle = tower.blocks[-1].register_forward_hook(lambda module, args, output: captured.update(out=output))
    try:
        tower.forward_features(pixels)
    finally:
        handle.remove()
    return captured["out"]


def check_structure(tower, visual: dict):
    """The module tree that the release's fields describe."""
    v = {**RELEASE_DEFAULTS, **visual}
    heads, hidden = v["width"] // v["head_width"], int(v["width"] * v["mlp_ratio"])
    grid = v["image_size"] // v["patch_size"]
    assert tower.patch_embed.proj.weight.shape == (v["width"], 3, v["patch_size"], v["patch_size"])
    assert tower.pos_embed.shape == (1, 1 + grid * grid, v["width"])
    assert len(tower.blocks) == v["layers"]
    assert (tower.rope is not None) == v["rope"]
    for block in tower.blocks:
        assert type(block) is (EvaBlockPostNorm if v["postnorm"] else EvaBlock)
        attn, mlp = block.attn, block.mlp
        assert (attn.num_heads, attn.head_dim) == (heads, v["head_width"])
        assert isinstance(attn.norm, nn.LayerNorm) == v["subln"]
        assert isinstance(mlp.norm, nn.LayerNorm) == v["subln"]
        biases = _qkv(attn)[3:]
        assert all((b is not None) == v["qkv_bias"] for b in biases)
        if v["naiveswiglu"]:
            assert mlp.fc1_g.out_features == mlp.fc1_x.out_features == hidden and isinstance(mlp.act, nn.SiLU)
        else:
            assert mlp.fc1.out_features == hidden and isinstance(mlp.act, nn.GELU)
        assert mlp.fc2.in_features == hidden
        assert (getattr(block, "gamma_1", None) is not None) == _layer_scale(v)
        for norm in (block.norm1, block.norm2):
            assert isinstance(norm, nn.LayerNorm) and norm.eps == EPS


# ------------------------------------------------------------------------------------------- every field
# Each case: release fields (over BASE_VISUAL) holding a value other than the release's default or BASE_VISUAL's.
FIELD_CASES = {
    "zephyr_switches": {},  # rope + intp_freq, naiveswiglu, subln, qkv_bias, as in the release
    "pt_hw_seq_len": {"pt_hw_seq_len": 5},
    "intp_freq_false": {"intp_freq": False, "pt_hw_seq_len": 2},  # positions arange(2) on a 2x2 grid
    "rope_false": {"rope": False, "intp_freq": False},
    "postnorm": {"postnorm": True},
    "postnorm_gelu": {"postnorm": True, "naiveswiglu": False, "subln": False, "rope": False, "intp_freq": False},
    "naiveswiglu_without_subln": {"subln": False},
    "subln_without_swiglu": {"naiveswiglu": False},
    "plain_mlp": {"naiveswiglu": False, "subln": False},
    "mlp_ratio": {"mlp_ratio": 3.5},
    "head_width": {"head_width": 8},
    "layers": {"layers": 3},
    "width": {"width": 48},
    "image_size": {"image_size": 42},
    "patch_size": {"patch_size": 7},
    "qkv_bias_false": {"qkv_bias": False},
    "qkv_bias_false_fused": {"qkv_bias": False, "subln": False},
    "ls_init_value": {"ls_init_value": 0.1},
    "ls_init_value_zero": {"ls_init_value": 0.0},  # EVA-CLIP: no layer scale
}


@pytest.mark.parametrize("case", FIELD_CASES)
def test_each_field_builds_the_tower_the_release_computes(case):
    visual = {**BASE_VISUAL, **FIELD_CASES[case]}
    tower = build_tower(release_config(visual=visual))
    check_structure(tower, visual)
    pixels = torch.randn(2, 3, visual["image_size"], visual["image_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = tower_tokens(tower, pixels), eva_clip_tokens(tower, pixels, visual)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("pt_hw_seq_len, intp_freq, image_size", [(5, True, 28), (16, True, 42), (3, False, 42),
                                                                   (7, True, 70)])
def test_rotary_tables_follow_the_reference_grid(pt_hw_seq_len, intp_freq, image_size):
    visual = {"pt_hw_seq_len": pt_hw_seq_len, "intp_freq": intp_freq, "image_size": image_size}
    tower = build_tower(release_config(visual=visual))
    sin, cos = eva_clip_rope(16, pt_hw_seq_len, image_size // 14, intp_freq)
    table_sin, table_cos = tower.rope.get_embed().chunk(2, dim=-1)
    torch.testing.assert_close(table_sin, sin, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(table_cos, cos, atol=1e-6, rtol=1e-6)
    # ... and the default grid's tables differ (the bug: any `pt_hw_seq_len` used to load as 16).
    if pt_hw_seq_len != 16:
        assert (eva_clip_rope(16, 16, image_size // 14, True)[0] - sin).abs().max() > 0.1


def test_absent_switches_take_the_release_defaults():
    # EVA-CLIP's own config for EVA01-CLIP-g names none of the rope / SwiGLU switches: all off, q and v biases on.
    visual = without(BASE_VISUAL, "rope", "pt_hw_seq_len", "intp_freq", "naiveswiglu", "subln")
    release = release_config()
    release["visual"] = visual
    tower = build_tower(release)
    check_structure(tower, visual)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(tower_tokens(tower, pixels), eva_clip_tokens(tower, pixels, visual),
                                   atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("field, value", [("xattn", True), ("fusedLN", False), ("drop_path_rate", 0.4),
                                          ("patch_dropout", 0.5), ("embed_dim", 1024),
                                          ("eva_model_name", "EVA02-CLIP-L-14-336")])
def test_fields_without_effect_at_inference_change_nothing(field, value):
    plain = InfiMMConfig.from_dict(release_config()).vision_config
    other = InfiMMConfig.from_dict(release_config(visual={field: value})).vision_config
    assert (other.architecture, other.model_args) == (plain.architecture, plain.model_args)


def test_the_eva_model_name_only_picks_the_factory():
    # Three labels, three timm factories, one set of fields: one tower (every argument is passed explicitly).
    towers = [build_tower(release_config(visual={"eva_model_name": name})) for name in
              ("eva-clip-l-14-336", "vit-g-224", "eva-clip-4b-14-x")]
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outputs = [tower_tokens(tower, pixels) for tower in towers]
    for tower, out in zip(towers[1:], outputs[1:]):
        assert repr(tower) == repr(towers[0])
        torch.testing.assert_close(out, outputs[0], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- the release
def _release_json() -> dict:
    return json.loads((RELEASE_DIR / "config.json").read_text())


def test_release_config_builds_exactly_eva02_large_patch14_clip_336():
    config = InfiMMConfig.from_pretrained(RELEASE_DIR)
    with torch.device("meta"):
        ours = AutoModel.from_config(config.vision_config).timm_model
        timm_own = timm.create_model("eva02_large_patch14_clip_336", pretrained=False, num_classes=0)
    assert repr(ours) == repr(timm_own)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in timm_own.state_dict().items()}
    assert ours.rope.ref_feat_shape == timm_own.rope.ref_feat_shape == (16, 16)

    # Same weights, same outputs: the release's fields at 336 px, cut to 2 blocks on both sides to stay small.
    release = _release_json()
    release["visual"]["layers"] = 2
    ours = build_tower(release)
    timm_own = timm.create_model("eva02_large_patch14_clip_336", pretrained=False, num_classes=0, depth=2).eval()
    timm_own.load_state_dict(ours.state_dict(), strict=True)
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(tower_tokens(ours, pixels), tower_tokens(timm_own, pixels), atol=0, rtol=0)
        torch.testing.assert_close(ours.rope.get_embed(), timm_own.rope.get_embed(), atol=0, rtol=0)


def test_release_top_level_and_language_keys_are_read():
    release = release_config(
        cross_attn_every_n_layers=4, image_token_id=32000, eoc_token_id=32001, torch_dtype="bfloat16",
        use_cache=False, resampler_depth=1, resampler_num_latents=3,
    )
    language = without(release["language"], "sliding_window")  # not a Llama field
    language.update(torch_dtype="bfloat16", use_cache=False, rope_theta=500000.0, rms_norm_eps=1e-6,
                    _name_or_path="lmsys/vicuna-13b-v1.5", model_type="llama", architectures=["LlamaForCausalLM"])
    release["language"] = language
    config = InfiMMConfig.from_dict(release)
    assert config.cross_attention_layers == [3]
    assert (config.media_token_id, config.eoc_token_id) == (32000, 32001)
    assert config.dtype == torch.bfloat16 and config.chat_format == "vicuna"
    assert (config.resampler_depth, config.resampler_num_latents) == (1, 3)
    text = config.text_config
    assert text.model_type == "llama" and text.use_cache is False
    assert text.rope_parameters["rope_theta"] == 500000.0 and text.rms_norm_eps == 1e-6
    # Dropped with a reason (training switches, remote-code names, bookkeeping): not carried as attributes.
    for key in ("seq_length", "tokenizer_type", "use_flash_attn", "use_grad_checkpoint", "freeze_llm", "auto_map",
                "image_token_id", "visual", "language"):
        assert not hasattr(config, key), key
    assert "torch_dtype" not in text.to_dict() and text.architectures is None


def test_mapped_config_round_trips(tmp_path):
    config = InfiMMConfig.from_dict(release_config(visual={"pt_hw_seq_len": 5, "ls_init_value": 0.1}))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "visual" not in saved and saved["vision_config"]["model_args"]["ref_feat_shape"] == [5, 5]
    reloaded = InfiMMConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.vision_config.model_args == config.vision_config.model_args
    for preset in ("infimm-zephyr", "infimm-llama13b", "infimm-vicuna13b"):
        original = InfiMMConfig.from_preset(preset)
        assert InfiMMConfig.from_dict(json.loads(json.dumps(original.to_dict()))).to_dict() == original.to_dict()


# --------------------------------------------------------------------------------------------- refusals
REFUSED_VISUAL = [
    ({"intp_freq": False}, "pt_hw_seq_len"),  # a 16x16 table for a 2x2 grid
    ({"rope": False}, "intp_freq"),  # interpolating a rotary embedding that is off
    ({"rope": False, "intp_freq": False, "pt_hw_seq_len": 7}, "pt_hw_seq_len"),
    ({"head_width": 12}, "head_width"),  # 32 is no whole number of 12-wide heads
    ({"width": 36, "head_width": 6}, "head_width"),  # rope needs head widths divisible by 4
    ({"image_size": 30}, "image_size"),
    ({"patch_size": 0}, "patch_size"),
    ({"layers": [3, 4, 6, 3]}, "layers"),  # a ResNet's
    ({"mlp_ratio": "4"}, "mlp_ratio"),
    ({"rope": "yes"}, "rope"),
    ({"ls_init_value": "1e-5"}, "ls_init_value"),
    ({"ls_init_value": 0.1, "postnorm": True}, "ls_init_value"),
    ({"postnorm": True, "subln": False}, "naiveswiglu"),
    ({"timm_model_name": "vit_base_patch16_224"}, "timm_model_name"),
    ({"global_average_pool": True}, "global_average_pool"),
    ({"eva_model_name": "eva-clip-b-16-x"}, "eva_model_name"),
    ({"use_rel_pos_bias": True}, "use_rel_pos_bias"),  # unknown key
]


@pytest.mark.parametrize("visual, field", REFUSED_VISUAL)
def test_visual_values_the_tower_cannot_express_are_refused(visual, field):
    with pytest.raises(ValueError, match=field) as caught:
        InfiMMConfig.from_dict(release_config(visual=visual))
    assert "visual" in str(caught.value)


def test_missing_shape_field_is_refused():
    release = release_config()
    del release["visual"]["mlp_ratio"]
    with pytest.raises(ValueError, match="mlp_ratio"):
        InfiMMConfig.from_dict(release)


def _edited(edit):
    release = release_config()
    edit(release)
    return release


REFUSED_RELEASE = [
    (lambda c: c.update(use_xformers=True), "use_xformers"),  # unknown top-level key
    (lambda c: c.pop("cross_attn_every_n_layers"), "cross_attn_every_n_layers"),
    (lambda c: c.update(image_token_id="32001"), "image_token_id"),
    (lambda c: c["language"].update(rope_thetas=1e6), "rope_thetas"),  # misspelt language key
    (lambda c: c["language"].update(model_type="gpt2"), "model_type"),
    (lambda c: c["language"].pop("model_type"), "model_type"),
    (lambda c: c["language"].update(torch_dtype="float16"), "torch_dtype"),
    (lambda c: c.update(use_cache=False), "use_cache"),
]


@pytest.mark.parametrize("edit, field", REFUSED_RELEASE)
def test_unknown_or_contradictory_release_keys_are_refused(edit, field):
    with pytest.raises(ValueError, match=field):
        InfiMMConfig.from_dict(_edited(edit))


def test_refusal_also_reaches_from_pretrained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(release_config(visual={"intp_freq": False})))
    with pytest.raises(ValueError, match="pt_hw_seq_len.*intp_freq"):
        InfiMMConfig.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------- end to end
GRID = 5  # reference grid of the snapshot below (the release's default is 16)


@pytest.fixture(scope="module")
def odd_grid(tmp_path_factory):
    """A tiny model whose tower's rotary reference grid is 5x5, written as a release snapshot, converted."""
    root = tmp_path_factory.mktemp("odd-grid")
    tiny_tower = {"img_size": 28, "patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2}
    model = tiny_model(gates=1.0, text_config={"initializer_range": 0.05},
                       vision_config={"model_args": {**tiny_tower, "ref_feat_shape": [GRID, GRID]}})
    ids = torch.randint(3, 32000, (1, 10), generator=torch.Generator().manual_seed(0))
    ids[0, 2] = model.config.media_token_id
    pixels = torch.randn(1, 1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
    snapshot = fixtures.write_release_snapshot(model, root / "release", visual={"pt_hw_seq_len": GRID})
    convert(Options(input=snapshot, output=root / "converted"))
    return {"model": model, "snapshot": snapshot, "converted": root / "converted", "root": root,
            "inputs": {"input_ids": ids, "pixel_values": pixels}, "logits": logits}


def _grid_and_logits(model, inputs):
    tower = model.model.vision_tower.timm_model
    with torch.no_grad():
        return tower.rope, model(**inputs, use_cache=False).logits


def test_converted_snapshot_keeps_its_rotary_reference_grid(odd_grid):
    saved = json.loads((odd_grid["converted"] / "config.json").read_text())
    assert saved["vision_config"]["model_args"]["ref_feat_shape"] == [GRID, GRID]
    model = InfiMMForConditionalGeneration.from_pretrained(odd_grid["converted"]).eval()
    rope, logits = _grid_and_logits(model, odd_grid["inputs"])
    sin, cos = eva_clip_rope(16, GRID, 2, True)
    torch.testing.assert_close(rope.get_embed(), torch.cat([sin, cos], -1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits, odd_grid["logits"], atol=0, rtol=0)


def test_legacy_loader_keeps_the_rotary_reference_grid(odd_grid):
    model = load_legacy_model(InfiMMForConditionalGeneration, odd_grid["snapshot"]).eval()
    rope, logits = _grid_and_logits(model, odd_grid["inputs"])
    assert rope.ref_feat_shape == (GRID, GRID)
    torch.testing.assert_close(logits, odd_grid["logits"], atol=0, rtol=0)


CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["infimm"] = None  # only the folder's own remote code may be used

    import json
    import torch
    import transformers

    folder, release_file, inputs_file, results_file = sys.argv[1:]
    torch.set_num_threads(1)
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    release = json.loads(open(release_file).read())
    mapped = type(config).from_dict(release)
    try:
        type(config).from_dict({**release, "use_xformers": True})
        refusal = None
    except ValueError as error:
        refusal = str(error)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(**torch.load(inputs_file), use_cache=False).logits
    torch.save({
        "config_module": type(config).__module__,
        "ref_feat_shape": config.vision_config.model_args["ref_feat_shape"],
        "mapped_ref_feat_shape": mapped.vision_config.model_args["ref_feat_shape"],
        "refusal": refusal,
        "logits": logits,
    }, results_file)
    """
)


def test_remote_code_carries_the_release_rules(odd_grid):
    root = odd_grid["root"]
    folder = save_remote_code_folder(odd_grid["model"], root / "remote")
    for name in ("configuration_infimm.py", "release_infimm.py"):
        assert (folder / name).read_bytes() == (REPO / name).read_bytes(), name
    inputs_file, results_file = root / "inputs.pt", root / "results.pt"
    torch.save(odd_grid["inputs"], inputs_file)
    child = root / "child"
    child.mkdir()
    (child / "load.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.pop("PYTHONPATH", None)
    env.update(HF_HOME=str(root / "hf-home"), HF_MODULES_CACHE=str(root / "hf-modules"), HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, str(child / "load.py"), str(folder), str(odd_grid["snapshot"] / "config.json"),
         str(inputs_file), str(results_file)],
        cwd=child, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = torch.load(results_file)
    assert results["config_module"].startswith("transformers_modules.")
    assert results["ref_feat_shape"] == results["mapped_ref_feat_shape"] == [GRID, GRID]
    assert results["refusal"] is not None and "use_xformers" in results["refusal"]
    torch.testing.assert_close(results["logits"], odd_grid["logits"], atol=0, rtol=0)
