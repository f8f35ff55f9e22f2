"""`examples/convert.py`: converts a release snapshot, loads the output as remote code, compares with the snapshot."""

import importlib.util
import os
import subprocess
import sys

import pytest

import convert_fixtures as fixtures
from conftest import IMAGES_DIR, REPO, tiny_model

SCRIPT = REPO / "examples" / "convert.py"
IMAGE = str(IMAGES_DIR / "mmmu-val-chart.jpeg")


def _import_script():
    sys.path.insert(0, str(SCRIPT.parent))  # it imports `generate` from its folder
    try:
        spec = importlib.util.spec_from_file_location("convert_example", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    return {
        "release": fixtures.write_release_snapshot(tiny_model(gates=1.0), root / "release"),
        "other": fixtures.write_release_snapshot(tiny_model(seed=1, gates=1.0), root / "other"),
    }


@pytest.mark.slow
def test_converts_then_matches_the_snapshot(snapshots, tmp_path):
    output = tmp_path / "converted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(snapshots["release"]), "--output", str(output),
         "--image", IMAGE, "--prompt", "What does the chart show?"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert (output / "config.json").is_file() and (output / "modeling_infimm.py").is_file()
    assert "as transformers_modules." in result.stdout  # the folder's own code, not this package
    assert "logit difference against the snapshot read directly: 0" in result.stdout
    assert "computes what the snapshot computes" in result.stdout


def test_a_different_model_fails_the_check(snapshots, tmp_path, capsys):
    from infimm.convert_weights.__main__ import main as convert_main

    output = tmp_path / "converted"
    assert convert_main(["--input", str(snapshots["release"]), "--output", str(output)]) == 0
    script = _import_script()
    assert script.check_output(output, snapshots["release"], [IMAGE], "Describe it.") == 0
    assert script.check_output(output, snapshots["other"], [IMAGE], "Describe it.") == 1
    assert "does not compute what the snapshot does" in capsys.readouterr().err
