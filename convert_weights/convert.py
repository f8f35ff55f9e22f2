"""One conversion from start to end.

1. Resolve the architecture (the snapshot's config, `--config`, `--preset`, or the parts' own configs).
2. Map every source tensor through its layout's table (`formats.py`); build the model on the meta device and check
   the mapping against its state dict strictly: nothing missing, nothing unexpected, every shape equal. Nothing is
   written before this passes.
3. Write shards, config, code, tokenizer, generation config, model card and the marker file (what wrote the folder
   and each shard's SHA-256) into a staging folder beside the output, verify the folder, and rename it into place.

The output side is checked before any shard is written. First of all, before the checkpoint is opened: the output
may be created or replaced (`--overwrite` only for an earlier conversion's folder or an empty one) and its parent
is writable. Once the shard plan is known (it needs only the checkpoint's headers): its disk has room for it. The
only weights read before that are alias duplicates stored as separate copies, compared while mapping.
"""

import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from huggingface_hub.utils import tqdm
from transformers import AddedToken, AutoConfig, AutoTokenizer, GenerationConfig

from infimm import PRESETS, InfiMMConfig, InfiMMForConditionalGeneration, __version__
from infimm.hub_infimm import ASSETS_DIR, AUTO_MAP, copy_remote_code
from infimm.pipeline_infimm import CUSTOM_PIPELINE_ENTRY, PIPELINE_TASK
from infimm.processing_infimm import EOC_TOKEN, IMAGE_TOKEN
from infimm.release_infimm import RELEASE_GENERATION, check_base_fields, is_legacy_config

from .errors import ConversionError
from .formats import CAUSAL_LM, CONNECTOR_PREFIXES, EVA_CLIP, KeyMapping, detect_format, map_keys
from .model_card import RELEASE_LICENSE, VARIANTS, build_model_card
from .reader import Checkpoint, TensorRef, open_checkpoint, open_file, open_folder, read_json
from .surgery import FreshConnector, grow_rows
from .verify import verify_structure, verify_values
from .writer import (
    check_free_space, check_output, check_writable, plan_shards, staged_folder, write_marker, write_shards,
)


logger = logging.getLogger("convert_weights")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Options:
    """What to convert and how; mirrors the command line (`python -m infimm.convert_weights --help`)."""

    output: Path
    input: Path | None = None
    config: Path | None = None
    preset: str | None = None
    tokenizer: Path | None = None
    llm: Path | None = None
    vision: Path | None = None
    connector: Path | None = None
    init_connector: bool = False
    dtype: str | None = None  # None: every tensor keeps its dtype
    max_shard_size: int | str = "5GB"
    overwrite: bool = False
    check_values: bool = False
    seed: int = 0
    license: str | None = None
    repo_id: str | None = None  # name used in the model card's snippet (the `--push-to-hub` repository)


@dataclass
class Assembly:
    """Everything to write: the config and, per target key, the tensor that goes there."""

    config: object
    tensors: dict[str, TensorRef]
    dropped: list[tuple[str, str]]
    source: str
    kind: str  # "release snapshot", "checkpoint" or "parts"
    tokenizer_dir: Path | None = None
    generation: dict | None = None
    fresh_connector: bool = False
    tokenizer: object = None  # already loaded (parts mode adds the media tokens while resolving the config)


@dataclass
class Result:
    output: Path
    num_tensors: int
    total_bytes: int
    shards: list[str]
    dropped: dict[str, int]
    source: str

    def summary(self) -> str:
        lines = [
            f"Converted {self.source}",
            f"  -> {self.output}: {self.num_tensors} tensors, {self.total_bytes / 1e9:.2f} GB in {len(self.shards)} "
            "shard(s)",
        ]
        lines += [f"  left out on purpose: {count} x {reason}" for reason, count in sorted(self.dropped.items())]
        lines += [
            "Load it:",
            "  from transformers import AutoModelForCausalLM",
            f'  model = AutoModelForCausalLM.from_pretrained("{self.output}", trust_remote_code=True)',
            "Push it to the Hub (after `hf auth login`):",
            f"  hf upload <user>/{self.output.name} {self.output}",
            f"  (or run the conversion with --push-to-hub <user>/{self.output.name})",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- config
# What building a config from a user's dict can raise: the config classes' own checks (`ValueError`, transformers'
# strict field validation) and the built-in errors of code that met a value of the wrong type.
CONFIG_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, StrictDataclassError)
# Fields the config code converts with `int()` (a list or an object there fails with a message naming nothing).
_TOWER_INTS = ("img_size", "patch_size", "embed_dim", "num_heads", "depth")


