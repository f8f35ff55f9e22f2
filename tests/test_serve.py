"""`infimm serve`: transformers' own server on a tiny random InfiMM folder, used through the official `openai` client.

Each answer is compared with the processor + `generate()` run here, in the test process, with the settings the
server derives from the request (transformers/cli/serving: `BaseHandler._build_generation_kwargs` starts from the
model's generation config and its `do_sample`, `temperature`, `top_k`, `top_p`; `temperature` 0 turns sampling
off; `max_tokens` is `max_new_tokens`, `stop` is `stop_strings`, `seed` seeds torch before `generate()`).

Two servers, each started once for the module in a subprocess on 127.0.0.1 (a free port, bounded waits, stopped by
process group): one plain, with tight image limits, on a copy of the folder whose generation config samples; one
with `--continuous-batching` and `--allow-local-images`. A local HTTP server on 127.0.0.1 serves the image URLs.
"""

import base64
import importlib.metadata
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from packaging import version

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
if version.parse(transformers.__version__).release < (5, 25):
    pytest.skip("`infimm serve` builds on the server of transformers >= 5.25", allow_module_level=True)
try:
    importlib.metadata.distribution("infimm")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("the server runs `python -m infimm.serve`: install the package (pip install -e '.[serve]')",
                allow_module_level=True)

from infimm import InfiMMForConditionalGeneration, InfiMMProcessor  # noqa: E402

EOS = 2
STARTUP_TIMEOUT = 240.0  # seconds for a server to answer /health (imports, model process, load) on a busy machine
# The plain server's limits: small enough for test images to cross them.
MAX_PIXELS, MAX_BYTES, DEADLINE, MAX_IMAGES = 10_000, 64 * 1024, 2.0, 2
SAMPLING = {"do_sample": True, "top_k": 20, "top_p": 0.9}  # the plain server's folder's generation config


# ------------------------------------------------------------------------------------------------------ images
def png(side: int, seed: int = 0, solid: bool = False) -> bytes:
    """A PNG of `side` x `side` pixels: noise, or one colour (a few hundred bytes however large)."""
    if solid:
        pixels = np.full((side, side, 3), 200, dtype=np.uint8)
    else:
        pixels = np.random.RandomState(seed).randint(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def pil(data: bytes) -> PIL.Image.Image:
    return PIL.Image.open(io.BytesIO(data))


RED, BLUE, GREEN = png(32, seed=1), png(40, seed=2), png(24, seed=3)


class _ImageRoutes(BaseHTTPRequestHandler):
    """The image URLs: a picture, a text page, a body over the byte cap without a declared length, and a picture
    trickled one byte at a time (past the download deadline)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/slow.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for byte in BLUE[:60]:  # at most 60 x 0.25 s: the reader gives up at its deadline and hangs up
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.25)  # the slow peer this route plays, not a wait of the test
            return
        routes = {
            "/red.png": ("image/png", RED, True),
            "/page.txt": ("text/plain", b"not a picture\n" * 10, True),
            "/big.png": ("image/png", png(256, seed=4), False),  # ~190 KB, no Content-Length: the cap cuts the read
        }
        if self.path not in routes:
            self.send_error(404)
            return
        content_type, body, declare_length = routes[self.path]
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if declare_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageRoutes)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------------------------------- servers
@dataclass
class Server:
    process: subprocess.Popen
    port: int
    model: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=120, max_retries=0)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(folder: Path, log: Path, *options: str) -> Server:
    port = _free_port()
    command = [sys.executable, "-m", "infimm.serve", str(folder), "--port", str(port), "--device", "cpu", *options]
    # One torch thread, as in this process (conftest): the same reductions, so the same greedy tokens.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Server(process, port, str(folder), log)


def _wait_until_ready(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)  # bounded polling
    pytest.fail(f"the server did not answer /health within {STARTUP_TIMEOUT:.0f} s:\n{server.log_tail()}")


def _stop(server: Server) -> None:
    """The server's process group (API server, model process, multiprocessing's tracker), by its id."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
        try:
            os.killpg(server.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def folders(hub_folder, tmp_path_factory):
    """The shared tiny folder (greedy by default), and a copy whose generation config samples."""
    sampling = tmp_path_factory.mktemp("serve") / "tiny-infimm-sampling"
    shutil.copytree(hub_folder, sampling)
    path = sampling / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **SAMPLING}, indent=2))
    return {"greedy": Path(hub_folder), "sampling": sampling}


