"""Training policy for InfiMM: what each stage trains, the paper's optimiser settings, LoRA, and device maps.

The recipe (InfiMM paper, Table 7, and the model card; see the README's fine-tuning section):

| stage | trains | AdamW lr | betas | eps | sequence length |
|---|---|---|---|---|---|
| `pt` (pretraining) | resampler + gated cross-attention | 1e-4 | 0.9 / 0.95 | 1e-8 | 32 (pairs) / 384 (interleaved) |
| `mtt` (multi-task) | resampler + gated cross-attention | 1e-5 | 0.9 / 0.999 | 1e-5 | 128 |
| `ift` (instructions) | + the LLM for Llama-2, not for the chat LLMs | 5e-6 | 0.9 / 0.999 | 1e-5 | 512 |

All stages: vision tower frozen, cosine decay, weight decay 0.1, gradient clip 1.0, bf16, at most 6 images per
sample. Freezing lives here, never in the model.

Whether IFT trains the LLM is read from the config (`llm_trains_in_ift`): the LLM trains when it is the base
Llama-2 (`chat_format == "llama2"`, the `infimm-llama13b` preset, or a Llama text model with `chat_format == "none"`);
chat-tuned LLMs (Zephyr, Vicuna: `chat_format` `zephyr` / `vicuna`) stay frozen unless `train_llm=True` is asked for.

FSDP2 (`accelerate launch --config_file examples/fsdp.yaml`): `InfiMMTrainer` (`shard_blocks_with_layers`) makes each
decoder layer and its gated cross-attention block one FSDP unit before accelerate shards the rest of the model.

Device maps: `infer_device_map` (from `device_map_infimm`, which ships with the remote code) runs accelerate's
`infer_auto_device_map`, then places every gated cross-attention block on its decoder layer's device and keeps the
vision tower on the main device. `meta_model` builds the storage-free model to plan on.

Data: `validate_dataset` runs every row through the collator's own checks before training, naming the file and line
(or row index) of a bad row, or leaves bad rows out and counts them (`skip_bad_rows=True`).
"""

import codecs
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .processing_infimm import conversation_images
from .device_map_infimm import blocks_follow_layers, infer_device_map, place_blocks_with_layers
from .device_map_infimm import meta_model


logger = logging.get_logger(__name__)

STAGES = ("pt", "mtt", "ift")

# Parts of `InfiMMForConditionalGeneration` by state-dict prefix.
PARTS = {
    "vision_tower": "model.vision_tower.",
    "resampler": "model.resampler.",
    "cross_attention_layers": "model.cross_attention_layers.",
    "language_model": "model.language_model.",
}
CONNECTOR_PARTS = ("resampler", "cross_attention_layers")

CONNECTOR_WEIGHTS_NAME = "connector.safetensors"

