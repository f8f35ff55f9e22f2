"""Fine-tune InfiMM with `Trainer`: the paper's three stages, optional LoRA, any `TrainingArguments` flag.

    python examples/finetune.py --model DIR --stage pt|mtt|ift (--data FILE.jsonl | --synthetic N) \
        --output-dir OUT [--max-steps N] [--lora] [--skip-bad-rows] [any TrainingArguments flag]

`--stage` sets what trains (vision tower always frozen; PT/MTT: resampler + gated cross-attention; IFT: also the
LLM for Llama-2, not for chat LLMs unless `--train-llm true`) and the paper's optimiser defaults for that stage
(AdamW lr / betas / eps, cosine, weight decay 0.1, clip 1.0, bf16 where the GPU has it); flags given on the
command line win. `--model tiny` (the default) builds a small random-weight InfiMM for smoke runs.

Data: one JSON object per line, images as paths relative to the JSONL file:
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                   {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}          (loss on assistant turns)
    {"text": "<image>A cat.<|endofchunk|><image>A dog.<|endofchunk|>", "images": ["cat.png", "dog.png"]}
    {"image": "cat.png", "caption": "A cat."}                          (loss on the text after the first image)

Every row is checked before the model is loaded, with the collator's own rules (`validate_dataset`): a row that cannot
be trained on (missing, unreadable or damaged image, `<image>` count unlike the image count, malformed messages, a
line that is not a JSON object) stops the run with an error naming FILE.jsonl and the line. `--skip-bad-rows` leaves
such rows out instead; their count and the first reasons are logged and written to train_results.json. Which rows are
left out depends on the data alone, so a resumed run trains on the same rows.

Multi-process: `torchrun --nproc_per_node 2 examples/finetune.py ...` or `accelerate launch examples/finetune.py ...`
(DDP); FSDP2: `accelerate launch --config_file examples/fsdp.yaml examples/finetune.py ...` (GPUs; each decoder layer
is one FSDP unit with its cross-attention block); DeepSpeed ZeRO-2 as in the paper: add
`--deepspeed examples/deepspeed_zero2.json`, ZeRO-3: `--deepspeed examples/deepspeed_zero3.json` (GPU machines).

Outputs, as transformers' example scripts leave them: the model and processor (loading with
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` and `AutoProcessor.from_pretrained(OUT,
trust_remote_code=True)`; full weights under FSDP too), `trainer_state.json` (the log history), `train_results.json`
and `all_results.json` (the metrics); a LoRA run also leaves its adapter in `OUT/lora-adapter`. Checkpoints come with
`--save-strategy steps --save-steps N`; `--resume-from-checkpoint OUT/checkpoint-N` (or `last`) continues that run
at its global step, with its optimizer, scheduler and data order.
"""

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from infimm import InfiMMConfig, InfiMMForConditionalGeneration, InfiMMProcessor
from infimm.collator_infimm import InfiMMDataCollator
from infimm.hub_infimm import bundled_tokenizer, mark_for_remote_code, save_hub_folder
from infimm.training_infimm import (
    ConnectorCheckpointCallback,
    InfiMMTrainer,
    apply_lora,
    apply_stage,
    count_parameters,
    has_text_only_examples,
    load_connector,
    meta_model,
    recipe,
    save_lora,
    validate_dataset,
    weights_checksum,
)


logger = logging.get_logger("infimm.finetune")


