"""The model card (`README.md`) of a converted folder: Hub metadata, what the model is, how to use it, and the
results the InfiMM paper and model card report for its variant."""

from dataclasses import dataclass

from huggingface_hub import ModelCard, ModelCardData

from infimm.hub_infimm import compatibility_section


@dataclass(frozen=True)
class Variant:
    release: str  # the original Hub repository of the release
    llm: str
    llm_name: str
    vision_name: str
    # Pretrained model: COCO, Flickr30K (CIDEr), VQAv2, TextVQA, OK-VQA (accuracy); 0-shot then 4-shot.
    pretrained: tuple[tuple[float, ...], tuple[float, ...]]
    # Chat model: ScienceQA-Img, MME P, MME C, MM-Vet, InfiMM-Eval, MMBench, MMMU-val, MMMU-test.
    chat: tuple[float, ...]


VARIANTS = {
    "infimm-zephyr": Variant(
        "Infi-MM/infimm-zephyr", "HuggingFaceH4/zephyr-7b-beta", "Zephyr-7B-beta", "EVA02-CLIP-L-14-336",
        ((78.8, 60.7, 33.7, 15.2, 17.1), (108.6, 71.9, 59.1, 34.3, 50.5)),
        (71.1, 1406, 327, 32.8, 36.0, 59.7, 39.4, 35.5),
    ),
    "infimm-llama13b": Variant(
        "Infi-MM/infimm-llama13b", "meta-llama/Llama-2-13b-hf", "Llama-2-13B", "EVA01-CLIP-g-14",
        ((85.4, 54.6, 51.6, 24.2, 26.4), (125.2, 87.1, 66.1, 38.2, 55.5)),
        (73.0, 1444.5, 337.6, 39.2, 41.4, 66.4, 39.1, 35.2),
    ),
    "infimm-vicuna13b": Variant(
        "Infi-MM/infimm-vicuna13b", "lmsys/vicuna-13b-v1.5", "Vicuna-13B-v1.5", "EVA02-CLIP-bigE-14",
        ((69.6, 49.6, 60.4, 32.8, 49.2), (118.1, 81.4, 64.2, 38.4, 53.7)),
        (74.0, 1461.2, 323.5, 36.0, 40.0, 66.7, 37.6, 34.6),
    ),
}

# Pretraining data named by the release's model card.
RELEASE_DATASETS = ["HuggingFaceM4/OBELICS", "laion/laion2B-en", "coyo-700m", "mmc4"]
RELEASE_LICENSE = "cc-by-nc-4.0"

_PRETRAINED_COLUMNS = ("COCO", "Flickr30K", "VQAv2", "TextVQA", "OK-VQA")
_CHAT_COLUMNS = ("ScienceQA-Img", "MME P", "MME C", "MM-Vet", "InfiMM-Eval", "MMBench", "MMMU val", "MMMU test")


def _table(columns, rows) -> str:
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + label + " | " + " | ".join(f"{value:g}" for value in values) + " |" for label, values in rows]
    return "\n".join(lines)


def _results(variant: Variant) -> str:
    pretrained = _table(_PRETRAINED_COLUMNS, [("0-shot", variant.pretrained[0]), ("4-shot", variant.pretrained[1])])
    chat = _table(_CHAT_COLUMNS, [("chat model", variant.chat)])
    return (
        "## Reported results\n\n"
        f"As reported by the InfiMM authors for the {variant.llm_name} variant (not re-measured here).\n\n"
        "Pretrained model: COCO and Flickr30K CIDEr, VQAv2 / TextVQA / OK-VQA accuracy.\n\n"
        f"{pretrained}\n\n"
        "Instruction-tuned (chat) model:\n\n"
        f"{chat}\n"
    )


def build_model_card(
    *,
    name: str,
    config,
    variant: str | None,
    license: str,
    base_model: str | None,
    source: str,
    dropped: dict[str, int],
    dtype: str | None,
    fresh_connector: bool = False,
) -> ModelCard:
    """`name` is the repository id (or folder name) used in the usage snippet; `dropped` counts left-out tensors
    by reason; `source` says what was converted; `dtype` is the requested output dtype (None: kept per tensor)."""
    info = VARIANTS.get(variant) if variant else None
    data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        tags=["infimm", "flamingo", "vision-language", "multimodal", "custom_code"],
        datasets=RELEASE_DATASETS if info else None,
        language=["en"],
    )
    text, vision = config.text_config, config.vision_config
    layers = config.cross_attention_layers
    architecture = (
        "| part | this model |\n|---|---|\n"
        f"| language model | {text.model_type}, {text.num_hidden_layers} layers, hidden {text.hidden_size} |\n"
        f"| vision tower | timm `{vision.architecture}` ({vision.model_args.get('depth', '?')} blocks, width "
        f"{config.vision_hidden_size}), {config.image_size} px |\n"
        f"| resampler | {config.resampler_depth} layers, {config.resampler_num_latents} latents, "
        f"{config.resampler_heads} x {config.resampler_head_dim} heads |\n"
        f"| gated cross-attention | {len(layers)} blocks, before decoder layers "
        f"{', '.join(map(str, layers[:3]))}{', ...' if len(layers) > 3 else ''}, {config.cross_attn_heads} x "
        f"{config.cross_attn_head_dim} heads |\n"
    )
    left_out = "".join(f"- {count} tensors: {reason}\n" for reason, count in sorted(dropped.items()))
    notes = []
    if fresh_connector:
        notes.append(
            "The resampler and the gated cross-attention are freshly initialised (gates at 0): this is a starting "
            "point for pretraining, not a trained model. Until trained it answers like its language model alone."
        )
    if info is None:
        notes.append("This is not one of the released InfiMM variants; no results are reported for it.")
    title = name.rstrip("/").split("/")[-1]
    stored = (f"Every tensor of the source is here, cast to {dtype}," if dtype else
              "Every tensor of the source is here bit for bit, in its own dtype,")
    body = f"""
# {title}

InfiMM is a Flamingo-style vision-language model: an EVA-CLIP vision tower, a Perceiver resampler turning each
image into {config.resampler_num_latents} latents, and gated cross-attention blocks inserted into a
{info.llm_name if info else text.model_type} language model{f" ({info.vision_name} vision encoder)" if info else ""}.
Text is interleaved with `<image>` tokens; each token attends to the latest image before it.

{chr(10).join(notes)}

{architecture}
## Usage

```python
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True, dtype=torch.bfloat16)
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)

messages = [{{"role": "user", "content": [
    {{"type": "image", "image": "photo.jpg"}},
    {{"type": "text", "text": "Please explain this image to me."}},
]}}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
).to(model.device, dtype=model.dtype)
output = model.generate(**inputs, max_new_tokens=256)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```

Needs `transformers`, `timm` and `torch`; the model code travels with the weights (`trust_remote_code=True`).

{compatibility_section()}
{_results(info) if info else ""}
## Conversion

Converted from {source} into sharded safetensors. {stored} except these, left out on purpose:

{left_out or "- none"}

## License

{"The released InfiMM weights are licensed CC BY-NC 4.0 (non-commercial)." if license == RELEASE_LICENSE else
 f"License: `{license}`; check the licenses of the language model and vision tower this model was built from."}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


__all__ = ["VARIANTS", "Variant", "build_model_card", "RELEASE_LICENSE", "RELEASE_DATASETS"]
