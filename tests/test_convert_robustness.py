"""infimm-convert at the edges: what it refuses before doing any work, and what it leaves to check afterwards.

- `--overwrite` replaces only a folder an earlier conversion wrote (it carries the converter's marker file) or an
  empty one; any other folder is refused by name and left byte for byte as it was.
- Every shard's SHA-256 is recorded while it is written; `infimm-convert verify FOLDER` (or
  `convert_weights.verify_checksums`) finds a shard with one flipped byte and names it.
- Broken inputs stop at the door with a `ValueError`-family error naming the input and the fix: invalid JSON (file,
  line, column), an output parent that cannot be written (refused before the checkpoint is opened), too little
  free space (before a weight is read), a release config without one of its blocks or with a value of the wrong
  kind.
- Property-based: generated bad release-layout dicts thrown at `legacy_config_to_dict` and `InfiMMConfig.from_dict`,
  and bad config files (new or release format, or not JSON at all) at the converter's `load_config`, give a config
  or a `ValueError` / `OSError` with a message, never another exception type.
"""

import collections
import copy
import hashlib
import importlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import convert_fixtures as fixtures
from conftest import tiny_config, tiny_model

import infimm.convert_weights as convert_weights
from infimm.convert_weights import ConversionError
from infimm.convert_weights.__main__ import main
from infimm.convert_weights.convert import load_config
from infimm.convert_weights.reader import TensorRef
from infimm import InfiMMConfig, InfiMMForConditionalGeneration
from infimm.release_infimm import legacy_config_to_dict

SHARD = "4MB"  # the tiny model in more than one shard
MARKER = ".infimm-conversion.json"


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust-sources")
    model = tiny_model(gates=1.0)
    snapshot = fixtures.write_release_snapshot(model, root / "release")
    return {
        "root": root,
        "model": model,
        "snapshot": snapshot,
        "deepspeed": fixtures.write_deepspeed(model, root / "step1" / "mp_rank_00_model_states.pt"),
    }


def _args(sources, output, *extra):
    return ["--input", str(sources["deepspeed"]), "--config", str(sources["snapshot"] / "config.json"),
            "--output", str(output), *extra]


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """One sharded and one single-file output, converted once for the checksum tests (which only read them)."""
    root = tmp_path_factory.mktemp("robust-converted")
    assert main(_args(sources, root / "sharded", "--max-shard-size", SHARD)) == 0
    assert main(_args(sources, root / "single")) == 0
    return {"sharded": root / "sharded", "single": root / "single"}


def _tree(folder: Path) -> dict:
    """Every entry under `folder` with its mode and (for files) its bytes."""
    tree = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        tree[str(path.relative_to(folder))] = (stat.st_mode, None if path.is_dir() else path.read_bytes())
    return tree


def _partials(output):
    return sorted(p.name for p in output.parent.glob(f".{output.name}.*"))


# ------------------------------------------------------------------------------------------------ overwrite
def _someone_elses_folder(folder: Path) -> Path:
    (folder / ".git" / "objects" / "ab").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".git" / "objects" / "ab" / "cdef01").write_bytes(bytes(range(256)))
    (folder / "src").mkdir()
    (folder / "src" / "train.py").write_text("print('my code')\n")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    for name in ("notes.md", "results.json", "run.sh"):
        (folder / name).write_text(name)
    return folder


def test_overwrite_refuses_a_folder_the_converter_did_not_write(sources, tmp_path, capsys):
    out = _someone_elses_folder(tmp_path / "project")
    before = _tree(out)
    assert main(_args(sources, out, "--overwrite")) == 2
    message = capsys.readouterr().err
    assert str(out) in message, message
    assert ".git/, src/, data.csv and 3 more" in message, message
    assert "--output" in message and "delete" in message, message
    assert _tree(out) == before
    assert not _partials(out)


def test_overwrite_refusal_from_python_is_a_value_error(sources, tmp_path):
    out = _someone_elses_folder(tmp_path / "project")
    before = _tree(out)
    options = convert_weights.Options(input=sources["deepspeed"], config=sources["snapshot"] / "config.json",
                                      output=out, overwrite=True)
    with pytest.raises(ValueError, match="not written by infimm-convert") as caught:
        convert_weights.convert(options)
    assert isinstance(caught.value, ConversionError)
    assert _tree(out) == before


