"""`examples/generate.py` with no `--model`: builds, saves, reloads and runs a random InfiMM offline, in a minute, and
keeps that model in one cached folder that later runs reuse."""

import json
import multiprocessing
import os
import re
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import IMAGES_DIR, REPO


pytestmark = pytest.mark.slow

SCRIPT = REPO / "examples" / "generate.py"


def _run(tmp_path, *args, timeout=120):
    """The script in a fresh interpreter, with its own Hugging Face cache and temporary folder under `tmp_path`."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HOME": str(tmp_path / "hf"), "TMPDIR": str(tmp_path / "tmp"), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, time.perf_counter() - start


def test_random_model_end_to_end_then_reused(tmp_path):
    """No --model: the random model is built into the cache, loaded as remote code and run; a second run reuses that
    folder as it is, and neither leaves a folder in the temporary directory (each used to leave ~21 MB there)."""
    images = [str(IMAGES_DIR / "infimm-logo.webp"), str(IMAGES_DIR / "mmmu-val-chart.jpeg")]
    args = ["--image", *images, "--prompt", "Compare the two.", "--max-new-tokens", "6"]
    out, elapsed = _run(tmp_path, *args)
    assert "RANDOM weights" in out
    assert f"Images: {images[0]}, {images[1]}" in out and "Prompt: Compare the two." in out
    answer = re.search(r"Answer: (.*)\[(\d+) new tokens", out, re.S)
    assert answer is not None, out
    assert 1 <= int(answer.group(2)) <= 6
    assert elapsed < 60, f"took {elapsed:.0f} s"

    cache = tmp_path / "hf" / "infimm"
    folder = cache / "random-infimm-zephyr-seed0"
    assert f"Saved a random-weight InfiMM (scaled-down infimm-zephyr) to {folder}" in out
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"}
    assert {"processor_config.json", "chat_template.jinja", "processing_infimm.py", "modeling_infimm.py",
            "configuration_infimm.py", "model.safetensors"} <= {path.name for path in folder.iterdir()}
    weights = (folder / "model.safetensors").stat()

    again, _ = _run(tmp_path, *args)
    assert f"Reusing the random-weight InfiMM (scaled-down infimm-zephyr) in {folder}" in again
    assert "Saved a random-weight" not in again
    reused = (folder / "model.safetensors").stat()
    assert (reused.st_ino, reused.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)  # not written again
    assert re.search(r"Answer: (.*)\[", again, re.S).group(1) == answer.group(1)  # greedy: the same model
    assert [path.name for path in cache.iterdir()] == [folder.name]  # no build folders left
    assert list((tmp_path / "tmp").iterdir()) == []


def _import_generate():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import generate
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return generate


def test_stale_cached_folder_is_rebuilt_once_by_concurrent_runs(tmp_path):
    """Two runs at once find a stale folder (another recipe's fingerprint): both end with one complete folder."""
    generate = _import_generate()
    cache = tmp_path / "cache"
    folder = cache / "random-infimm-zephyr-seed0"
    folder.mkdir(parents=True)
    (folder / generate.RANDOM_MODEL_MARKER).write_text(json.dumps({"fingerprint": "an older recipe", "seed": 0}))
    (folder / "model.safetensors").write_bytes(b"not a model")

    context = multiprocessing.get_context("fork")
    runs = [context.Process(target=generate.random_model_folder, args=(0, cache)) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=150)
    assert [run.exitcode for run in runs] == [0, 0]
    assert [path.name for path in cache.iterdir()] == [folder.name]  # no build or stale folders left
    marker = json.loads((folder / generate.RANDOM_MODEL_MARKER).read_text())
    assert marker == {"fingerprint": generate.random_model_fingerprint(0), "seed": 0}

    from infimm import InfiMMForConditionalGeneration

    loaded = InfiMMForConditionalGeneration.from_pretrained(folder)
    assert loaded.config.text_config.hidden_size == generate.RANDOM_MODEL_RECIPE["text_config"]["hidden_size"]
    assert all(block.attn_gate.item() == 1.0 for block in loaded.model.cross_attention_layers.values())
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert generate.random_model_folder(0, cache) == folder  # fresh now: reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert generate.random_model_fingerprint(1) != generate.random_model_fingerprint(0)


def test_defaults_use_the_bundled_sample_image():
    generate = _import_generate()
    args = generate.parse_args([])
    assert args.model is None and args.image is None and args.prompt == "Please explain this image to me."
    from infimm.hub_infimm import sample_image_path

    path = sample_image_path()
    assert path.is_file() and path.stat().st_size < 100_000
    with Image.open(path) as image:
        image.load()
        assert min(image.size) >= 336  # large enough for the 336 px tower without upscaling


def test_legacy_release_snapshot_runs(tmp_path, capsys):
    """`--model` may name an original release snapshot (legacy config.json, `model.`-prefixed pickle)."""
    legacy = pytest.importorskip("convert_weights.legacy", reason="reading release snapshots needs convert_weights")
    assert hasattr(legacy, "load_legacy_model")
    from convert_fixtures import write_release_snapshot
    from conftest import tiny_model

    snapshot = write_release_snapshot(tiny_model(), tmp_path / "infimm-zephyr-snapshot")
    generate = _import_generate()
    texts = generate.main(["--model", str(snapshot), "--image", str(IMAGES_DIR / "infimm-logo.webp"),
                           "--max-new-tokens", "3", "--greedy", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "RANDOM" not in out and "Answer: " in out
    assert isinstance(texts, list) and len(texts) == 1
