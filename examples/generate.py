"""Ask InfiMM about one or more images; the answer is streamed as it is generated.

    python examples/generate.py --model path/or/hub-id --image photo.jpg --prompt "What is in this picture?"
    python examples/generate.py --model path/or/hub-id --image a.jpg b.jpg --prompt "What differs between them?"
    python examples/generate.py --model Infi-MM/infimm-zephyr --image photo.jpg    # an original release, read directly
    python examples/generate.py    # no download: a small random-weight InfiMM, to check an installation

Without `--model` the script builds a scaled-down `infimm-zephyr` with random weights and the real tokenizer shipped
in the package, saves it as a Hub-style folder, loads it back through `AutoModelForImageTextToText` and `AutoProcessor`
with `trust_remote_code=True`, and generates. Its answer is noise: the point is that every step runs. The folder is
cached (`$HF_HOME/infimm/random-infimm-zephyr-seed<SEED>`, about 21 MB) and reused by later runs, and by chat.py and
few_shot.py; it is rebuilt when the package's code, the libraries or the recipe change. `--output DIR` builds it in
DIR instead.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from importlib.metadata import version
from pathlib import Path

import huggingface_hub.constants
import torch

import infimm
from infimm import InfiMMConfig, InfiMMForConditionalGeneration, InfiMMProcessor
from infimm.hub_infimm import bundled_tokenizer, sample_image_path, save_hub_folder
from infimm.release_infimm import is_legacy_config
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PretrainedConfig,
    TextStreamer,
)


RANDOM_WEIGHTS_NOTICE = (
    "NOTE: this model has RANDOM weights (no --model given), so the answer below is meaningless. It shows that "
    "building, saving, loading and generating work end to end."
)


def add_model_arguments(parser, max_new_tokens_default=None):
    """The options every example script shares: which model, where it runs, and how it samples."""
    parser.add_argument("--model", help="InfiMM folder or Hub repo id; omitted: a small random-weight model")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens_default,
                        help="default: %(default)s (None: the model's generation config; 20 for the random model)")
    parser.add_argument("--greedy", action="store_true", help="disable sampling (the release samples with top_p=0.5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--output", help="where to build the random model's folder (default: one cached folder, "
                                         "$HF_HOME/infimm/random-infimm-zephyr-seed<SEED>, reused by later runs)")
    parser.add_argument("--seed", type=int, default=0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image", nargs="+", help="image paths or http(s) URLs (default: the bundled sample chart)")
    parser.add_argument("--prompt", default="Please explain this image to me.")
    return parser.parse_args(argv)


def generate_overrides(args) -> dict:
    """`generate()` keyword arguments for `--max-new-tokens` / `--greedy`; the rest comes from the model's config."""
    overrides = {}
    if args.max_new_tokens is not None:
        overrides["max_new_tokens"] = args.max_new_tokens
    if args.greedy:
        overrides.update(do_sample=False, top_p=None, top_k=None)
    return overrides


def model_or_random(args) -> str:
    """`--model`; without it, the random-weight model: built in `--output`, or taken from (or built into) the cache."""
    if args.model is not None:
        return args.model
    if args.output:
        folder = build_random_model(Path(args.output), args.seed)
        print(f"Saved a random-weight InfiMM (scaled-down infimm-zephyr) to {folder}")
        return str(folder)
    return str(random_model_folder(args.seed))


# The scaled-down `infimm-zephyr` the random model is built from (sub-config overrides of the preset).
RANDOM_MODEL_RECIPE = {
    "preset": "infimm-zephyr",
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 2048},
    "vision_config": {"model_args": {"embed_dim": 64, "depth": 2, "num_heads": 2}},
    "resampler_depth": 2, "resampler_num_latents": 8, "resampler_heads": 2, "resampler_head_dim": 16,
    "cross_attn_heads": 2, "cross_attn_head_dim": 16,
    "gates": 1.0, "max_new_tokens": 20,
}
RANDOM_MODEL_MARKER = "infimm-random-model.json"
# Left-over build folders of runs that were killed are removed once they are this old (seconds).
_ABANDONED_AFTER = 3600


def random_model_cache_dir() -> Path:
    """Where the random models live: `$HF_HOME/infimm` (HF_HOME defaults to ~/.cache/huggingface)."""
    return Path(huggingface_hub.constants.HF_HOME) / "infimm"