# LoRA goes on the language model's attention and MLP projections only (names of a stock Mistral / Llama layer).
LORA_TARGET_MODULES = (
    r"model\.language_model\.model\.layers\.\d+\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


# --------------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class StageRecipe:
    """The paper's optimiser settings and sequence length for one stage (TrainingArguments field names)."""

    stage: str
    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    max_length: int
    weight_decay: float = 0.1
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0

    def training_arguments(self) -> dict:
        """Defaults for `TrainingArguments`; bf16 only where the hardware has it."""
        return {
            "learning_rate": self.learning_rate,
            "adam_beta1": self.adam_beta1,
            "adam_beta2": self.adam_beta2,
            "adam_epsilon": self.adam_epsilon,
            "weight_decay": self.weight_decay,
            "lr_scheduler_type": self.lr_scheduler_type,
            "max_grad_norm": self.max_grad_norm,
            "bf16": bf16_available(),
        }


# PT's 384 is the interleaved length; image-caption pairs are short anyway (32 in the paper) and batches are padded
# only to their longest sample.
RECIPES = {
    "pt": StageRecipe("pt", 1e-4, 0.9, 0.95, 1e-8, max_length=384),
    "mtt": StageRecipe("mtt", 1e-5, 0.9, 0.999, 1e-5, max_length=128),
    "ift": StageRecipe("ift", 5e-6, 0.9, 0.999, 1e-5, max_length=512),
}


def recipe(stage: str) -> StageRecipe:
    if stage not in RECIPES:
        raise ValueError(f"Unknown stage {stage!r}; choose one of {list(STAGES)}.")
    return RECIPES[stage]


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# ---------------------------------------------------------------------------------------------------- policy
def llm_trains_in_ift(config) -> bool:
    """True when instruction fine-tuning trains the language model: the base Llama-2, not a chat-tuned LLM."""
    chat_format = getattr(config, "chat_format", "none")
    text_type = getattr(config.text_config, "model_type", None)
    return chat_format == "llama2" or (chat_format == "none" and text_type == "llama")


def trainable_parts(config, stage: str, train_llm: bool | None = None) -> tuple[str, ...]:
    """Names (keys of `PARTS`) of what `stage` trains. `train_llm` overrides the IFT rule; the tower never trains."""
    recipe(stage)
    parts = CONNECTOR_PARTS
    if train_llm is None:
        train_llm = stage == "ift" and llm_trains_in_ift(config)
    if train_llm:
        parts = parts + ("language_model",)
    return parts


def _base_model(model) -> nn.Module:
    """The `InfiMMForConditionalGeneration` under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_stage(model, stage: str, train_llm: bool | None = None) -> tuple[str, ...]:
    """Sets `requires_grad` for `stage` on an `InfiMMForConditionalGeneration`; returns the trained parts."""
    parts = trainable_parts(model.config, stage, train_llm)
    prefixes = tuple(PARTS[part] for part in parts)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
    return parts


@dataclass
class ParameterCount:
    trainable: int
    total: int
    by_part: dict

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        lines = [f"trainable parameters: {self.trainable:,} / {self.total:,} ({share:.2f}%)"]
        for part, (trainable, total) in self.by_part.items():
            lines.append(f"  {part:<24} {trainable:>15,} / {total:,}")
        return "\n".join(lines)


def count_parameters(model) -> ParameterCount:
    """Trainable and total parameters (shared tensors counted once), also per part (`lora` = adapter weights)."""
    seen, trainable, total = set(), 0, 0
    by_part = {part: [0, 0] for part in (*PARTS, "lora")}
    for name, param in _base_model(model).named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        count = param.numel()
        part = "lora" if "lora_" in name else next((p for p, prefix in PARTS.items() if name.startswith(prefix)), None)
        total += count
        trainable += count if param.requires_grad else 0
        if part is not None:
            by_part[part][0] += count if param.requires_grad else 0
            by_part[part][1] += count
    return ParameterCount(trainable, total, {part: tuple(v) for part, v in by_part.items() if v[1]})


def weights_checksum(model, trainable_only: bool = True) -> str:
    """sha256 over parameter names and float32 bytes, in name order: equal on every rank of a correct DDP run.

    FSDP2 shards (DTensors) are gathered first, so it is a collective there: every rank must call it.
    """
    digest = hashlib.sha256()
    named = sorted(_base_model(model).named_parameters(), key=lambda item: item[0])
    for name, param in named:
        if trainable_only and not param.requires_grad:
            continue
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        digest.update(name.encode())
        digest.update(tensor.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------ LoRA
def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=LORA_TARGET_MODULES, **kwargs):
    """LoRA adapters on the language model's projections (PEFT); the connector keeps training fully, in place.

    The connector trains in place rather than as PEFT `modules_to_save` copies (which work too, named per module:
    `resampler`, `cross_attention_layers.<i>`), so it is held once; `save_lora` writes it beside the adapter.
    Returns the `PeftModel`; the vision tower and the LLM's own weights are frozen.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, **kwargs)
    peft_model = get_peft_model(model, config)
    set_connector_trainable(peft_model)
    return peft_model


def set_connector_trainable(model, trainable: bool = True) -> None:
    prefixes = tuple(PARTS[part] for part in CONNECTOR_PARTS)
    for name, param in _base_model(model).named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(trainable)


def connector_state_dict(model) -> dict[str, torch.Tensor]:
    """Resampler and cross-attention weights under their full names (`model.resampler.*`, ...)."""
    prefixes = tuple(PARTS[part] for part in CONNECTOR_PARTS)
    return {
        name: tensor.detach().contiguous()
        for name, tensor in _base_model(model).state_dict().items()
        if name.startswith(prefixes)
    }


def save_connector(model, folder) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / CONNECTOR_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in connector_state_dict(model).items()}, str(path), metadata={"format": "pt"})
    return path