def test_overwrite_replaces_an_earlier_conversion(sources, tmp_path):
    out = tmp_path / "model"
    assert main(_args(sources, out)) == 0
    first = json.loads((out / MARKER).read_text())
    assert main(_args(sources, out)) == 2  # still asked for
    assert main(_args(sources, out, "--overwrite", "--max-shard-size", SHARD)) == 0
    second = json.loads((out / MARKER).read_text())
    assert "model.safetensors" in first["sha256"] and "model.safetensors" not in second["sha256"]
    assert not _partials(out)


def test_overwrite_accepts_an_empty_folder(sources, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(_args(sources, out, "--overwrite")) == 0
    assert (out / MARKER).is_file()


def test_marker_says_what_wrote_the_folder(converted):
    marker = converted["single"] / MARKER
    assert marker.stat().st_size < 1024
    record = json.loads(marker.read_text())
    assert record["written_by"] == "infimm-convert"
    assert record["version"] == __import__("infimm").__version__
    assert "mp_rank_00_model_states.pt" in record["source"]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", record["created"])


def test_marker_travels_with_a_hub_upload(converted):
    # `upload_folder` drops only its default ignore patterns (`.git`, `.cache/huggingface`): a download of the
    # repository keeps the marker, and with it the checksum of a single-file model.
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    names = [path.name for path in converted["single"].iterdir()]
    assert MARKER in filter_repo_objects(names, ignore_patterns=DEFAULT_IGNORE_PATTERNS)


# ------------------------------------------------------------------------------------------------ checksums
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_shard_checksum_is_recorded(converted):
    sharded = converted["sharded"]
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert index["metadata"]["sha256"] == {name: _sha256(sharded / name) for name in shards}
    assert json.loads((sharded / MARKER).read_text())["sha256"] == index["metadata"]["sha256"]
    single = converted["single"]
    assert json.loads((single / MARKER).read_text())["sha256"] == {
        "model.safetensors": _sha256(single / "model.safetensors")}


def test_checksum_is_taken_from_the_bytes_written(tmp_path):
    from infimm.convert_weights.writer import write_safetensors

    values = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    items = [(key, TensorRef(key, tuple(v.shape), v.dtype, loader=(lambda v=v: v)), v.dtype)
             for key, v in values.items()]
    digest = write_safetensors(tmp_path / "x.safetensors", items)
    assert digest == _sha256(tmp_path / "x.safetensors")


def _flip_a_byte_inside_a_tensor(path: Path) -> str:
    """Flips the middle byte of the file's largest tensor; returns its key."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    key = max(header, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    begin, end = header[key]["data_offsets"]
    data[8 + length + (begin + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return key


def test_intact_folders_pass_verify(converted, capsys):
    for folder in converted.values():
        assert main(["verify", str(folder)]) == 0
        assert "match" in capsys.readouterr().out
        assert convert_weights.verify_checksums(folder)


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_flipped_byte_is_reported_as_corruption(converted, tmp_path, capsys, layout):
    folder = shutil.copytree(converted[layout], tmp_path / layout)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    victim = shards[-1]
    _flip_a_byte_inside_a_tensor(folder / victim)
    assert main(["verify", str(folder)]) != 0
    message = capsys.readouterr().err
    assert victim in message and "corrupt" in message, message
    assert all(name not in message for name in shards if name != victim), message
    with pytest.raises(ConversionError, match=re.escape(victim)):
        convert_weights.verify_checksums(folder)
    # the loader, asked to check, refuses before loading any weight
    with pytest.raises(ConversionError, match=re.escape(victim)):
        InfiMMForConditionalGeneration.from_pretrained(folder, verify_checksums=True)


def test_the_loader_checks_an_intact_folder_when_asked(converted):
    model = InfiMMForConditionalGeneration.from_pretrained(converted["sharded"], verify_checksums=True)
    assert isinstance(model, InfiMMForConditionalGeneration)


def test_verify_says_when_no_checksums_were_recorded(converted, tmp_path, capsys):
    folder = shutil.copytree(converted["sharded"], tmp_path / "old")
    (folder / MARKER).unlink()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["metadata"]["sha256"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["verify", str(folder)]) != 0
    assert "no SHA-256 checksums recorded" in capsys.readouterr().err


def test_help_mentions_verify(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "verify FOLDER" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ errors at the door
def _snapshot_copy(sources, tmp_path) -> Path:
    return shutil.copytree(sources["snapshot"], tmp_path / "snapshot")


def test_invalid_json_in_a_snapshot_config_names_file_line_and_column(sources, tmp_path, capsys):
    snapshot = _snapshot_copy(sources, tmp_path)
    text = (snapshot / "config.json").read_text().replace('"visual": {', '"visual" {', 1)
    (snapshot / "config.json").write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    out = tmp_path / "out"
    assert main(["--input", str(snapshot), "--output", str(out)]) == 2
    message = capsys.readouterr().err
    for needle in (str(snapshot / "config.json"), f"line {expected.value.lineno}",
                   f"column {expected.value.colno}", "not valid JSON", "Fix"):
        assert needle in message, message
    assert not out.exists() and not _partials(out)


def test_invalid_json_in_a_config_option_is_named(sources, tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"visual": {"image_size": 28,}}')
    out = tmp_path / "out"
    assert main(["--input", str(sources["deepspeed"]), "--config", str(tmp_path / "config.json"),
                 "--output", str(out)]) == 2
    message = capsys.readouterr().err
    for needle in (str(tmp_path / "config.json"), "line 1, column 30", "Fix"):
        assert needle in message, message


def _touched(*args, **kwargs):
    raise AssertionError("the checkpoint was read before the output was checked")


def _no_checkpoint_may_be_opened(monkeypatch):
    """Opening the checkpoint or reading a weight fails the test loudly."""
    convert_module = importlib.import_module("convert_weights.convert")  # the package's `convert` is the function
    for name in ("open_file", "open_folder", "open_checkpoint"):
        monkeypatch.setattr(convert_module, name, _touched)
    monkeypatch.setattr(TensorRef, "load", _touched)


def test_read_only_output_parent_is_refused_before_any_weight_is_read(sources, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):
        # Running as root: the permission bits do not stop root's writes, and `os.access` (which the converter
        # asks) rightly says so. Have it answer for this folder as it would for any other user.
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            if Path(path) == parent and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    _no_checkpoint_may_be_opened(monkeypatch)
    try:
        assert main(_args(sources, parent / "nested" / "model")) == 2
    finally:
        parent.chmod(0o755)
    message = capsys.readouterr().err
    assert str(parent) in message and "not writable" in message and "--output" in message, message
    assert list(parent.iterdir()) == []


def test_too_little_free_space_is_refused_before_any_weight_is_read(sources, tmp_path, monkeypatch, capsys):
    usage = collections.namedtuple("usage", "total used free")
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return usage(total=10**12, used=10**12 - 123_456, free=123_456)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    # The checkpoint's header is read to plan the shards (that is where the size comes from); its weights are not.
    monkeypatch.setattr(TensorRef, "load", _touched)
    out = tmp_path / "out"
    assert main(_args(sources, out)) == 2
    message = capsys.readouterr().err
    needed = int(re.search(r"needs ([\d,]+) bytes", message).group(1).replace(",", ""))
    weights = sum(v.numel() * v.element_size() for v in sources["model"].state_dict().values())
    assert needed >= weights, message
    assert "123,456 bytes" in message and str(tmp_path) in message and "--output" in message, message
    assert asked and all(p == tmp_path for p in asked)
    assert not out.exists() and not _partials(out)


# ----------------------------------------------------------------------------------------- release configs
@pytest.mark.parametrize("block", ["language", "visual"])
def test_release_config_without_one_of_its_blocks_is_refused_by_name(block):
    legacy = fixtures.legacy_config(tiny_config())
    del legacy[block]
    for load in (legacy_config_to_dict, InfiMMConfig.from_dict):
        with pytest.raises(ValueError, match=f"no `{block}` block") as caught:
            load(copy.deepcopy(legacy))
        assert "vision_config" in str(caught.value)  # the alternative: a new-format config


def _without(block: str, key: str):
    return lambda config: config[block].pop(key)


WRONG_TYPES = [  # (edits, the field the ValueError must name)
    ([lambda c: c["language"].update(hidden_size="wide")], "hidden_size"),
    ([lambda c: c["language"].update(id2label=5)], "language.id2label"),
    ([lambda c: c["language"].update(torch_dtype=["float32"]), lambda c: c.pop("torch_dtype")], "language.torch_dtype"),
    ([_without("language", "torch_dtype"), lambda c: c.update(torch_dtype="float31")], "torch_dtype"),
    ([_without("language", "use_cache"), lambda c: c.update(use_cache="yes")], "use_cache"),
    ([lambda c: c["visual"].update(mlp_ratio=float("nan"))], "visual.mlp_ratio"),
]


@pytest.mark.parametrize("edits, field", WRONG_TYPES, ids=[field for _, field in WRONG_TYPES])
def test_release_values_of_the_wrong_kind_are_value_errors_naming_the_field(edits, field):
    legacy = fixtures.legacy_config(tiny_config())
    for edit in edits:
        edit(legacy)
    with pytest.raises(ValueError, match=re.escape(field)):
        InfiMMConfig.from_dict(legacy)


def test_snapshot_without_a_language_block_stops_with_one_message(sources, tmp_path, capsys):
    snapshot = _snapshot_copy(sources, tmp_path)
    config = json.loads((snapshot / "config.json").read_text())
    del config["language"]
    (snapshot / "config.json").write_text(json.dumps(config))
    assert main(["--input", str(snapshot), "--output", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "no `language` block" in message and "missing (" not in message, message
    with pytest.raises(ValueError, match="no `language` block"):
        InfiMMConfig.from_pretrained(snapshot)


# --------------------------------------------------------------------------------------------- property-based
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
BASE_LEGACY = fixtures.legacy_config(tiny_config())
BASE_NEW = tiny_config().to_dict()


def _settle(call, *args):
    """`call(*args)`, letting through only a result or a ValueError / OSError that says something."""
    try:
        return call(*args)
    except (ValueError, OSError) as error:
        assert str(error).strip(), f"{type(error).__name__} without a message"
        return error


def _mutated(data, base: dict, blocks: tuple[str, ...]) -> dict:
    """`base` with a few edits in it or in one of its nested blocks: a value replaced, a key removed or added."""
    config = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(("",) + blocks))
        target = config
        for part in filter(None, where.split(".")):
            if not isinstance(target.get(part), dict):
                break
            target = target[part]
        operation = data.draw(st.sampled_from(("replace", "delete", "add")))
        if operation == "add" or not target:
            target[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
            continue
        key = data.draw(st.sampled_from(sorted(target)))
        if operation == "delete":
            del target[key]
        else:
            target[key] = data.draw(JSON_VALUES)
    return config


@FUZZ
@given(data=st.data())
def test_fuzzed_release_configs_give_a_config_or_a_value_error(data):
    legacy = _mutated(data, BASE_LEGACY, ("visual", "language"))
    _settle(legacy_config_to_dict, copy.deepcopy(legacy))
    _settle(InfiMMConfig.from_dict, legacy)


@FUZZ
@given(visual=JSON_VALUES, language=JSON_VALUES, top=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3))
def test_arbitrary_release_blocks_give_a_config_or_a_value_error(visual, language, top):
    _settle(InfiMMConfig.from_dict, {**top, "visual": visual, "language": language})


@FUZZ
@given(data=st.data())
def test_fuzzed_new_format_configs_give_a_config_or_a_value_error(data):
    """`InfiMMConfig.from_dict` itself (what AutoConfig and from_pretrained call), on this package's own format."""
    config = _mutated(data, BASE_NEW, ("vision_config", "vision_config.model_args", "text_config"))
    result = _settle(InfiMMConfig.from_dict, config)
    assert isinstance(result, (InfiMMConfig, ValueError)), type(result)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.data())
def test_converter_reads_fuzzed_config_files_or_refuses_them(fuzz_dir, data):
    base = data.draw(st.sampled_from((BASE_NEW, BASE_LEGACY)))
    blocks = ("vision_config", "vision_config.model_args", "text_config") if base is BASE_NEW else (
        "visual", "language")
    text = json.dumps(_mutated(data, base, blocks))
    (fuzz_dir / "config.json").write_text(text)
    result = _settle(load_config, fuzz_dir / "config.json")
    assert isinstance(result, (InfiMMConfig, ConversionError)), type(result)


@FUZZ
@given(raw=st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64),
    st.integers(0, 400).map(lambda cut: json.dumps(BASE_NEW)[:cut]),
    JSON_VALUES.map(json.dumps),
))
def test_converter_refuses_bad_json_text_by_name(fuzz_dir, raw):
    path = fuzz_dir / "config.json"
    path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    result = _settle(load_config, path)
    if isinstance(result, ConversionError):
        assert str(path) in str(result)