def _json_type(value) -> str:
    """What a parsed JSON value is, with its article, for a message ("an array")."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def new_format_problem(config: dict) -> str | None:
    """The first value of a new-format config that is of the wrong kind, named by its field (or None): checked
    here because the config code would stop on it with an error that names nothing."""
    for block in ("vision_config", "text_config"):
        if config.get(block) is not None and not isinstance(config[block], dict):
            return f"`{block}` must be a JSON object; got {_json_type(config[block])}."
    vision = config.get("vision_config") or {}
    for where, values in (("", config), ("vision_config.", vision), ("text_config.", config.get("text_config") or {})):
        try:
            check_base_fields(values, where)
        except ValueError as error:
            return str(error)
    args = vision.get("model_args")
    if args is not None and not isinstance(args, dict):
        return f"`vision_config.model_args` must be a JSON object; got {_json_type(args)}."
    for key in _TOWER_INTS:
        value = (args or {}).get(key)
        if key in (args or {}) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f"`vision_config.model_args.{key}` must be a positive integer; got {value!r}."
    return None


def config_from_dict(config, file: Path):
    """`InfiMMConfig` from a config.json's content (legacy or new format); `ConversionError` naming the file and
    the field otherwise."""
    if not isinstance(config, dict):
        raise ConversionError(f"{file} holds {_json_type(config)}, not a JSON object: a config.json is one object "
                              "of fields ({...}). Pass the model's config.json.")
    problem = None if is_legacy_config(config) else new_format_problem(config)
    if problem:
        raise ConversionError(f"{file} is not a usable InfiMM config: {problem}")
    try:
        return InfiMMConfig.from_dict(config)
    except CONFIG_ERRORS as error:
        raise ConversionError(f"{file} is not a usable InfiMM config: {error}") from None


def load_config(path: Path):
    """A legacy (`visual` / `language` blocks) or new-format InfiMM config, from a file or a folder."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConversionError(f"No config at {path}: pass a config.json file, or a folder holding one.")
    return config_from_dict(read_json(file), file)


def _options_config(options: Options, required_for: str):
    if options.config is not None and options.preset is not None:
        raise ConversionError("Pass either --config or --preset, not both.")
    if options.config is not None:
        return load_config(options.config)
    if options.preset is not None:
        try:
            return InfiMMConfig.from_preset(options.preset)
        except ValueError as error:
            raise ConversionError(str(error)) from None
    raise ConversionError(f"{required_for} needs the architecture: pass --config FILE (a legacy or new config.json) "
                          "or --preset NAME.")


def match_variant(config) -> str | None:
    """The released variant whose shapes this config has, if any."""
    def signature(cfg):
        text, args = cfg.text_config, cfg.vision_config.model_args
        return (text.model_type, text.hidden_size, text.num_hidden_layers, text.intermediate_size,
                cfg.vision_config.architecture, args.get("embed_dim"), args.get("depth"), args.get("img_size"))

    ours = signature(config)
    for name in PRESETS:
        if signature(InfiMMConfig.from_preset(name)) == ours:
            return name
    return None


def expected_state(config):
    """(key -> (shape, dtype)) of the model built from `config` on the meta device, and its timm tower.

    Tensors tied to another one (e.g. an LM head tied to the embeddings) are left out: they are not saved."""
    with torch.device("meta"):
        model = InfiMMForConditionalGeneration(config)
    state = model.state_dict()
    owned = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    expected = {key: (tuple(value.shape), value.dtype) for key, value in state.items() if key in owned}
    return expected, model.model.vision_tower.timm_model