def load_connector(model, folder) -> None:
    """Loads `connector.safetensors` from `folder` into the model; every connector weight must be there."""
    from safetensors.torch import load_file

    path = Path(folder) / CONNECTOR_WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: a LoRA folder saved by `save_lora` (or a LoRA training checkpoint) holds the "
            "trained connector there."
        )
    weights = load_file(str(path))
    expected = set(connector_state_dict(model))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    base = _base_model(model)
    with torch.no_grad():
        for name, param in list(base.named_parameters()) + list(base.named_buffers()):
            if name in weights:
                param.copy_(weights[name].to(param.dtype))


def save_lora(peft_model, folder) -> Path:
    """The PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) plus `connector.safetensors`."""
    folder = Path(folder)
    peft_model.save_pretrained(str(folder))
    save_connector(peft_model, folder)
    return folder


def load_lora(model, folder, is_trainable: bool = False):
    """`PeftModel` over `model` with the adapter and connector saved by `save_lora`; `.merge_and_unload()` merges."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    load_connector(peft_model, folder)
    if is_trainable:
        set_connector_trainable(peft_model)
    return peft_model


class ConnectorCheckpointCallback(TrainerCallback):
    """Writes `connector.safetensors` into every Trainer checkpoint of a LoRA run (PEFT saves only the adapter).

    Resume with `load_connector(model, checkpoint_dir)` before `trainer.train(resume_from_checkpoint=...)`.
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            save_connector(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control


# ------------------------------------------------------------------------------------------------------ FSDP2
def fsdp_units(model) -> list[list[nn.Module]]:
    """Decoder layer i with its cross-attention block (where it has one): the modules that run together.

    Block i runs from a forward pre-hook on decoder layer i, so one FSDP unit holding both gathers their weights
    with one all-gather, just before the layer runs, and frees them after it.
    """
    inner = _base_model(model).model
    blocks = inner.cross_attention_layers
    units = []
    for index, layer in enumerate(inner.language_model.model.layers):
        units.append([layer, blocks[str(index)]] if str(index) in blocks else [layer])
    return units


def shard_blocks_with_layers(model, accelerator) -> int:
    """FSDP2: `fully_shard([decoder layer i, its cross-attention block])` for every layer; returns the unit count.

    `InfiMMTrainer` calls it (before `accelerator.prepare`). accelerate's own FSDP2 auto-wrap (`fsdp2_prepare_model`)
    shards one module per matched class, so it would make each block a unit apart from its layer; it skips modules
    that are already sharded, and wraps the rest (tower, resampler, embeddings, head, root) as the plugin says
    (the classes named in `fsdp_transformer_layer_cls_to_wrap`, by default the model's `_no_split_modules`). The
    `fully_shard` settings here are the ones accelerate derives from the same plugin, so all units agree.
    Frozen and trainable weights may share a unit: FSDP2 gathers both and reduce-scatters gradients only for
    parameters that have them.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "shard_blocks_with_layers needs FSDP2: launch with `accelerate launch --config_file examples/fsdp.yaml` "
            "(fsdp_version: 2)."
        )
    if plugin.cpu_ram_efficient_loading:
        # accelerate would then move the model to the meta device and broadcast rank 0's full weights into it,
        # which it cannot do for units that are already sharded.
        raise ValueError(
            "fsdp_cpu_ram_efficient_loading is not supported with the layer + cross-attention units; set it to "
            "false in the accelerate config (examples/fsdp.yaml does)."
        )
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }
    if accelerator.mixed_precision != "no":
        # As accelerate does before sharding: FSDP2 wants one dtype per unit for trainable weights, kept in fp32
        # (the policy's param_dtype is the compute dtype).
        for param in _base_model(model).parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    count = 0
    for unit in fsdp_units(model):
        if not any(isinstance(module, FSDPModule) for module in unit):
            fully_shard(unit if len(unit) > 1 else unit[0], **kwargs)
            count += 1
    _drop_sharded_classes_from_auto_wrap(model, plugin)
    return count


class InfiMMTrainer(Trainer):
    """`Trainer` that, under FSDP2, makes each decoder layer one FSDP unit with its cross-attention block.

    The units are sharded (`shard_blocks_with_layers`) when the optimizer is created, which for FSDP2 is just before
    accelerate shards the rest of the model. Without FSDP2 it is `Trainer`.

    accelerate then re-points the optimizer at the sharded parameters, matching them by data pointer; a shard with no
    elements (a 1-element gate split over two ranks leaves one rank nothing) has pointer 0 on every such parameter,
    so those slots would all get one of them. The weights still train right (an empty shard's step is a no-op), but
    the optimizer state differs across ranks, and saving or loading a checkpoint's optimizer then mismatches its
    collectives. The parameters sharded here are not re-created by accelerate, so their slots are put back.
    """

    fsdp_units = 0
    _presharded_slots = None

    def _is_fsdp2(self) -> bool:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2

    def create_optimizer(self, model=None):
        if self._is_fsdp2() and self.optimizer is None:
            self.fsdp_units += shard_blocks_with_layers(self.model, self.accelerator)
            logger.info("FSDP2: %d units of a decoder layer with its cross-attention block (if any)", self.fsdp_units)
            optimizer = super().create_optimizer(model)
            from torch.distributed.tensor import DTensor

            self._presharded_slots = [
                [param if isinstance(param, DTensor) else None for param in group["params"]]
                for group in optimizer.param_groups
            ]
            return optimizer
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # Called after accelerate's prepare and before a checkpoint's optimizer state is loaded.
        if self._presharded_slots is not None:
            for group, slots in zip(self.optimizer.param_groups, self._presharded_slots):
                group["params"] = [own if own is not None else param for param, own in zip(group["params"], slots)]
            self._presharded_slots = None
        return super().create_scheduler(num_training_steps, optimizer)


def _drop_sharded_classes_from_auto_wrap(model, plugin) -> None:
    """accelerate looks the auto-wrap classes up by class name, and `fully_shard` renames a module's class (to
    `FSDP<name>`): names left with no unsharded module would fail that lookup, and their modules are units already."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy:
        return
    names = plugin.transformer_cls_names_to_wrap
    if names is None:
        names = list(getattr(model, "_no_split_modules", None) or [])
    present = {type(module).__name__ for module in model.modules()}
    plugin.transformer_cls_names_to_wrap = [name for name in names if name in present]


# ---------------------------------------------------------------------------------------------------- data
def _jsonl_lines(path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of every non-blank line, numbered as editors and `wc -l` count lines."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)  # some editors start UTF-8 files with a byte-order mark
            if line.strip():
                yield number, line


def _parse_jsonl_line(line: bytes) -> dict:
    """One JSONL line as a dict, or a `ValueError` saying why it is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err}). Save the file as UTF-8.") from err
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err}). Each line must hold one complete JSON object.") from err
    except RecursionError as err:
        raise ValueError("JSON nested too deeply to read. Flatten the row.") from err
    if not isinstance(row, dict):
        raise ValueError(f"each line must be a JSON object; got {type(row).__name__}.")
    return row


def load_jsonl(path) -> list[dict]:
    """Rows of a JSONL file (blank lines skipped); errors name the line. `validate_dataset` also checks the rows."""
    rows = []
    for number, line in _jsonl_lines(path):
        try:
            rows.append(_parse_jsonl_line(line))
        except ValueError as err:
            raise ValueError(f"{path}, line {number}: {err}") from err
    if not rows:
        raise ValueError(f"{path} holds no examples.")
    return rows


_SKIP_HINT = (
    "Fix the row, or leave out every row that cannot be used with `skip_bad_rows=True` (`--skip-bad-rows` in "
    "examples/finetune.py); they are then counted and reported."
)


@dataclass
class DataReport:
    """What `validate_dataset` found: rows read, rows left out, and the first reasons, each naming its row."""

    source: str
    rows: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    max_reasons: int = 5

    def add(self, where: str, problem: Exception | None) -> None:
        self.rows += 1
        if problem is not None:
            self.skipped += 1
            if len(self.reasons) < self.max_reasons:
                self.reasons.append(_describe(where, problem))

    def metrics(self) -> dict:
        """For `train_results.json`: row counts and the first reasons."""
        return {"data_rows": self.rows, "data_rows_skipped": self.skipped, "data_skipped_reasons": list(self.reasons)}

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.skipped} of {self.rows} rows left out"]
        lines += [f"  {reason}" for reason in self.reasons]
        if self.skipped > len(self.reasons):
            lines.append(f"  ... and {self.skipped - len(self.reasons)} more")
        return "\n".join(lines)


def _describe(where: str, problem: Exception, limit: int = 1000) -> str:
    """`where: what is wrong`, cut short: a huge string in the data would otherwise be repeated whole."""
    text = f"{where}: {str(problem) or type(problem).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _row_problem(collator, row) -> Exception | None:
    """What a training step would raise on `row` (`collator`'s own checks), or None."""
    try:
        collator.check_example(row)
    except (ValueError, OSError) as err:
        return err
    return None


def _judge(report: DataReport, where: str, problem: Exception | None, skip_bad_rows: bool) -> bool:
    """Records the row; True to keep it. Without `skip_bad_rows` a bad row stops everything, naming the row."""
    if problem is not None and not skip_bad_rows:
        raise ValueError(f"{_describe(where, problem)}\n{_SKIP_HINT}") from problem
    report.add(where, problem)
    return problem is None


def validate_dataset(data, collator, *, skip_bad_rows: bool = False, first_rows: int = 1000, max_reasons: int = 5,
                     name: str | None = None):
    """Checks every row with `collator`'s own rules before training; returns `(dataset, DataReport)`.

    Each row goes through `collator.check_example`, the encoding and image loading a batch does: the kind of row and
    its keys and types, well-formed messages, one `<image>` per image, and every image present, a file, readable and
    decodable (relative paths under the collator's `image_root`). So a row that passes cannot fail a training step,
    and one that fails would have.

    `data` is one of:

    - a JSON-lines file (path): errors name the file and the 1-based line; lines that are not JSON objects count as
      bad rows too. The dataset returned is the list of rows.
    - a map-style dataset (list of dicts, `datasets.Dataset`, torch `Dataset`): errors name the row index. The dataset
      returned is `data` itself, or the rows kept (`Dataset.select`, a list or a `torch.utils.data.Subset`).
    - an iterable dataset (`datasets.IterableDataset`, torch `IterableDataset`, any re-iterable): the first
      `first_rows` rows are checked now, and every row is checked as it is read, before it reaches a batch. The
      dataset returned yields the good rows. Rows are counted by position in the stream, once, even across epochs;
      with DataLoader worker processes the counts made while training stay in the workers.

    Without `skip_bad_rows` the first bad row raises a `ValueError` naming it, what is wrong and the fix. With it,
    bad rows are left out and counted in the report (`report.metrics()` for the run's results; the first
    `max_reasons` reasons are kept). Which rows are left out depends on the rows alone, so a run resumed from a
    checkpoint sees the same dataset. Decoding every image takes time on large datasets: an iterable dataset
    spreads it over the run.
    """
    if isinstance(data, (str, os.PathLike)):
        return _validate_jsonl(Path(data), collator, skip_bad_rows, max_reasons)
    if isinstance(data, dict):  # a DatasetDict, or one row
        raise ValueError(
            f"validate_dataset takes one dataset (rows), not a {type(data).__name__}: pass one split, e.g. "
            "`dataset['train']`, or a list of rows."
        )
    name = name or type(data).__name__
    map_style = hasattr(data, "__len__") and hasattr(data, "__getitem__")
    if map_style and not isinstance(data, torch.utils.data.IterableDataset):
        return _validate_rows(data, collator, skip_bad_rows, max_reasons, name)
    if hasattr(data, "__iter__"):
        return _validate_stream(data, collator, skip_bad_rows, max_reasons, name, first_rows)
    raise ValueError(
        f"validate_dataset cannot read a {type(data).__name__}: pass a JSONL path, a list of rows, a `datasets.Dataset` "
        "or an iterable dataset."
    )


def _validate_jsonl(path: Path, collator, skip_bad_rows: bool, max_reasons: int):
    report, rows = DataReport(str(path), max_reasons=max_reasons), []
    for number, line in _jsonl_lines(path):
        try:
            row, problem = _parse_jsonl_line(line), None
        except ValueError as err:
            row, problem = None, err
        if problem is None:
            problem = _row_problem(collator, row)
        if _judge(report, f"{path}, line {number}", problem, skip_bad_rows):
            rows.append(row)
    if report.rows == 0:
        raise ValueError(f"{path} holds no examples.")
    _check_kept(report, len(rows))
    return rows, report


def _validate_rows(data, collator, skip_bad_rows: bool, max_reasons: int, name: str):
    report, kept = DataReport(name, max_reasons=max_reasons), []
    for index in range(len(data)):
        if _judge(report, f"{name}, row index {index}", _row_problem(collator, data[index]), skip_bad_rows):
            kept.append(index)
    if report.rows == 0:
        raise ValueError(f"The dataset {name} holds no examples.")
    _check_kept(report, len(kept))
    if len(kept) == len(data):
        return data, report
    if hasattr(data, "select"):  # datasets.Dataset: stays one, with its features
        return data.select(kept), report
    if isinstance(data, (list, tuple)):
        return [data[index] for index in kept], report
    return torch.utils.data.Subset(data, kept), report


def _check_kept(report: DataReport, kept: int) -> None:
    if kept == 0:
        raise ValueError(f"No row of {report.source} can be used for training.\n{report}")
    if report.skipped:
        logger.warning("Leaving out rows that cannot be used for training.\n%s", report)


def _validate_stream(data, collator, skip_bad_rows: bool, max_reasons: int, name: str, first_rows: int):
    if iter(data) is data:
        raise ValueError(
            f"validate_dataset needs a dataset it can read more than once, not a one-pass {type(data).__name__} "
            "(an iterator or generator): wrap it, e.g. `datasets.IterableDataset.from_generator(...)`."
        )
    if first_rows < 0:
        raise ValueError(f"`first_rows` must be 0 or more; got {first_rows}.")
    stream = CheckedStream(data, collator, skip_bad_rows, DataReport(name, max_reasons=max_reasons))
    for index, row in enumerate(itertools.islice(data, first_rows)):
        _judge(stream.report, stream.where(index), _row_problem(collator, row), skip_bad_rows)
    if stream.report.rows < first_rows:  # the whole stream has been read
        if stream.report.rows == 0:
            raise ValueError(f"The dataset {name} holds no examples.")
        _check_kept(stream.report, stream.report.rows - stream.report.skipped)
    elif stream.report.skipped:
        logger.warning("Leaving out rows that cannot be used for training.\n%s", stream.report)
    return stream, stream.report


class CheckedStream(torch.utils.data.IterableDataset):
    """An iterable dataset that yields only the rows `collator` can train on (see `validate_dataset`)."""

    def __init__(self, data, collator, skip_bad_rows: bool, report: DataReport):
        self.data = data
        self.collator = collator
        self.skip_bad_rows = skip_bad_rows
        self.report = report

    def where(self, index: int) -> str:
        return f"{self.report.source}, row index {index}"

    def __iter__(self):
        for index, row in enumerate(self.data):
            problem = _row_problem(self.collator, row)
            if index < self.report.rows:  # counted on an earlier pass: decided alike, counted once
                if problem is not None and not self.skip_bad_rows:
                    raise ValueError(f"{_describe(self.where(index), problem)}\n{_SKIP_HINT}") from problem
            else:
                _judge(self.report, self.where(index), problem, self.skip_bad_rows)
            if problem is None:
                yield row

    def set_epoch(self, epoch: int) -> None:
        """Passed on, so a shuffling dataset reshuffles per epoch as it would unwrapped."""
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)


def has_text_only_examples(rows) -> bool:
    """Whether some example has no image (then the connector is idle on some batches; DDP must allow that)."""
    for row in rows:
        images = conversation_images(row["messages"]) if "messages" in row else row.get("images") or row.get("image")
        if not images:
            return True
    return False


__all__ = [
    "STAGES",
    "RECIPES",
    "StageRecipe",
    "recipe",
    "llm_trains_in_ift",
    "trainable_parts",
    "apply_stage",
    "count_parameters",
    "weights_checksum",
    "apply_lora",
    "save_lora",
    "load_lora",
    "save_connector",
    "load_connector",
    "ConnectorCheckpointCallback",
    "fsdp_units",
    "shard_blocks_with_layers",
    "InfiMMTrainer",
    "load_jsonl",
    "validate_dataset",
    "DataReport",
    "CheckedStream",
    "has_text_only_examples",
    "infer_device_map",
    "place_blocks_with_layers",
    "blocks_follow_layers",
    "meta_model",
]