@pytest.fixture(scope="module")
def servers(folders, tmp_path_factory):
    """Both servers, started together (their start-up is mostly imports and loading, in separate processes)."""
    logs = tmp_path_factory.mktemp("serve-logs")
    started = {}
    try:
        started["plain"] = _start(
            folders["sampling"], logs / "plain.log",
            "--max-image-pixels", str(MAX_PIXELS), "--max-image-bytes", str(MAX_BYTES),
            "--image-download-deadline", str(DEADLINE), "--max-images-per-request", str(MAX_IMAGES),
        )
        started["batching"] = _start(
            folders["greedy"], logs / "batching.log",
            "--continuous-batching", "--allow-local-images", "--enable-log-requests",
            # The KV cache's size; left to itself, on a CPU it takes 60% of the machine's memory.
            "--cb-block-size", "32", "--cb-num-blocks", "64", "--cb-max-batch-tokens", "256",
        )
        yield started
    finally:
        for server in started.values():
            _stop(server)


@pytest.fixture(scope="module")
def server(servers):
    _wait_until_ready(servers["plain"])
    return servers["plain"]


@pytest.fixture(scope="module")
def batching_server(servers):
    _wait_until_ready(servers["batching"])
    return servers["batching"]


# --------------------------------------------------------------------------------------------------- reference
@pytest.fixture(scope="module")
def reference(folders):
    model = InfiMMForConditionalGeneration.from_pretrained(folders["greedy"]).eval()
    processor = InfiMMProcessor.from_pretrained(folders["greedy"])
    return model, processor


def local_answer(reference, content, max_new_tokens, seed=None, **generation):
    """The answer of processor + `generate()` here: (text, token ids). `content` is one user turn in transformers'
    form; the server receives the same turn in OpenAI's form. Greedy unless `generation` says otherwise."""
    model, processor = reference
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    generation = {"do_sample": False, **generation}
    if "stop_strings" in generation:
        generation["tokenizer"] = processor.tokenizer
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=EOS, **generation)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return processor.decode(tokens, skip_special_tokens=True), tokens


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def openai_image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(server, content, max_tokens=8, temperature=0, **kwargs):
    return server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=temperature, **kwargs,
    )


def assert_same(completion, expected):
    answer, tokens = expected
    assert completion.choices[0].message.content == answer
    assert completion.usage.completion_tokens == len(tokens)


def assert_refused(call, *phrases):
    """A 400 whose message holds `phrases` (what was wrong, what to change). transformers' server answers a
    ValueError with FastAPI's `{"detail": message}`, which the openai client keeps as the error's `body`."""
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    assert caught.value.status_code == 400
    message = caught.value.body["detail"]
    for phrase in phrases:
        assert phrase in message, message
    return message


def assert_still_serving(server, reference):
    assert_same(chat(server, "Still there?", max_tokens=2), local_answer(reference, [text("Still there?")], 2))


# -------------------------------------------------------------------------------------- answers through openai
def test_text_answer_equals_generate(server, reference):
    assert_same(chat(server, "Tell me about the sea."), local_answer(reference, [text("Tell me about the sea.")], 8))


def test_one_and_two_images_as_data_uris(server, reference):
    one = chat(server, [openai_image(data_uri(RED)), text("What is this?")])
    assert_same(one, local_answer(reference, [{"type": "image", "image": pil(RED)}, text("What is this?")], 8))
    two = chat(server, [openai_image(data_uri(RED)), text("and"), openai_image(data_uri(GREEN)), text("differ?")])
    expected = local_answer(reference, [{"type": "image", "image": pil(RED)}, text("and"),
                                        {"type": "image", "image": pil(GREEN)}, text("differ?")], 8)
    assert_same(two, expected)
    assert one.choices[0].message.content != two.choices[0].message.content


