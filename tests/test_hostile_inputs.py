"""Careless and hostile input at the processor's and the model's doors: no hang, no silent garbage.

Servers here bind 127.0.0.1 and are raw sockets driven by the test, so they can misbehave on purpose (trickle bytes,
stream without end, lie about their size). Every call that could hang runs in a thread joined with a bound.
"""

import base64
import io
import socket
import sys
import threading
import time

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from conftest import REPO, TOKENIZER_DIR, tiny_model

from infimm import InfiMMImageProcessor, InfiMMProcessor
from infimm.image_processing_infimm import load_image

sys.path.insert(0, str(REPO / "examples"))
import chat  # noqa: E402

sys.path.remove(str(REPO / "examples"))


def _png(size=(20, 16), colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


class MisbehavingServer:
    """An HTTP server on 127.0.0.1 whose every response is `behaviour(connection)`; stopped by `close()`."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/image.png"

    def _serve(self):
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection):
        with connection:
            try:
                connection.recv(65536)  # the request; its content does not matter here
                self.behaviour(connection, self.stop)
            except OSError:  # the client gave up: that is the point of most of these servers
                pass

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        self.listener.close()


def _headers(content_length=None, content_type="image/png") -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}", "Connection: close"]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _trickle(connection, stop):
    """A PNG header, then one byte every 0.1 s for ever."""
    connection.sendall(_headers() + _png()[:16])
    while not stop.is_set():
        connection.sendall(b"\0")
        time.sleep(0.1)


def _endless(connection, stop):
    """Bytes as fast as the client reads them, for ever, with no Content-Length."""
    connection.sendall(_headers() + _png()[:16])
    block = b"\0" * 65536
    while not stop.is_set():
        connection.sendall(block)


def _lies_about_size(connection, stop):
    connection.sendall(_headers(content_length=10**12) + _png())


def _good(connection, stop):
    data = _png()
    connection.sendall(_headers(content_length=len(data)) + data)


@pytest.fixture
def serve():
    servers = []

    def start(behaviour):
        servers.append(MisbehavingServer(behaviour))
        return servers[-1].url

    yield start
    for server in servers:
        server.close()


def _bounded(call, seconds: float):
    """Runs `call()` in a thread; returns (result, error, elapsed) or fails the test if it has not returned in time."""
    outcome = {}

    def target():
        started = time.monotonic()
        try:
            outcome["result"] = call()
        except BaseException as err:  # noqa: BLE001 - reported to the test below
            outcome["error"] = err
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call did not return within {seconds} s"
    return outcome.get("result"), outcome.get("error"), outcome["elapsed"]


# ------------------------------------------------------------------------------------------------ downloads
def test_a_trickling_server_is_cut_off_at_the_deadline(serve):
    url = serve(_trickle)
    _, error, elapsed = _bounded(lambda: load_image(url, timeout=1.0, deadline=0.6), seconds=15)
    assert isinstance(error, ValueError), error
    assert "0.6 s deadline" in str(error) and url in str(error) and "download_deadline" in str(error)
    assert elapsed < 0.6 + 1.0 + 1.0  # the deadline, plus at most one read's timeout, plus slack


def test_the_processor_applies_its_download_settings(serve):
    url = serve(_trickle)
    processor = InfiMMProcessor(InfiMMImageProcessor(image_size=14, download_deadline=0.5, download_timeout=1.0),
                                AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    _, error, _ = _bounded(lambda: processor(text="<image>x", images=[url]), seconds=15)
    assert isinstance(error, ValueError) and "0.5 s deadline" in str(error), error


def test_an_endless_stream_stops_at_the_byte_cap(serve):
    url = serve(_endless)
    _, error, _ = _bounded(lambda: load_image(url, max_bytes=2 * 2**20), seconds=20)
    assert isinstance(error, ValueError), error
    assert f"more than the {2 * 2**20}-byte cap" in str(error) and "max_download_bytes" in str(error)


def test_a_declared_size_over_the_cap_is_refused_before_the_body(serve):
    url = serve(_lies_about_size)
    _, error, _ = _bounded(lambda: load_image(url), seconds=15)
    assert isinstance(error, ValueError) and f"{10**12} bytes, over the" in str(error), error


def test_default_limits_let_an_ordinary_download_through(serve):
    image, error, _ = _bounded(lambda: load_image(serve(_good)), seconds=15)
    assert error is None and image.size == (20, 16)


def test_an_oversized_data_uri_is_refused_before_decoding():
    uri = "data:image/png;base64," + base64.b64encode(b"\0" * 3000).decode()
    with pytest.raises(ValueError, match=r"over the 1000-byte cap"):
        load_image(uri, max_bytes=1000)


def test_download_settings_are_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="download_deadline"):
        InfiMMImageProcessor(download_deadline=0)
    InfiMMImageProcessor(download_deadline=5, max_download_bytes=1000).save_pretrained(tmp_path)
    reloaded = InfiMMImageProcessor.from_pretrained(tmp_path)
    assert (reloaded.download_deadline, reloaded.max_download_bytes) == (5, 1000)


# ------------------------------------------------------------------------------------------------ local files
def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory, not an image file"):
        load_image(str(tmp_path))


def test_a_decompression_bomb_is_refused_with_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    PIL.Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is over twice the limit: refused
    with pytest.raises(ValueError, match=r"more pixels than Pillow's limit of 1000.*MAX_IMAGE_PIXELS"):
        load_image(str(path))


# ------------------------------------------------------------------------------------------------ chat example
def test_chat_attach_is_all_or_nothing(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_png())
    model = tiny_model()
    conversation = chat.Chat(model, InfiMMProcessor.from_config(model.config, AutoTokenizer.from_pretrained(TOKENIZER_DIR)))
    with pytest.raises(ValueError, match="missing.png"):
        conversation.attach(str(good), str(tmp_path / "missing.png"))
    assert conversation.pending_images == []
    conversation.attach(str(good))
    assert len(conversation.pending_images) == 1


# ------------------------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def net_and_inputs():
    model = tiny_model()
    processor = InfiMMProcessor.from_config(model.config, AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    inputs = processor(text=["<image>A red", "<image>A blue"], images=[PIL.Image.new("RGB", (30, 30), "red"),
                                                                       PIL.Image.new("RGB", (30, 30), "blue")],
                       return_tensors="pt")
    return model, inputs


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_refused_by_forward_and_generate(net_and_inputs, bad):
    model, inputs = net_and_inputs
    pixel_values = inputs["pixel_values"].clone()
    pixel_values[1, 0, 0, 3, 4] = bad
    poisoned = {**inputs, "pixel_values": pixel_values}
    with pytest.raises(ValueError, match=r"NaN or infinite values \(in \(sample, image\) \[\[1, 0\]\]"):
        model(**poisoned)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.generate(**poisoned, max_new_tokens=2, do_sample=False)


def test_empty_and_out_of_vocabulary_ids_are_refused(net_and_inputs):
    model, _ = net_and_inputs
    with pytest.raises(ValueError, match="no tokens"):
        model(input_ids=torch.zeros(1, 0, dtype=torch.long))
    for bad in (-100, model.config.text_config.vocab_size):
        ids = torch.tensor([[1, 523, bad]])
        with pytest.raises(ValueError, match=r"outside the vocabulary \(0 to 32001\)"):
            model(input_ids=ids)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)


def test_a_prompt_longer_than_the_positions_is_refused(net_and_inputs):
    model, _ = net_and_inputs
    limit = model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"{limit + 1} tokens \(0 cached \+ {limit + 1} new\).*{limit} positions"):
        model.generate(input_ids=torch.full((1, limit + 1), 523), max_new_tokens=1, do_sample=False)
    # continuing a cache: the cached tokens count too
    out = model.generate(input_ids=torch.full((1, limit - 4), 523), max_new_tokens=1, do_sample=False,
                         return_dict_in_generate=True)
    cache = out["cache" if "cache" in out else "past_key_values"]
    with pytest.raises(ValueError, match=r"cached \+ 10 new"):
        model(input_ids=torch.full((1, 10), 523), **{"cache" if "cache" in out else "past_key_values": cache})


# ------------------------------------------------------------------------------------------------ fuzzing
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_PROCESSOR = None


def _processor():
    global _PROCESSOR
    if _PROCESSOR is None:
        _PROCESSOR = InfiMMProcessor(InfiMMImageProcessor(image_size=14), AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    return _PROCESSOR


def _check(image):
    """A correct result (finite pixels of the right shape) or a ValueError/OSError with a message; nothing else."""
    try:
        out = _processor()(text="<image>x", images=[image], return_tensors="pt")
    except (ValueError, OSError) as err:
        assert str(err).strip(), "an error without a message"
        return
    assert out["pixel_values"].shape == (1, 1, 3, 14, 14)
    assert torch.isfinite(out["pixel_values"]).all()


def _mutated_png(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(data[: max(cut, 0)] if cut else data)
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    return bytes(data)


@FUZZ
@given(cut=st.integers(0, 200), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       way=st.sampled_from(["file", "data-uri", "url"]))
def test_fuzz_encoded_bytes_however_they_arrive(tmp_path_factory, cut, flips, way):
    data = _mutated_png(_png((23, 17), (10, 200, 90)), cut, flips)
    if way == "file":
        path = tmp_path_factory.mktemp("fuzz") / "image.png"
        path.write_bytes(data)
        _bounded(lambda: _check(str(path)), seconds=20)
    elif way == "data-uri":
        _bounded(lambda: _check("data:image/png;base64," + base64.b64encode(data).decode()), seconds=20)
    else:
        server = MisbehavingServer(lambda connection, stop: connection.sendall(_headers(len(data)) + data))
        try:
            _, error, _ = _bounded(lambda: _check(server.url), seconds=20)
            assert error is None, error
        finally:
            server.close()


@FUZZ
@given(shape=st.lists(st.integers(0, 6), min_size=0, max_size=5),
       dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64, np.bool_]),
       special=st.sampled_from([None, np.nan, np.inf, -1.0, 300.0]), as_tensor=st.booleans())
def test_fuzz_arrays_and_tensors(shape, dtype, special, as_tensor):
    array = np.ones(shape, dtype=np.float64) * 0.5
    if special is not None and array.size:
        array.flat[0] = special
    with np.errstate(invalid="ignore", over="ignore"):
        array = np.asarray(array.astype(dtype))
    image = torch.from_numpy(array) if as_tensor and dtype not in (np.uint16,) else array
    _, error, _ = _bounded(lambda: _check(image), seconds=20)
    assert error is None, error


@FUZZ
@given(text=st.text(max_size=40))
def test_fuzz_strings_as_image_sources(tmp_path_factory, text):
    _, error, _ = _bounded(lambda: _check(text), seconds=20)
    assert error is None, error