# --------------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(folder: Path, scratch: Path):
    """The tokenizer files of `folder`, loaded from a copy without the folder's `config.json` (a release's config
    names remote code that AutoTokenizer would otherwise ask to run)."""
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in files):
        return None
    copy = Path(tempfile.mkdtemp(dir=scratch))
    for file in files:
        shutil.copy(file, copy / file.name)
    return AutoTokenizer.from_pretrained(copy)


def add_media_tokens(tokenizer) -> tuple[int, int]:
    """Adds `<|endofchunk|>` then `<image>` as special tokens when missing; returns their ids (eoc, image)."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in (EOC_TOKEN, IMAGE_TOKEN) if token not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing],
                             special_tokens=True)
        logger.info("Added %s to the tokenizer.", missing)
    return tuple(tokenizer.convert_tokens_to_ids([EOC_TOKEN, IMAGE_TOKEN]))


def bundled_tokenizer_dir(variant: str | None) -> Path | None:
    """The released tokenizer the package ships for `variant`, if any."""
    folder = ASSETS_DIR / variant if variant else None
    return folder if folder is not None and (folder / "tokenizer.json").is_file() else None


# --------------------------------------------------------------------------------------------------- assembly
def _describe(checkpoint: Checkpoint) -> str:
    names = ", ".join(f.name for f in checkpoint.files[:3]) + (" ..." if len(checkpoint.files) > 3 else "")
    return f"{checkpoint.container} in {names}"


def _merge(mapping: KeyMapping, into: dict[str, TensorRef], dropped: list, unmatched: list):
    for key, ref in mapping.targets.items():
        if key in into:
            raise ConversionError(f"`{key}` comes from two inputs: `{into[key].origin}` and `{ref.origin}`.")
        into[key] = ref
    dropped.extend(mapping.dropped)
    unmatched.extend(mapping.unmatched)


def _snapshot_generation(file: Path) -> dict | None:
    """The snapshot's generation settings (without the version that wrote them), if it has any."""
    if not file.is_file():
        return None
    settings = read_json(file)
    if not isinstance(settings, dict):
        raise ConversionError(f"{file} holds {_json_type(settings)}, not a JSON object of generation settings; "
                              "fix it or remove it.")
    return {key: value for key, value in settings.items() if key != "transformers_version"}


def assemble_input(options: Options) -> tuple[Assembly, dict, list[str]]:
    """`--input`: a release snapshot folder, a converted folder, or a checkpoint file."""
    path = Path(options.input)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConversionError(f"{path} is a folder without config.json: not a model snapshot.")
        if options.preset:
            raise ConversionError("--preset does not apply to a snapshot folder (its config.json says the "
                                  "architecture); use --config to override it.")
        legacy = is_legacy_config(read_json(path / "config.json"))
        config = load_config(options.config) if options.config else load_config(path)
        checkpoint = open_folder(path)
        kind = "release snapshot" if legacy else "checkpoint"
        tokenizer_dir = options.tokenizer or path
        generation = _snapshot_generation(path / "generation_config.json")
        source = f"the {'release snapshot' if legacy else 'model folder'} {path.name} ({_describe(checkpoint)})"
    else:
        config = _options_config(options, f"The checkpoint file {path.name}")
        checkpoint = open_file(path)
        kind, tokenizer_dir, generation = "checkpoint", options.tokenizer, None
        source = f"{_describe(checkpoint)}"
    fmt = detect_format(checkpoint.tensors)
    expected, tower = expected_state(config)
    tensors, dropped, unmatched = {}, [], []
    mapping = map_keys(checkpoint.tensors, fmt, vision_tower=tower,
                       cross_attention_layers=config.cross_attention_layers)
    _merge(mapping, tensors, dropped, unmatched)
    assembly = Assembly(config, tensors, dropped, source, kind, tokenizer_dir, generation)
    return assembly, expected, unmatched