def test_image_url_from_an_http_server(server, reference, image_host):
    answer = chat(server, [openai_image(f"{image_host}/red.png"), text("Describe it.")])
    assert_same(answer, local_answer(reference, [{"type": "image", "image": pil(RED)}, text("Describe it.")], 8))


def test_streaming_equals_generate(server, reference):
    stream = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": [openai_image(data_uri(GREEN)), text("Go on.")]}],
        max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    answer, tokens = local_answer(reference, [{"type": "image", "image": pil(GREEN)}, text("Go on.")], 10)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == answer
    assert chunks[-1].usage.completion_tokens == len(tokens)
    assert len([chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]) > 1  # it streamed


def test_max_tokens_temperature_and_stop(server, reference):
    prompt = [text("Write a long story.")]
    greedy = local_answer(reference, prompt, 12)
    assert_same(chat(server, "Write a long story.", max_tokens=12), greedy)
    assert_same(chat(server, "Write a long story.", max_tokens=3), local_answer(reference, prompt, 3))

    # Sampling: the folder's generation config samples (top_k 20, top_p 0.9); the request sets the temperature and
    # the seed the model's process seeds torch with before `generate()`.
    sampled = chat(server, "Write a long story.", max_tokens=12, temperature=0.7, seed=1234)
    expected = local_answer(reference, prompt, 12, seed=1234, temperature=0.7, **SAMPLING)
    assert_same(sampled, expected)
    assert expected[1] != greedy[1]  # it sampled

    _, tokens = greedy
    _, processor = reference
    pieces = [processor.decode([token]).strip() for token in tokens]
    stop = next(piece for piece in pieces[2:] if len(piece) >= 2)
    stopped = chat(server, "Write a long story.", max_tokens=12, stop=[stop])
    expected = local_answer(reference, prompt, 12, stop_strings=[stop])
    assert_same(stopped, expected)
    assert len(expected[1]) < len(tokens) and expected[0].endswith(stop)


def test_four_concurrent_clients(server, reference):
    prompts = ["One.", "Two words.", "Three words here.", "And four words now."]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda prompt: chat(server, [openai_image(data_uri(RED)), text(prompt)]), prompts))
    for prompt, answer in zip(prompts, answers):
        assert_same(answer, local_answer(reference, [{"type": "image", "image": pil(RED)}, text(prompt)], 8))


def test_models_endpoint_lists_the_served_folder(server):
    assert [model.id for model in server.client().models.list().data] == [server.model]


def test_legacy_completions_endpoint(server, reference):
    model, processor = reference
    inputs = processor.tokenizer("Once upon a time", return_tensors="pt")  # the endpoint tokenizes the prompt alone
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=EOS)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    answer = server.client().completions.create(model=server.model, prompt="Once upon a time", max_tokens=6,
                                                temperature=0)
    assert answer.choices[0].text == processor.decode(tokens, skip_special_tokens=True)
    assert answer.usage.completion_tokens == len(tokens)


def test_responses_api_with_an_image(server, reference):
    response = server.client().responses.create(
        model=server.model, max_output_tokens=8, temperature=0,
        input=[{"role": "user", "content": [{"type": "input_image", "image_url": data_uri(BLUE)},
                                            {"type": "input_text", "text": "What is shown?"}]}],
    )
    answer, tokens = local_answer(reference, [{"type": "image", "image": pil(BLUE)}, text("What is shown?")], 8)
    assert response.output_text == answer
    assert response.usage.output_tokens == len(tokens)


