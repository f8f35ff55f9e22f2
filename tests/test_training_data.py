"""Checking fine-tuning data before training: `validate_dataset` runs every row through the collator's own rules and
names the file and line (or row index) of a bad row; `skip_bad_rows` leaves bad rows out and counts them. Property
tests throw generated bad rows at the collator and the validator: a batch or a `ValueError` / `OSError` with a message,
nothing else, and the validator keeps exactly the rows the collator can batch.
"""

import json
import re
import signal
import struct
import zlib
from contextlib import contextmanager

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from conftest import TOKENIZER_DIR, tiny_config

from infimm import InfiMMProcessor
from infimm.collator_infimm import IGNORE_INDEX, InfiMMDataCollator
from infimm.training_infimm import CheckedStream, validate_dataset


GOOD = {"image": "ok.png", "caption": "A red square."}
CHAT = {"messages": [
    {"role": "user", "content": [{"type": "image", "image": "ok.png"}, {"type": "text", "text": "Colour?"}]},
    {"role": "assistant", "content": "Red."},
]}


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels and holds none: Pillow's decompression-bomb guard trips on open."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def processor():
    return InfiMMProcessor.from_config(tiny_config(), AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A good image and the ways image files go wrong."""
    folder = tmp_path_factory.mktemp("images")
    PIL.Image.new("RGB", (32, 32), (200, 0, 0)).save(folder / "ok.png")
    (folder / "corrupt.png").write_bytes(b"this is not a picture")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes((folder / "ok.png").read_bytes()[:60])
    (folder / "bomb.png").write_bytes(_png_header(30000, 30000))
    (folder / "folder.png").mkdir()
    return folder


@pytest.fixture(scope="module")
def collator(processor, image_dir):
    return InfiMMDataCollator(processor, image_root=image_dir)


def _write_jsonl(path, lines):
    """Rows as JSON lines; strings are written as they are (broken JSON, blank lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# (a bad row, or a raw line, and what the error must say)
BAD_ROWS = {
    "missing image": ({"image": "missing.png", "caption": "x"}, "missing.png' does not exist.*as 'missing.png'"),
    "directory as image": ({"image": "folder.png", "caption": "x"}, "folder.png' is a directory, not an image file"),
    "corrupt image": ({"image": "corrupt.png", "caption": "x"}, "does not recognise it as an image"),
    "empty image file": ({"image": "empty.png", "caption": "x"}, r"it is empty \(0 bytes\)"),
    "truncated image": ({"image": "truncated.png", "caption": "x"}, "truncated"),
    "huge image": ({"image": "bomb.png", "caption": "x"}, "decompression bomb"),
    "placeholder without image": ({"text": "A <image> alone."}, "1 `<image>` tokens but 0 images"),
    "image without placeholder": ({"text": "No placeholder.", "images": ["ok.png"]}, "0 `<image>` tokens but 1 images"),
    "placeholder count": (
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
         "images": ["ok.png", "ok.png"]},
        r"1 image placeholder\(s\) .* holds 2"),
    "images not a list": ({"text": "<image>x", "images": "ok.png"}, "`images` must be a list of images"),
    "content not text": ({"messages": [{"role": "user", "content": 5}]}, "Message 0 has content of type int"),
    "unknown role": ({"messages": [{"role": "robot", "content": "Hi"}]}, "unknown role"),
    "caption not text": ({"image": "ok.png", "caption": 7}, "`caption` must be a string"),
    "unknown kind": ({"prompt": "x"}, "Cannot tell what kind of example"),
    "broken JSON": ('{"image": "ok.png", "caption": ', "not valid JSON"),
    "not an object": ('["ok.png", "x"]', "must be a JSON object; got list"),
}


@pytest.mark.parametrize("bad, says", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_bad_jsonl_row_stops_before_training_naming_file_and_line(bad, says, collator, tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [GOOD, "", bad, CHAT])  # blank lines count as lines
    with pytest.raises(ValueError, match=f"data.jsonl, line 3: .*{says}") as caught:
        validate_dataset(path, collator)
    assert "skip_bad_rows=True" in str(caught.value) and "--skip-bad-rows" in str(caught.value)

    rows, report = validate_dataset(path, collator, skip_bad_rows=True)
    assert rows == [GOOD, CHAT]
    assert (report.rows, report.skipped) == (3, 1)
    assert len(report.reasons) == 1 and report.reasons[0].startswith(f"{path}, line 3: ")
    assert report.metrics() == {"data_rows": 3, "data_rows_skipped": 1, "data_skipped_reasons": report.reasons}
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == 2 and batch["image_mask"].all()


def test_clean_data_comes_back_as_it_is(collator, tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [GOOD, CHAT])
    rows, report = validate_dataset(path, collator)
    assert rows == [GOOD, CHAT] and report.metrics() == {"data_rows": 2, "data_rows_skipped": 0,
                                                         "data_skipped_reasons": []}
    dataset = datasets.Dataset.from_list([GOOD, GOOD])
    assert validate_dataset(dataset, collator)[0] is dataset


def test_skipping_reports_the_first_reasons_and_refuses_data_with_no_good_row(collator, tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [GOOD] + [{"image": f"gone{i}.png", "caption": "x"} for i in range(8)])
    rows, report = validate_dataset(path, collator, skip_bad_rows=True, max_reasons=3)
    assert rows == [GOOD] and (report.rows, report.skipped) == (9, 8)
    assert [reason.split(":")[0] for reason in report.reasons] == [f"{path}, line {n}" for n in (2, 3, 4)]
    assert "... and 5 more" in str(report)
    only_bad = _write_jsonl(tmp_path / "bad.jsonl", [{"image": "gone.png", "caption": "x"}])
    with pytest.raises(ValueError, match="No row of .*bad.jsonl can be used"):
        validate_dataset(only_bad, collator, skip_bad_rows=True)
    with pytest.raises(ValueError, match="holds no examples"):
        validate_dataset(_write_jsonl(tmp_path / "blank.jsonl", ["", "  "]), collator)


def test_in_memory_rows_are_named_by_index(collator):
    rows = [GOOD, CHAT, {"image": "folder.png", "caption": "x"}, GOOD]
    with pytest.raises(ValueError, match="list, row index 2: .*is a directory"):
        validate_dataset(rows, collator)
    kept, report = validate_dataset(rows, collator, skip_bad_rows=True)
    assert kept == [GOOD, CHAT, GOOD] and report.reasons[0].startswith("list, row index 2: ")

    dataset = datasets.Dataset.from_list([GOOD, {"image": "missing.png", "caption": "x"}, GOOD])
    with pytest.raises(ValueError, match="train, row index 1: .*does not exist"):
        validate_dataset(dataset, collator, name="train")
    kept, report = validate_dataset(dataset, collator, skip_bad_rows=True)
    assert isinstance(kept, datasets.Dataset) and kept.to_list() == [GOOD, GOOD] and report.skipped == 1
    with pytest.raises(ValueError, match=r"pass one split, e.g. `dataset\['train'\]`"):
        validate_dataset(datasets.DatasetDict(train=dataset), collator)


def test_a_dataset_of_mixed_kinds_has_none_in_the_other_kinds_columns(collator):
    """`datasets` gives every row every column: a pair row has `text: None`, a document row `caption: None`."""
    dataset = datasets.Dataset.from_dict({
        "text": ["<image>A red square.<|endofchunk|>", None],
        "images": [["ok.png"], None],
        "image": [None, "ok.png"],
        "caption": [None, "A red square."],
    })
    kept, report = validate_dataset(dataset, collator)
    assert kept is dataset and report.skipped == 0
    batch = collator(list(dataset))
    assert batch["input_ids"][0].tolist() == batch["input_ids"][1].tolist()  # the same sample, written two ways


def test_a_stream_is_checked_up_front_then_row_by_row(collator):
    rows = [GOOD] * 4 + [{"text": "<image> twice <image>", "images": ["ok.png"]}] + [GOOD] * 2
    stream = datasets.Dataset.from_list([{"row": json.dumps(row)} for row in rows]).to_iterable_dataset()
    stream = stream.map(lambda example: json.loads(example["row"]), remove_columns=["row"])

    with pytest.raises(ValueError, match="IterableDataset, row index 4: .*2 `<image>` tokens but 1 images"):
        validate_dataset(stream, collator, first_rows=5)  # the bad row is among the rows checked now
    checked, report = validate_dataset(stream, collator, first_rows=2)
    assert isinstance(checked, CheckedStream) and report.rows == 2
    seen = []
    with pytest.raises(ValueError, match="row index 4: "):
        for row in checked:  # the bad row never comes out
            seen.append(row)
    assert len(seen) == 4

    checked, report = validate_dataset(stream, collator, first_rows=2, skip_bad_rows=True)
    assert (report.rows, report.skipped) == (2, 0)
    for _ in range(2):  # two epochs: rows counted once
        assert [row["caption"] for row in checked] == ["A red square."] * 6
    assert (report.rows, report.skipped) == (7, 1) and report.reasons[0].startswith("IterableDataset, row index 4: ")
    with pytest.raises(ValueError, match="more than once, not a one-pass generator"):
        validate_dataset((row for row in rows), collator)


# ---------------------------------------------------------------------------------------------------- fuzz
@contextmanager
def _time_limit(seconds: float):
    """Fails a call that runs past `seconds` (hypothesis' deadline only measures calls that return)."""
    def expire(signum, frame):
        raise TimeoutError(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


FUZZ = settings(max_examples=200, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

def _garbage(scalars):
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "text", "image", "role", "content", "url", "x"]) | st.text(max_size=4), inner,
        max_size=3), max_leaves=8)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=12))