def assemble_parts(options: Options, scratch: Path) -> tuple[Assembly, dict, list[str]]:
    """`--llm DIR --vision FILE (--connector FILE | --init-connector)`."""
    base = _options_config(options, "Assembling from parts")
    llm_dir = Path(options.llm)
    if not (llm_dir / "config.json").is_file():
        raise ConversionError(f"--llm {llm_dir} is not a Hugging Face model folder (no config.json).")
    read_json(llm_dir / "config.json")  # a broken file is named with its line and column
    try:
        llm_config = AutoConfig.from_pretrained(llm_dir)
    except CONFIG_ERRORS as error:
        raise ConversionError(f"--llm {llm_dir}: its config.json is not a usable transformers config: "
                              f"{error}") from None
    if llm_config.model_type not in ("mistral", "llama"):
        logger.warning("The LLM is a %r model; InfiMM was released on Mistral and Llama.", llm_config.model_type)
    tokenizer_dir = Path(options.tokenizer) if options.tokenizer else llm_dir
    tokenizer = load_tokenizer(tokenizer_dir, scratch)
    if tokenizer is None:
        raise ConversionError(f"No tokenizer in {tokenizer_dir}; pass --tokenizer DIR.")
    eoc_id, image_id = add_media_tokens(tokenizer)
    vocab_size = max(llm_config.vocab_size, len(tokenizer))
    text_config = {key: value for key, value in llm_config.to_dict().items() if key != "_name_or_path"}
    text_config["vocab_size"] = vocab_size
    config_dict = base.to_dict()
    config_dict.update(text_config=text_config, media_token_id=image_id, eoc_token_id=eoc_id,
                       tie_word_embeddings=bool(getattr(llm_config, "tie_word_embeddings", False)))
    config = InfiMMConfig.from_dict(config_dict)
    expected, tower = expected_state(config)

    tensors, dropped, unmatched = {}, [], []
    llm = open_folder(llm_dir)
    llm_map = map_keys(llm.tensors, CAUSAL_LM)
    for key in ("model.language_model.model.embed_tokens.weight", "model.language_model.lm_head.weight"):
        ref = llm_map.targets.get(key)
        if ref is not None and key in expected and ref.shape[0] < expected[key][0][0]:
            llm_map.targets[key] = grow_rows(ref, expected[key][0][0], seed=options.seed)
            logger.info("%s: %d -> %d rows (new rows from the mean and covariance of the others).",
                        key, ref.shape[0], expected[key][0][0])
    _merge(llm_map, tensors, dropped, unmatched)

    vision = open_file(Path(options.vision))
    vision_map = map_keys(vision.tensors, EVA_CLIP, vision_tower=tower)
    _merge(vision_map, tensors, dropped, unmatched)

    parts = [f"LLM {llm_dir.name}", f"vision {vision.path.name}"]
    if options.connector:
        connector = open_checkpoint(Path(options.connector))
        fmt = detect_format(connector.tensors)
        connector_map = map_keys(connector.tensors, fmt, cross_attention_layers=config.cross_attention_layers)
        for key, ref in list(connector_map.targets.items()):
            if key.startswith(CONNECTOR_PREFIXES):
                continue
            if key in ("model.language_model.model.embed_tokens.weight", "model.language_model.lm_head.weight"):
                # OpenFlamingo trains the embeddings of the added tokens along with the connector.
                if key in tensors:
                    dropped.append((tensors.pop(key).key, f"superseded by `{ref.key}` of the connector checkpoint"))
            else:
                raise ConversionError(f"The connector checkpoint holds `{ref.key}`, which is not part of the "
                                      "resampler or the cross-attention.")
        _merge(connector_map, tensors, dropped, unmatched)
        parts.append(f"connector {connector.path.name} ({connector.container})")
    assembly = Assembly(config, tensors, dropped, "parts: " + ", ".join(parts), "parts", tokenizer_dir,
                        tokenizer=tokenizer)
    return assembly, expected, unmatched