# ---------------------------------------------------------------------------------------------- command line
def test_command_line_is_transformers_serve_with_image_limits(tmp_path):
    import typer
    from typer.testing import CliRunner

    from infimm.serve import app

    command = typer.main.get_command(app).commands["serve"]
    options = {name: param for param in command.params for name in param.opts}
    for option in ("--continuous-batching", "--port", "--dtype", "--api-server-count", "--allow-local-images",
                   "--allow-image-urls", "--max-image-pixels", "--max-images-per-request", "--max-image-bytes",
                   "--image-download-deadline"):
        assert option in options
    assert options["--host"].default == "127.0.0.1"
    assert options["--allow-local-images"].default is False
    runner = CliRunner()
    release = Path(__file__).parent / "fixtures" / "infimm-zephyr"  # the original release's config.json
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    # Refused as a usage error (exit code 2) before any server starts, naming the fix.
    for folder, fix in ((release, "infimm-convert --input"), (other, "serve it with `transformers serve`")):
        refused = runner.invoke(app, ["serve", str(folder)], standalone_mode=False)
        assert isinstance(refused.exception, typer.BadParameter) and refused.exception.exit_code == 2
        assert fix in refused.exception.format_message(), refused.exception.format_message()


# ------------------------------------------------------------------------------------------------- safety
def test_image_source_policy_is_opt_in_for_library_users(tmp_path):
    from infimm.image_processing_infimm import (
        ImageSourcePolicy, image_source_policy, load_image, set_image_source_policy,
    )

    picture = tmp_path / "red.png"
    picture.write_bytes(RED)
    assert image_source_policy() == ImageSourcePolicy()  # the library's default: everything it documents
    assert load_image(str(picture)).size == (32, 32)
    previous = set_image_source_policy(ImageSourcePolicy(local_files=False, advice={"local_files": "Ask nicely."}))
    try:
        for source in (str(picture), picture.as_uri(), str(tmp_path / "missing.png")):
            with pytest.raises(ValueError, match="local paths and `file:` URLs are not accepted here.*Ask nicely"):
                load_image(source)
        assert load_image(data_uri(RED)).size == (32, 32)
    finally:
        set_image_source_policy(previous)
    assert load_image(str(picture)).size == (32, 32)


def test_local_paths_and_file_urls_are_refused(server, reference, tmp_path):
    picture = tmp_path / "picture.png"
    picture.write_bytes(RED)  # it exists and is an image: refused all the same
    for source in (str(picture), picture.as_uri()):
        assert_refused(lambda: chat(server, [openai_image(source), text("Hi")]),
                       "local paths and `file:` URLs are not accepted", "--allow-local-images")
    assert_refused(lambda: chat(server, [openai_image("/etc/hostname"), text("Hi")], stream=True),
                   "--allow-local-images")
    assert_still_serving(server, reference)


def test_downloads_need_an_image_type_a_small_body_and_a_prompt_server(server, reference, image_host):
    assert_refused(lambda: chat(server, [openai_image(f"{image_host}/page.txt"), text("Hi")]),
                   "'text/plain'", "image/*")
    assert_refused(lambda: chat(server, [openai_image(f"{image_host}/big.png"), text("Hi")]),
                   f"more than the {MAX_BYTES}-byte cap", "--max-image-bytes")
    started = time.monotonic()
    assert_refused(lambda: chat(server, [openai_image(f"{image_host}/slow.png"), text("Hi")]),
                   f"longer than the {DEADLINE:g} s deadline", "--image-download-deadline")
    assert time.monotonic() - started < DEADLINE + 8  # cut off at the deadline, not after the 15 s the peer takes
    big = png(256, seed=4)
    assert len(big) > MAX_BYTES
    assert_refused(lambda: chat(server, [openai_image(data_uri(big)), text("Hi")]), "--max-image-bytes")
    assert_still_serving(server, reference)


def test_images_over_the_pixel_cap_are_refused(server, reference):
    # 110 x 110 is past the limit but under twice it, where Pillow itself only warns; 300 x 300 is past twice it.
    for side in (110, 300):
        assert side * side > MAX_PIXELS
        assert_refused(lambda: chat(server, [openai_image(data_uri(png(side, solid=True))), text("Hi")]),
                       f"limit of {MAX_PIXELS}", "--max-image-pixels")
    assert_same(chat(server, [openai_image(data_uri(png(100, solid=True))), text("Hi")]),
                local_answer(reference, [{"type": "image", "image": pil(png(100, solid=True))}, text("Hi")], 8))