json_garbage = _garbage(json_scalars)
garbage = _garbage(json_scalars | st.binary(max_size=8) | st.floats())
texts = st.one_of(
    st.lists(st.sampled_from(["<image>", "<|endofchunk|>", "</s>", "<s>", " a cat", "\n", "\x00", "\ud800"])
             | st.text(max_size=16), max_size=6).map("".join),
    st.just(""), st.just("long " * 4000))
files = st.sampled_from(["ok.png", "missing.png", "folder.png", "corrupt.png", "empty.png", "truncated.png", "bomb.png",
                         "", "/", "/dev/null", "ok.png/inside", "data:image/png;base64,!!", "http://"])
pil_images = st.builds(lambda mode, size: PIL.Image.new(mode, size),
                       st.sampled_from(["RGB", "L", "RGBA", "P", "I;16", "F"]),
                       st.tuples(st.integers(0, 40), st.integers(0, 40)))


def _array(dtype, shape, fill):
    with np.errstate(invalid="ignore"):  # NaN or inf cast to an integer type: whatever it gives is a fine input
        return np.full(shape, fill).astype(dtype)


arrays = st.builds(_array,
                   st.sampled_from(["uint8", "float32", "int64", "bool"]),
                   st.lists(st.integers(0, 5), max_size=4).map(tuple),
                   st.sampled_from([0, 1, 0.5, 255, 300, -1, float("nan"), float("inf")]))