def check_fit(tensors: dict[str, TensorRef], expected: dict, unmatched: list[str], init_connector: bool = False):
    """Stops with every offending key listed unless `tensors` are exactly what the model expects."""
    unexpected = [f"{ref.key} -> {key}" for key, ref in tensors.items() if key not in expected] + unmatched
    wrong = [f"{key}: {list(ref.shape)} in {ref.origin or ref.key}, model expects {list(expected[key][0])}"
             for key, ref in tensors.items() if key in expected and ref.shape != expected[key][0]]
    missing = [key for key in expected if key not in tensors]
    if init_connector:
        provided = sorted(key for key in tensors if key.startswith(CONNECTOR_PREFIXES))
        if provided:
            raise ConversionError(f"--init-connector asks for a fresh connector, but the input holds connector "
                                  f"weights ({len(provided)}, e.g. {provided[:3]}); drop one of the two.")
        missing = [key for key in missing if not key.startswith(CONNECTOR_PREFIXES)]
    if not (unexpected or wrong or missing):
        return

    def listing(title, items):
        shown = "".join(f"\n    {item}" for item in items[:25])
        more = f"\n    ... and {len(items) - 25} more" if len(items) > 25 else ""
        return f"\n  {title} ({len(items)}):{shown}{more}" if items else ""

    hints = []
    if missing and all(key.startswith(CONNECTOR_PREFIXES) for key in missing):
        hints.append("the connector is missing: pass --init-connector to start it fresh (for pretraining)")
    elif missing and tensors and all(key.startswith(CONNECTOR_PREFIXES) for key in tensors):
        hints.append("the input holds only the connector (trainable parameters): assemble it with "
                     "--llm DIR --vision FILE --connector FILE")
    if wrong or missing:
        hints.append("check that --config / --preset describe this checkpoint")
    raise ConversionError(
        "The weights do not fit the model built from the config; nothing was written."
        + listing("missing", missing) + listing("unexpected", unexpected) + listing("wrong shape", wrong)
        + ("\n  Hint: " + "; ".join(hints) if hints else "")
    )


# --------------------------------------------------------------------------------------------------- writing
def output_dtypes(tensors: dict[str, TensorRef], requested: str | None) -> tuple[dict, torch.dtype]:
    """Per-key output dtype and the dominant floating dtype (by bytes), which the config records."""
    by_bytes = Counter()
    for ref in tensors.values():
        if ref.dtype.is_floating_point and ref.origin != "freshly initialised":
            by_bytes[ref.dtype] += ref.nbytes
    dominant = DTYPES[requested] if requested else (by_bytes.most_common(1)[0][0] if by_bytes else torch.float32)
    dtypes = {}
    for key, ref in tensors.items():
        if not ref.dtype.is_floating_point:
            dtypes[key] = ref.dtype
        elif requested or ref.origin == "freshly initialised":
            dtypes[key] = dominant
        else:
            dtypes[key] = ref.dtype
    return dtypes, dominant


def copy_model_code(folder: Path) -> list[str]:
    """The package's remote code (`infimm.hub_infimm.remote_code_files`) into `folder`."""
    return copy_remote_code(folder)


def save_processor(folder: Path, config, tokenizer):
    """The processor (image processor, tokenizer, chat template) with its `auto_map` in `processor_config.json`."""
    from infimm.processing_infimm import InfiMMProcessor

    InfiMMProcessor.from_config(config, tokenizer).save_pretrained(folder)


def generation_config(config, legacy: dict | None, release: bool) -> GenerationConfig:
    text = config.text_config
    values = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id}
    if legacy:
        values.update(legacy)
    elif release:
        values.update(RELEASE_GENERATION)
    return GenerationConfig(**values)


def _check_options(options: Options, output: Path) -> bool:
    """Rejects contradictory or incomplete options before any work; returns whether this is parts mode."""
    parts_mode = options.llm is not None or options.vision is not None or options.connector is not None
    if parts_mode and options.input is not None:
        raise ConversionError("Pass either --input or the parts (--llm, --vision, --connector), not both.")
    if parts_mode and not (options.llm and options.vision and (options.connector or options.init_connector)):
        raise ConversionError("Assembling from parts needs --llm DIR, --vision FILE and either --connector FILE or "
                              "--init-connector.")
    if not parts_mode and options.input is None:
        raise ConversionError("Nothing to convert: pass --input PATH, or --llm/--vision/--connector.")
    if options.dtype is not None and options.dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}; got {options.dtype!r}.")
    for path in (Path(p).absolute() for p in (options.input, options.llm, options.vision, options.connector) if p):
        if path == output or output in path.parents or path in output.parents:
            raise ConversionError(f"The output {output} overlaps the input {path}; write elsewhere.")
    check_output(output, options.overwrite)
    check_writable(output)
    return parts_mode