def test_requests_over_the_image_cap_are_refused(server, reference):
    content = [openai_image(data_uri(RED)), openai_image(data_uri(GREEN)), openai_image(data_uri(BLUE)), text("Hi")]
    assert_refused(lambda: chat(server, content), f"holds 3 images; this server takes at most {MAX_IMAGES}",
                   "--max-images-per-request")
    assert_still_serving(server, reference)


# ------------------------------------------------------------------------------------------ continuous batching
def test_continuous_batching_answers_text_requests_like_generate(batching_server, reference):
    prompts = ["Hello.", "A longer question about the weather today?", "Count.", "Name three colours, please."]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda prompt: chat(batching_server, prompt, max_tokens=10), prompts))
    for prompt, answer in zip(prompts, answers):
        assert_same(answer, local_answer(reference, [text(prompt)], 10))
    log = batching_server.log.read_text(errors="replace")
    assert "continuous batching, stream False" in log  # the server's own per-request line says how it ran
    assert "Falling back to sequential generation" not in log


def test_continuous_batching_serves_images_with_generate(batching_server, reference, tmp_path):
    picture = tmp_path / "green.png"
    picture.write_bytes(GREEN)
    image_item = {"type": "image", "image": pil(GREEN)}
    with ThreadPoolExecutor(3) as pool:
        jobs = [
            pool.submit(chat, batching_server, [openai_image(data_uri(GREEN)), text("What?")]),
            pool.submit(chat, batching_server, [openai_image(str(picture)), text("What?")]),  # --allow-local-images
            pool.submit(chat, batching_server, "Text in between.", max_tokens=40),  # batched while they run
        ]
        with_uri, with_path, plain = (job.result() for job in jobs)
    expected = local_answer(reference, [image_item, text("What?")], 8)
    assert_same(with_uri, expected)
    assert_same(with_path, expected)
    assert_same(plain, local_answer(reference, [text("Text in between.")], 40))
    stream = batching_server.client().chat.completions.create(
        model=batching_server.model, max_tokens=8, temperature=0, stream=True,
        messages=[{"role": "user", "content": [openai_image(data_uri(GREEN)), text("What?")]}],
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected[0]


def test_generate_batch_and_init_continuous_batching_equal_generate(reference):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model, processor = reference
    # A small KV cache: left to itself, on a CPU the manager takes 60% of the machine's memory.
    small = {"block_size": 32, "num_blocks": 64, "max_batch_tokens": 256}
    prompts = ["Hello there", "A somewhat longer prompt about boats", "Why?"]
    ids = [processor.tokenizer(prompt).input_ids for prompt in prompts]
    expected = [model.generate(torch.tensor([row]), max_new_tokens=6, do_sample=False, eos_token_id=EOS)[0, len(row):]
                .tolist() for row in ids]
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    batch = model.generate_batch(ids, generation_config=config,
                                 continuous_batching_config=ContinuousBatchingConfig(**small))
    assert [batch[f"req_{index}"].generated_tokens for index in range(len(ids))] == expected

    manager = model.init_continuous_batching(generation_config=config,
                                             continuous_batching_config=ContinuousBatchingConfig(**small))
    manager.start()
    try:
        request_ids = [manager.add_request(row, max_new_tokens=6) for row in ids]
        results = {}
        for _ in request_ids:
            result = manager.get_result(timeout=60)
            assert result is not None, "no result within 60 s"
            results[result.request_id] = result
        assert [results[request_id].generated_tokens for request_id in request_ids] == expected

        with_image = processor(text="<image>A photo of", images=[pil(RED)])["input_ids"][0]
        failed = manager.add_request(with_image, max_new_tokens=2)
        result = manager.get_result(request_id=failed, timeout=60)
        assert result is not None and result.error is not None and "text-only" in str(result.error)
    finally:
        manager.stop(block=True, timeout=60)
