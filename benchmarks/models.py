"""The benchmarks' models: the medium and tiny shapes, InfiMM and the systems it is compared with, and their inputs.

Every system is built with random weights (fp32) from a config at the same dims, so the timings compare the
architectures, not checkpoints:

- ``infimm``: this package (EVA02-style timm tower, Perceiver resampler, gated cross-attention every 2 layers);
- ``bare``: the same Mistral alone (``MistralForCausalLM``, same dims), the denominator of every decode ratio;
- ``idefics``: transformers' ``IdeficsForVisionText2Text`` at the closest dims (its LM is Llama-based: same width,
  layers and MLP, but full multi-head attention since it has no key/value-head setting);
- ``llava``: ``LlavaForConditionalGeneration`` with the same Mistral and a CLIP tower of the EVA's size; every
  vision patch becomes one LM token, so its sequence grows with the images.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SYSTEMS = ("infimm", "bare", "idefics", "llava")
LABELS = {
    "infimm": "InfiMM (this package)",
    "bare": "bare LM (Mistral)",
    "idefics": "IDEFICS (transformers)",
    "llava": "LLaVA-style (transformers)",
}

BOS, EOS = 1, 2
EOC_TOKEN, MEDIA_TOKEN = 32000, 32001
GATE = 0.5  # every gated block's gates, opened from their initial 0 so the cross-attention path is real work

# Shapes. The "medium" config: EVA02-style tower width 256, 4 blocks, 224 px; Mistral hidden 1024, 8 layers,
# 16 heads / 4 kv heads, MLP 2816, vocab 32002; cross-attention every 2 layers; the resampler and the
# cross-attention keep the preset's shape (6 layers, 64 latents, 8 heads x 64).
MEDIUM = {
    "name": "medium",
    "text": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
             "num_key_value_heads": 4, "vocab_size": 32002, "max_position_embeddings": 4096},
    "vision": {"img_size": 224, "patch_size": 14, "embed_dim": 256, "depth": 4, "num_heads": 4},
    "connector": {"resampler_depth": 6, "resampler_num_latents": 64, "resampler_heads": 8, "resampler_head_dim": 64,
                  "cross_attn_every_n_layers": 2, "cross_attn_heads": 8, "cross_attn_head_dim": 64},
    "prompt_tokens": 64,
    "new_tokens": 64,
}
# A few-second version of the same layout (for the smoke tests): the code paths are those of MEDIUM.
TINY = {
    "name": "tiny",
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 32002, "max_position_embeddings": 512},
    "vision": {"img_size": 28, "patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "connector": {"resampler_depth": 2, "resampler_num_latents": 4, "resampler_heads": 2, "resampler_head_dim": 8,
                  "cross_attn_every_n_layers": 2, "cross_attn_heads": 2, "cross_attn_head_dim": 8},
    "prompt_tokens": 32,
    "new_tokens": 4,
}


def dims_for(tiny: bool) -> dict:
    """A private copy of the TINY or MEDIUM shapes (callers adjust it)."""
    return copy.deepcopy(TINY if tiny else MEDIUM)


# ----------------------------------------------------------------------------------------------- model builders
def import_infimm():
    """The `infimm` package, installed or (from a checkout without installing it) loaded from the repository root."""
    try:
        import infimm
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "infimm", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
        )
        infimm = importlib.util.module_from_spec(spec)
        sys.modules["infimm"] = infimm
        spec.loader.exec_module(infimm)
    return infimm


def infimm_config(dims):
    infimm = import_infimm()
    return infimm.InfiMMConfig.from_preset(
        "infimm-zephyr", vision_config={"model_args": dict(dims["vision"])}, text_config=dict(dims["text"]),
        **dims["connector"],
    )


def build_infimm(dims, gate: float = GATE):
    import torch

    infimm = import_infimm()
    torch.manual_seed(0)
    model = infimm.InfiMMForConditionalGeneration(infimm_config(dims)).eval()
    # Gates start at 0; open them so the cross-attention path is real work, as after training.
    for block in model.model.cross_attention_layers.values():
        block.attn_gate.data.fill_(gate)
        block.ff_gate.data.fill_(gate)
    return model


def build_bare(dims):
    import torch
    from transformers import MistralForCausalLM

    torch.manual_seed(1)
    return MistralForCausalLM(copy.deepcopy(infimm_config(dims).text_config)).eval()


def build_idefics(dims, gate: float = GATE):
    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    text, vision, conn = dims["text"], dims["vision"], dims["connector"]
    config = IdeficsConfig(
        vocab_size=text["vocab_size"] - 2,
        additional_vocab_size=2,  # <|endofchunk|> and <image>, as InfiMM's 32000 + 2
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],  # no kv-head setting: full multi-head attention
        max_position_embeddings=text["max_position_embeddings"],
        rms_norm_eps=1e-5,
        cross_layer_interval=conn["cross_attn_every_n_layers"],
        use_resampler=True,
        perceiver_config={
            "use_resampler": True, "resampler_n_latents": conn["resampler_num_latents"],
            "resampler_depth": conn["resampler_depth"], "resampler_n_heads": conn["resampler_heads"],
            "resampler_head_dim": conn["resampler_head_dim"],
        },
        vision_config={
            "embed_dim": vision["embed_dim"], "image_size": vision["img_size"], "patch_size": vision["patch_size"],
            "num_hidden_layers": vision["depth"], "num_attention_heads": vision["num_heads"],
            "intermediate_size": 4 * vision["embed_dim"],
        },
        pad_token_id=EOS, bos_token_id=BOS, eos_token_id=EOS,
    )
    torch.manual_seed(2)
    model = IdeficsForVisionText2Text(config).eval()
    for block in model.model.gated_cross_attn_layers:
        block.alpha_cross_attn.data.fill_(gate)
        block.alpha_dense.data.fill_(gate)
    return model


def llava_tokens_per_image(dims) -> int:
    return (dims["vision"]["img_size"] // dims["vision"]["patch_size"]) ** 2  # CLS dropped ("default")


def build_llava(dims):
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = dims["vision"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision["embed_dim"], intermediate_size=4 * vision["embed_dim"],
            num_hidden_layers=vision["depth"], num_attention_heads=vision["num_heads"],
            image_size=vision["img_size"], patch_size=vision["patch_size"],
        ),
        text_config=copy.deepcopy(infimm_config(dims).text_config),
        image_token_index=MEDIA_TOKEN,
        image_seq_length=llava_tokens_per_image(dims),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(3)
    return LlavaForConditionalGeneration(config).eval()


BUILDERS = {"infimm": build_infimm, "bare": build_bare, "idefics": build_idefics, "llava": build_llava}


def model_info(model) -> dict:
    """What the reports say about a built model: its size and the LM's attention implementation."""
    return {"parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "attn_implementation": model.config.get_text_config()._attn_implementation}


def build_processor(config):
    """The InfiMM processor for `config` (its image size and token ids) with the release's tokenizer, bundled in
    the package, so prompts come from the real chat template and tokenizer."""
    infimm = import_infimm()
    from infimm.hub_infimm import bundled_tokenizer

    return infimm.InfiMMProcessor.from_config(config, bundled_tokenizer("infimm-zephyr"))


# ------------------------------------------------------------------------------------------------------ inputs
def prompt_ids(num_images: int, batch: int, length: int, seed: int = 0):
    """(batch, length) token ids in the Flamingo layout `<image>text<|endofchunk|><image>text...`, BOS first.

    The `<image>` tokens sit at evenly spaced positions, the first right after BOS; every other token is random
    ordinary text.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, EOC_TOKEN, (batch, length), generator=gen)
    ids[:, 0] = BOS
    if num_images:
        step = (length - 1) // num_images
        if step < 2:
            raise ValueError(f"A {length}-token prompt cannot hold {num_images} images; raise --prompt-tokens.")
        for i in range(num_images):
            ids[:, 1 + i * step] = MEDIA_TOKEN
            if i:
                ids[:, i * step] = EOC_TOKEN
    return ids


def make_inputs(system: str, dims, num_images: int, batch: int, device):
    """Keyword arguments of `generate()` for one case; every system gets the same text."""
    import torch

    length = dims["prompt_tokens"]
    ids = prompt_ids(num_images, batch, length)
    size = dims["vision"]["img_size"]
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, num_images, 3, size, size, generator=gen)
    if system == "bare":
        text = prompt_ids(0, batch, length)  # same length, no image or chunk tokens
        inputs = {"input_ids": text}
    elif system == "infimm":
        inputs = {"input_ids": ids}
        if num_images:
            inputs.update(pixel_values=pixels, image_mask=torch.ones(batch, num_images, dtype=torch.bool))
    elif system == "idefics":
        # IDEFICS marks images by a (batch, tokens, images) mask, not by token ids: each token sees the latest
        # image at or before it. Its processor always sends at least one image slot; a text-only prompt gets a
        # zero image that no token attends to (and that it still encodes).
        slots = max(num_images, 1)
        media_index = (ids == MEDIA_TOKEN).cumsum(1)
        mask = torch.nn.functional.one_hot(media_index, slots + 1)[..., 1:].long()
        if num_images == 0:
            pixels = torch.zeros(batch, 1, 3, size, size)
        inputs = {"input_ids": ids, "pixel_values": pixels, "image_attention_mask": mask}
    elif system == "llava":
        # One LM token per vision patch: each `<image>` becomes `llava_tokens_per_image` image tokens.
        per_image = llava_tokens_per_image(dims)
        rows = []
        for row in ids:
            parts = [torch.full((per_image,), MEDIA_TOKEN) if t == MEDIA_TOKEN else t.view(1) for t in row]
            rows.append(torch.cat(parts))
        inputs = {"input_ids": torch.stack(rows)}
        if num_images:
            inputs["pixel_values"] = pixels.flatten(0, 1)
    else:
        raise ValueError(f"Unknown system {system!r}; choose from {SYSTEMS}.")
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return {k: v.to(device) for k, v in inputs.items()}
