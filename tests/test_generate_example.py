"""`examples/generate.py` with no `--model`: builds, saves, reloads and runs a random InfiMM offline, in a minute."""

import json
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


def test_random_model_end_to_end(tmp_path):
    folder = tmp_path / "random-infimm"
    images = [str(IMAGES_DIR / "infimm-logo.webp"), str(IMAGES_DIR / "mmmu-val-chart.jpeg")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(folder), "--image", *images, "--prompt", "Compare the two.",
         "--max-new-tokens", "6"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "RANDOM weights" in out
    assert f"Images: {images[0]}, {images[1]}" in out and "Prompt: Compare the two." in out
    answer = re.search(r"Answer: (.*)\[(\d+) new tokens", out, re.S)
    assert answer is not None, out
    assert 1 <= int(answer.group(2)) <= 6
    assert elapsed < 60, f"took {elapsed:.0f} s"

    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"}
    assert {"processor_config.json", "chat_template.jinja", "processing_infimm.py", "modeling_infimm.py",
            "configuration_infimm.py", "model.safetensors"} <= {path.name for path in folder.iterdir()}


def test_defaults_use_the_bundled_sample_image():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import generate
    finally:
        sys.path.remove(str(SCRIPT.parent))
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
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import generate
    finally:
        sys.path.remove(str(SCRIPT.parent))
    texts = generate.main(["--model", str(snapshot), "--image", str(IMAGES_DIR / "infimm-logo.webp"),
                           "--max-new-tokens", "3", "--greedy", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "RANDOM" not in out and "Answer: " in out
    assert isinstance(texts, list) and len(texts) == 1