def _input_tokenizer(assembly: Assembly, variant: str | None, scratch: Path):
    """The snapshot's (or --tokenizer's) tokenizer, else the one the package ships for the variant; its media token
    ids must be the config's."""
    tokenizer = load_tokenizer(Path(assembly.tokenizer_dir), scratch) if assembly.tokenizer_dir else None
    if tokenizer is None and bundled_tokenizer_dir(variant) is not None:
        logger.info("Using the %s tokenizer shipped with the package.", variant)
        tokenizer = load_tokenizer(bundled_tokenizer_dir(variant), scratch)
    if tokenizer is None:
        logger.warning("No tokenizer found (pass --tokenizer DIR): the folder will have none.")
        return None
    ids = add_media_tokens(tokenizer)
    config = assembly.config
    if ids != (config.eoc_token_id, config.media_token_id):
        raise ConversionError(f"The tokenizer gives `<|endofchunk|>`, `<image>` the ids {ids}, the config "
                              f"{(config.eoc_token_id, config.media_token_id)}; they must agree.")
    return tokenizer


def convert(options: Options) -> Result:
    """Converts as `options` say; raises `ConversionError` (nothing written) when the input does not fit."""
    output = Path(options.output).absolute()
    parts_mode = _check_options(options, output)
    with tempfile.TemporaryDirectory(prefix="infimm-convert-") as scratch:
        scratch = Path(scratch)
        if parts_mode:
            assembly, expected, unmatched = assemble_parts(options, scratch)
        else:
            assembly, expected, unmatched = assemble_input(options)
        config = assembly.config
        variant = match_variant(config)
        tokenizer = assembly.tokenizer if parts_mode else _input_tokenizer(assembly, variant, scratch)
        check_fit(assembly.tensors, expected, unmatched, options.init_connector)
        if options.init_connector:
            assembly.tensors.update(FreshConnector(config, seed=options.seed).refs(expected))
            assembly.fresh_connector = True
        tensors = {key: assembly.tensors[key] for key in expected}  # in the model's order
        dtypes, dominant = output_dtypes(tensors, options.dtype)
        split = plan_shards({key: (ref.shape, dtypes[key]) for key, ref in tensors.items()}, options.max_shard_size)
        total = split.metadata["total_size"]
        check_free_space(output, total)  # the plan gives the sizes; nothing is written yet
        dropped = Counter(reason for _, reason in assembly.dropped)

        with staged_folder(output, options.overwrite) as staging:
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing shards") as bar:
                checksums = write_shards(staging, tensors, dtypes, split, bar)
            verify_structure(staging, {key: (ref.shape, dtypes[key]) for key, ref in tensors.items()})
            if options.check_values:
                verify_values(staging, tensors, dtypes)

            config.architectures = ["InfiMMForConditionalGeneration"]
            config.auto_map = dict(AUTO_MAP)
            config.custom_pipelines = {PIPELINE_TASK: dict(CUSTOM_PIPELINE_ENTRY)}  # its file is copied below
            config.dtype = dominant
            config.save_pretrained(staging)
            copy_model_code(staging)
            if tokenizer is not None:
                save_processor(staging, config, tokenizer)
            release = assembly.kind == "release snapshot" or (variant is not None and assembly.kind == "checkpoint")
            generation_config(config, assembly.generation, release).save_pretrained(staging)
            info = VARIANTS.get(variant) if variant else None
            base_model = (info.release if assembly.kind == "release snapshot" else info.llm) if info else None
            build_model_card(
                name=options.repo_id or output.name, config=config, variant=variant,
                license=options.license or ("other" if parts_mode else RELEASE_LICENSE), base_model=base_model,
                source=assembly.source, dropped=dict(dropped), dtype=options.dtype,
                fresh_connector=assembly.fresh_connector,
            ).save(staging / "README.md")
            write_marker(staging, version=__version__, source=assembly.source, checksums=checksums)

    return Result(output, len(tensors), total, sorted(split.filename_to_tensors), dict(dropped), assembly.source)


__all__ = ["Options", "Result", "convert", "load_config", "config_from_dict", "expected_state", "check_fit",
           "match_variant", "add_media_tokens", "load_tokenizer"]