@dataclass
class ScriptArguments:
    stage: str = field(metadata={"help": "Training stage: pt, mtt or ift.", "choices": ["pt", "mtt", "ift"]})
    model: str = field(default="tiny", metadata={"help": "Model folder or Hub id; 'tiny' builds a small random model."})
    data: str | None = field(default=None, metadata={"help": "JSONL file of examples (images relative to it)."})
    synthetic: int | None = field(default=None, metadata={"help": "Generate N synthetic examples for a smoke run."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LLM (the connector trains fully)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    train_llm: bool | None = field(
        default=None, metadata={"help": "Force training the LLM on (true) or off (false); default: the stage rule."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Longest sample in tokens; default: the stage's."})
    max_images: int = field(default=6, metadata={"help": "Most images per sample (the paper: 6)."})
    image_overflow: str = field(
        default="truncate", metadata={"help": "Past max_images: truncate the sample, or error.", "choices": ["truncate", "error"]}
    )
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the weights are loaded in (float32 keeps fp32 master weights; auto: the checkpoint's).",
                  "choices": ["float32", "bfloat16", "float16", "auto"]},
    )
    checksum_dir: str | None = field(
        default=None, metadata={"help": "Each rank writes the sha256 of its trainable weights here after training."}
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata={"help": "Leave out data rows that cannot be trained on (counted, and the first reasons reported) "
                          "instead of stopping with an error that names the row."},
    )


# ------------------------------------------------------------------------------------------------- models
def tiny_config():
    """The infimm-zephyr layout, scaled down to a few hundred thousand parameters."""
    return InfiMMConfig.from_preset(
        "infimm-zephyr",
        vision_config={"model_args": {"img_size": 28, "patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2}},
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 512},
        resampler_depth=2, resampler_num_latents=4, resampler_heads=2, resampler_head_dim=8,
        cross_attn_heads=2, cross_attn_head_dim=8,
    )


def build_tiny_model(seed: int = 0):
    """A small random-weight InfiMM with the infimm-zephyr layout and the real tokenizer (weights are random)."""
    config = tiny_config()
    torch.manual_seed(seed)
    model = InfiMMForConditionalGeneration(config)
    processor = InfiMMProcessor.from_config(config, bundled_tokenizer("infimm-zephyr"))
    return model, processor


def load_processor(name: str):
    """The processor alone, so the data can be checked before the weights are loaded."""
    if name == "tiny":
        return InfiMMProcessor.from_config(tiny_config(), bundled_tokenizer("infimm-zephyr"))
    try:
        return InfiMMProcessor.from_pretrained(name)
    except (OSError, ValueError, TypeError):
        # A folder with a tokenizer but no processor files (e.g. a bare conversion): build it from the config.
        return InfiMMProcessor.from_config(InfiMMConfig.from_pretrained(name), AutoTokenizer.from_pretrained(name))


def load_model(name: str, dtype: str, seed: int):
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if name == "tiny":
        logger.warning("Building a tiny random-weight InfiMM (--model tiny): its outputs are meaningless.")
        model = build_tiny_model(seed)[0]
        return model.to(torch.float32 if dtype == "auto" else torch_dtype)
    return InfiMMForConditionalGeneration.from_pretrained(name, dtype=torch_dtype)


# --------------------------------------------------------------------------------------------------- data
_COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30),
           "black": (10, 10, 10), "purple": (140, 40, 170)}
_SHAPES = ("square", "circle")


def _draw(color: str, shape: str, size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=_COLORS[color])
    return image


def write_synthetic_dataset(folder, count: int, stage: str, seed: int = 0) -> Path:
    """`count` examples of coloured shapes (PNG files + `data.jsonl`) in the layout `stage` trains on.

    PT: image-caption pairs and two-image interleaved documents; MTT: one-turn visual questions; IFT: two-turn chats.
    Deterministic, so every process of a distributed run writes the same files.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for color in _COLORS:
        for shape in _SHAPES:
            path = folder / "images" / f"{color}-{shape}.png"
            if not path.exists():
                _draw(color, shape).save(path)
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        picks = [(rng.choice(list(_COLORS)), rng.choice(_SHAPES)) for _ in range(2)]
        (color, shape), (color2, shape2) = picks
        image, image2 = f"images/{color}-{shape}.png", f"images/{color2}-{shape2}.png"
        if stage == "pt" and index % 3 == 2:
            rows.append({
                "text": f"<image>A {color} {shape}.<|endofchunk|><image>A {color2} {shape2}.<|endofchunk|>",
                "images": [image, image2],
            })
        elif stage == "pt":
            rows.append({"image": image, "caption": f"A {color} {shape} on a white background."})
        elif stage == "mtt":
            rows.append({"messages": [
                {"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What colour is the shape?"}]},
                {"role": "assistant", "content": color.capitalize() + "."},
            ]})
        else:
            rows.append({"messages": [
                {"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": f"A {color} {shape} on a white background."},
                {"role": "user", "content": "Which shape is it?"},
                {"role": "assistant", "content": f"It is a {shape}."},
            ]})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> tuple[ScriptArguments, TrainingArguments]:
    """Script flags plus every `TrainingArguments` flag; the stage's recipe replaces TrainingArguments' defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage", choices=["pt", "mtt", "ift"])
    stage = pre.parse_known_args(argv)[0].stage

    parser = HfArgumentParser(
        (ScriptArguments, TrainingArguments), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if stage is not None:
        parser.set_defaults(
            **recipe(stage).training_arguments(),
            # The collator needs the raw example columns; Trainer would otherwise drop them.
            remove_unused_columns=False,
            label_names=["labels"],  # also under a PEFT wrapper, whose forward signature hides it
            logging_steps=10,
            logging_first_step=True,
            save_strategy="no",
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # Launched by torchrun on a machine without GPUs: accelerate runs multi-CPU DDP only when asked for CPU.
            parser.set_defaults(use_cpu=True, ddp_backend="gloo")
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if (script_args.data is None) == (script_args.synthetic is None):
        parser.error("give exactly one of --data FILE.jsonl and --synthetic N")
    return script_args, training_args


# ---------------------------------------------------------------------------------------------------- FSDP
def fsdp_requested(args: TrainingArguments) -> bool:
    """FSDP asked for by `accelerate launch` (an FSDP config sets ACCELERATE_USE_FSDP) or by `--fsdp`."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(args.fsdp)


def prepare_fsdp(trainer: Trainer, lora: bool) -> bool:
    """Whether this run is FSDP2 (whose units `InfiMMTrainer` makes); False without FSDP.

    Refuses what would not do what was asked: FSDP asked for but not enabled (accelerate 1.15 enables FSDP only for
    GPU-type devices; for CPU processes it drops the plugin and the run would be plain DDP), FSDP1, and LoRA.
    """
    if not trainer.is_fsdp_enabled:
        if fsdp_requested(trainer.args):
            raise ValueError(
                "FSDP was asked for, but accelerate did not enable it: accelerate enables FSDP only on GPUs (and other "
                "accelerators), not for CPU processes, where this run would be plain DDP. Run on GPUs, or launch "
                "without the FSDP config for DDP."
            )
        return False
    plugin = trainer.accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"This script supports FSDP2 only (got fsdp_version {plugin.fsdp_version}): FSDP1 cannot make a decoder "
            "layer and its cross-attention block one unit. Set `fsdp_version: 2` (as examples/fsdp.yaml does)."
        )
    if lora:
        raise ValueError(
            "--lora is not supported under FSDP by this script (it merges the adapters into the weights at the end). "
            "Train LoRA with DDP (torchrun, or accelerate launch without the FSDP config)."
        )
    return True  # InfiMMTrainer shards each decoder layer with its cross-attention block


def save_fsdp_output(trainer: Trainer, processor, folder: Path) -> None:
    """The full weights, gathered on rank 0, saved as a Hub folder through a storage-free InfiMM instance.

    `Trainer.save_model` would save through the sharded model, whose class is FSDP2's subclass
    (`FSDPInfiMMForConditionalGeneration`, defined in torch): `auto_map` would name it and torch's files would be copied
    as the remote code. Whatever `fsdp_state_dict_type` the checkpoints use, this folder holds full weights.
    """
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank takes part
    if trainer.is_world_process_zero():
        config = trainer.model.config
        save_hub_folder(meta_model(config, dtype=trainer.model.dtype), processor, folder, state_dict=state_dict)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    script_args, training_args = parse_args(argv)
    logging.set_verbosity(training_args.get_process_log_level())  # `--log-level info` for more
    set_seed(training_args.seed)

    if script_args.synthetic is not None:
        data_dir = Path(training_args.output_dir) / "synthetic-data"
        # Written once per machine; the other processes wait, then read it (were they to write it too, one could
        # read it while another truncates it).
        with training_args.main_process_first(desc="synthetic dataset"):
            if training_args.local_process_index == 0:
                write_synthetic_dataset(data_dir, script_args.synthetic, script_args.stage, training_args.seed)
        data_path = data_dir / "data.jsonl"
    else:
        data_path = Path(script_args.data)

    processor = load_processor(script_args.model)
    collator = InfiMMDataCollator(
        processor,
        max_length=script_args.max_length or recipe(script_args.stage).max_length,
        max_images=script_args.max_images,
        image_overflow=script_args.image_overflow,
        image_root=data_path.parent,
    )
    # Every row through the collator that trains on it, before the weights are loaded: a bad row fails now, naming
    # its line, instead of at the step that reaches it (and again at every resume).
    rows, data_report = validate_dataset(data_path, collator, skip_bad_rows=script_args.skip_bad_rows)
    if training_args.ddp_find_unused_parameters is None:
        # A batch without images leaves the connector without gradients, and DDP must be told to expect that; when
        # every example has an image, every trainable weight gets a gradient at every step.
        training_args.ddp_find_unused_parameters = has_text_only_examples(rows)

    model = load_model(script_args.model, script_args.model_dtype, training_args.seed)
    mark_for_remote_code(model)
    parts = apply_stage(model, script_args.stage, script_args.train_llm)
    if script_args.lora:
        model = apply_lora(model, r=script_args.lora_r, alpha=script_args.lora_alpha, dropout=script_args.lora_dropout)
    counts = count_parameters(model)
    if training_args.process_index == 0:
        print(f"stage {script_args.stage}: training {', '.join(parts)}{' + LoRA on the LLM' if script_args.lora else ''}")
        print(counts)

    trainer = InfiMMTrainer(
        model=model,
        args=training_args,
        train_dataset=rows,
        data_collator=collator,
        processing_class=processor,
        callbacks=[ConnectorCheckpointCallback()] if script_args.lora else None,
    )
    fsdp = prepare_fsdp(trainer, script_args.lora)

    resume = training_args.resume_from_checkpoint
    if resume in ("last", "latest", "true", "True"):
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no checkpoint in "
                             f"{training_args.output_dir}.")
    if resume and script_args.lora:
        load_connector(model, resume)
    train_result = trainer.train(resume_from_checkpoint=resume)

    checksum = weights_checksum(model)
    print(f"[rank {training_args.process_index}] trainable weights sha256 {checksum}")
    if script_args.checksum_dir:
        os.makedirs(script_args.checksum_dir, exist_ok=True)
        Path(script_args.checksum_dir, f"rank{training_args.process_index}.sha256").write_text(checksum + "\n")

    output_dir = Path(training_args.output_dir)
    if script_args.lora:
        if trainer.is_world_process_zero():
            save_lora(model, output_dir / "lora-adapter")
        model = model.merge_and_unload()
        if trainer.is_world_process_zero():
            save_hub_folder(model, processor, output_dir)
    elif fsdp:
        save_fsdp_output(trainer, processor, output_dir)
    else:
        trainer.save_model(str(output_dir))
    # What transformers' example scripts leave beside the model: the metrics (train_results.json, all_results.json)
    # and the Trainer state with the log history (trainer_state.json). Each writes on the main process only.
    # The data check's row counts and first reasons go with them (the reasons were logged before training).
    metrics = {**train_result.metrics, "train_samples": len(rows), **data_report.metrics()}
    trainer.log_metrics("train", {key: value for key, value in metrics.items() if not isinstance(value, list)})
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        print(f"saved to {output_dir}: AutoModelForCausalLM.from_pretrained({str(output_dir)!r}, trust_remote_code=True)")
    return trainer


if __name__ == "__main__":
    main()