tensors = arrays.map(lambda array: torch.from_numpy(np.ascontiguousarray(array)))


def _rows(images, garbage):
    """Rows of every kind, each part well formed three times in four and garbage otherwise; `images` are the image
    references used."""
    def mostly(strategy):
        return st.one_of(strategy, strategy, strategy, garbage)

    items = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": mostly(texts)}),
        st.fixed_dictionaries({"type": st.just("image")}, optional={"image": images}),
        st.fixed_dictionaries({"type": st.just("image_url"),
                               "image_url": images | st.fixed_dictionaries({"url": images})}),
        texts)
    contents = mostly(texts | st.lists(mostly(items), max_size=4))
    turn = st.fixed_dictionaries({"role": mostly(st.sampled_from(["user", "assistant", "system", "tool"])),
                                  "content": contents})
    chat = st.builds(lambda user, rest: [user, *rest],
                     st.fixed_dictionaries({"role": st.just("user"), "content": contents}), st.lists(turn, max_size=3))
    image_lists = mostly(st.lists(images, max_size=3))
    return st.one_of(
        st.fixed_dictionaries({"image": images, "caption": mostly(texts)}),
        st.fixed_dictionaries({"text": mostly(texts)}, optional={"images": image_lists, "image": images}),
        st.fixed_dictionaries({"messages": mostly(chat)}, optional={"images": image_lists}),
        st.dictionaries(st.sampled_from(["messages", "text", "images", "image", "caption"]), garbage, max_size=3)
        | garbage)