def random_model_fingerprint(seed: int) -> str:
    """What the random model's folder depends on: the recipe, the seed, the package's code (copied into the folder as
    remote code, and it initialises the weights), the tokenizer and the libraries that build and save it."""
    digest = hashlib.sha256(json.dumps({"recipe": RANDOM_MODEL_RECIPE, "seed": seed}, sort_keys=True).encode())
    for name in ("torch", "transformers", "timm", "safetensors"):
        digest.update(f"{name}=={version(name)}".encode())
    package = Path(infimm.__file__).resolve().parent
    tokenizer = package / "assets" / RANDOM_MODEL_RECIPE["preset"]
    for path in sorted(package.glob("*.py")) + sorted(p for p in tokenizer.iterdir() if p.is_file()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _is_fresh(folder: Path, fingerprint: str) -> bool:
    try:
        marker = json.loads((folder / RANDOM_MODEL_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("fingerprint") == fingerprint and (folder / "model.safetensors").is_file()


def random_model_folder(seed: int = 0, cache_dir=None) -> Path:
    """The random model's folder in the cache, one per seed: reused while its fingerprint matches, else rebuilt.

    A build goes to a fresh folder beside it that is renamed into place when complete, so a run never sees half a
    folder, and of two runs building at once the second to finish just uses the first one's folder.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else random_model_cache_dir()
    name = f"random-{RANDOM_MODEL_RECIPE['preset']}-seed{seed}"
    folder = cache_dir / name
    fingerprint = random_model_fingerprint(seed)
    if _is_fresh(folder, fingerprint):
        print(f"Reusing the random-weight InfiMM (scaled-down infimm-zephyr) in {folder}")
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(cache_dir, name)
    build = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=cache_dir))
    try:
        build_random_model(build, seed)
        (build / RANDOM_MODEL_MARKER).write_text(json.dumps({"fingerprint": fingerprint, "seed": seed}) + "\n")
        _move_into_place(build, folder, fingerprint)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already unless another run's folder won, or on an error
    print(f"Saved a random-weight InfiMM (scaled-down infimm-zephyr) to {folder}; later runs reuse it")
    return folder


def _move_into_place(build: Path, folder: Path, fingerprint: str) -> None:
    for _ in range(3):
        try:
            os.rename(build, folder)  # atomic; fails while `folder` exists (a directory is never replaced)
            return
        except OSError:
            if _is_fresh(folder, fingerprint):
                return  # another run built it meanwhile
            # A stale or broken folder: move it aside (atomic too), then delete it.
            aside = folder.with_name(f".{folder.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(folder, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"Could not move the random model into {folder}; remove that folder and run again.")


def _remove_abandoned(cache_dir: Path, name: str) -> None:
    """Build and stale folders left by runs that were killed (a running build is younger than the limit)."""
    for path in cache_dir.glob(f".{name}.*"):
        try:
            if time.time() - path.stat().st_mtime > _ABANDONED_AFTER:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def build_random_model(folder: Path, seed: int) -> Path:
    """A scaled-down `infimm-zephyr` (real vocabulary, tokenizer and 336 px images) saved as a Hub-style folder."""
    recipe = dict(RANDOM_MODEL_RECIPE)
    preset, gates, max_new_tokens = recipe.pop("preset"), recipe.pop("gates"), recipe.pop("max_new_tokens")
    config = InfiMMConfig.from_preset(preset, **recipe)
    torch.manual_seed(seed)
    model = InfiMMForConditionalGeneration(config).eval()
    # Gates start at zero (each block is then an identity); open them so the images reach the language model.
    for block in model.model.cross_attention_layers.values():
        torch.nn.init.constant_(block.attn_gate, gates)
        torch.nn.init.constant_(block.ff_gate, gates)
    model.generation_config.max_new_tokens = max_new_tokens
    model.generation_config.do_sample = False
    processor = InfiMMProcessor.from_config(config, bundled_tokenizer("infimm-zephyr"))
    return save_hub_folder(model, processor, folder)


def is_legacy_release(model_id: str) -> bool:
    """The original release's `config.json` has `visual` / `language` blocks instead of InfiMM's sub-configs."""
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(model_id)
    except OSError as err:
        sys.exit(f"Could not read a config.json from {model_id!r}: {err}")
    return is_legacy_config(config_dict)


def load_legacy(model_id: str, dtype: str):
    """An original release (folder or repo id) read directly: its weights renamed as `infimm-convert` would."""
    try:
        from infimm.convert_weights.legacy import load_legacy_model
    except ImportError:
        sys.exit(
            f"{model_id!r} is an original InfiMM release (legacy format) and the `convert_weights` package that reads "
            "it is not installed. Install this project (`pip install -e .`) or convert the snapshot with "
            "`infimm-convert --input <snapshot folder> --output <folder>` and pass that folder to --model."
        )
    config = InfiMMConfig.from_pretrained(model_id)
    processor = InfiMMProcessor.from_config(config, AutoTokenizer.from_pretrained(model_id, trust_remote_code=False))
    model = load_legacy_model(InfiMMForConditionalGeneration, model_id, config=config, dtype=dtype)
    return model, processor


def load(model_id: str, device: str, dtype: str):
    """Model and processor of an InfiMM folder or Hub repo: Hub-style (remote code included) or an original release."""
    if is_legacy_release(model_id):
        model, processor = load_legacy(model_id, dtype)
    else:
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype=dtype)
    return model.to(device).eval(), processor


def prompt_inputs(processor, images, prompt: str):
    """One question about `images`: a user turn of the chat template, or for a pretrained (non-chat) model the
    Flamingo layout with the images first."""
    if processor.chat_template is not None:
        messages = [{"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                                 {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    return processor(text=processor.image_token * len(images) + prompt, images=images, return_tensors="pt")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    random_model = args.model is None
    model_id = model_or_random(args)
    images = args.image or [str(sample_image_path())]

    model, processor = load(model_id, args.device, args.dtype)
    inputs = prompt_inputs(processor, images, args.prompt).to(model.device, dtype=model.dtype)

    if random_model:
        print(RANDOM_WEIGHTS_NOTICE)
    print(f"Images: {', '.join(map(str, images))}\nPrompt: {args.prompt}\nAnswer: ", end="", flush=True)
    torch.manual_seed(args.seed)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        output = model.generate(**inputs, streamer=streamer, **generate_overrides(args))
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    print(f"[{new_tokens} new tokens in {time.perf_counter() - start:.1f} s total]")
    return processor.post_process_image_text_to_text(output, input_ids=inputs["input_ids"])


if __name__ == "__main__":
    main()