rows = _rows(st.one_of(files, files, pil_images, arrays, tensors, garbage), garbage)
json_rows = _rows(files | json_garbage, json_garbage)


def _collate(collator, examples):
    """The batch, or the error, checked: only ValueError / OSError, always with a message."""
    try:
        with _time_limit(20):
            batch = collator(examples)
    except (ValueError, OSError) as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        event(f"error: {str(err)[:40]}")
        return err
    event("batch")
    return batch


def _check_batch(batch, count):
    assert batch["input_ids"].shape[0] == count
    assert batch["labels"].shape == batch["attention_mask"].shape == batch["input_ids"].shape
    targets = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][targets], batch["input_ids"][targets])
    if "pixel_values" in batch:
        assert torch.isfinite(batch["pixel_values"]).all()
        assert batch["image_mask"].shape == batch["pixel_values"].shape[:2]


@FUZZ
@given(examples=st.lists(rows, min_size=1, max_size=3))
def test_fuzz_the_collator_and_the_validator_agree(collator, examples):
    """Each row alone: a correct batch or a ValueError / OSError. The validator keeps exactly the rows that batch."""
    alone = [_collate(collator, [example]) for example in examples]
    for example, outcome in zip(examples, alone):
        if not isinstance(outcome, Exception):
            _check_batch(outcome, 1)
    good = [example for example, outcome in zip(examples, alone) if not isinstance(outcome, Exception)]
    try:
        with _time_limit(20):
            kept, report = validate_dataset(examples, collator, skip_bad_rows=True)
    except ValueError as err:
        assert not good and "No row of list can be used" in str(err)
        return
    assert len(kept) == len(good) and report.skipped == len(examples) - len(good)
    assert all(a is b for a, b in zip(kept, good))
    batch = _collate(collator, kept)
    assert not isinstance(batch, Exception), batch
    _check_batch(batch, len(kept))


lines = st.one_of(json_rows.map(lambda row: json.dumps(row).encode()), st.text(max_size=30).map(str.encode),
                  st.binary(max_size=20),
                  st.sampled_from([b"[" * 50000, b'{"text": "\\ud800"}', b"\xef\xbb\xbf{}", b"null", b"", b"   "]))


@FUZZ
@given(content=st.lists(lines, min_size=1, max_size=4))
def test_fuzz_jsonl_lines(collator, image_dir, tmp_path_factory, content):
    """Generated lines (rows, broken JSON, bytes that are not UTF-8, deep nesting): the strict check stops at the
    first bad line, the skipping one keeps the rows the collator batches; nothing else is raised."""
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    content = [line.replace(b"\n", b" ") for line in content]
    path.write_bytes(b"\n".join(content) + b"\n")
    try:
        with _time_limit(20):
            kept, report = validate_dataset(path, collator, skip_bad_rows=True)
    except ValueError as err:
        assert "holds no examples" in str(err) or "No row of" in str(err)
        return
    content[0] = content[0].removeprefix(b"\xef\xbb\xbf")  # a byte-order mark opening the file is not data
    assert report.rows == sum(1 for line in content if line.strip())
    if kept:
        assert not isinstance(_collate(collator, kept), Exception)
    if report.skipped:
        first_bad = report.reasons[0].split(": ")[0]
        with pytest.raises(ValueError, match=f"^{re.escape(first_bad)}: "):
            validate_dataset(path, collator)
    else:
        assert validate_dataset(path, collator)[0] == kept
