"""The supported transformers range: declared once, refused at once outside it, stated in every folder's card."""

import configparser
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import REPO, save_tiny_hub_folder

from infimm.versions_infimm import TRANSFORMERS_REQUIREMENT, unsupported_transformers_message


def _setup_requirement(package: str) -> Requirement:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = [line.split("#", 1)[0].strip() for line in parser["options"]["install_requires"].splitlines()]
    return next(Requirement(line) for line in lines if line and Requirement(line).name == package)


def test_the_package_and_the_remote_code_declare_the_same_range():
    assert _setup_requirement("transformers").specifier == Requirement(f"transformers{TRANSFORMERS_REQUIREMENT}").specifier


@pytest.mark.parametrize("version, supported", [
    ("5.17.0", True), ("5.20.2", True), ("5.25.0", True), ("5.99.1", True), ("5.26.0.dev0", True),
    ("5.16.1", False), ("5.17.0rc1", True), ("4.57.6", False), ("4.35.2", False), ("6.0.0", False),
    ("6.0.0rc1", False), ("6.0.0.dev0", False),
])
def test_range_check(version, supported):
    message = unsupported_transformers_message(version)
    assert (message is None) == supported
    if not supported:
        assert version in message and TRANSFORMERS_REQUIREMENT in message and "pip install" in message


# A fresh interpreter whose `transformers` is a stand-in reporting an old version: importing a saved folder's remote
# code must stop at its first line, before any transformers API that 4.x lacks is touched.
_SCRIPT = textwrap.dedent(
    r"""
    import importlib.util, json, sys, types, warnings
    folder, version, out = sys.argv[1], sys.argv[2], sys.argv[3]
    stand_in = types.ModuleType("transformers")
    stand_in.__version__ = version
    sys.modules["transformers"] = stand_in
    sys.modules["infimm"] = None
    spec = importlib.util.spec_from_file_location("saved", folder + "/__init__.py", submodule_search_locations=[folder])
    sys.modules["saved"] = importlib.util.module_from_spec(spec)
    report = {}
    for name in ("configuration_infimm", "image_processing_infimm", "processing_infimm", "modeling_infimm"):
        sys.modules.pop("saved.versions_infimm", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                __import__(f"saved.{name}")
                report[name] = ["imported", ""]
            except ImportError as err:
                report[name] = ["ImportError", str(err)]
            except Exception as err:
                report[name] = [type(err).__name__, str(err)]
        report[name].append([str(w.message) for w in caught if "InfiMM" in str(w.message)])
    json.dump(report, open(out, "w"))
    """
)


@pytest.fixture(scope="module")
def package_folder(hub_folder, tmp_path_factory):
    """A copy of the saved folder that Python can import as a package (the remote code uses relative imports)."""
    folder = shutil.copytree(hub_folder, tmp_path_factory.mktemp("package") / "saved")
    (folder / "__init__.py").write_text("")
    return folder


def _import_under(folder: Path, version: str, tmp_path: Path, **env) -> dict:
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(folder), version, str(out)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": "", **env}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("version", ["4.57.6", "6.0.0"])
def test_remote_code_refuses_an_unsupported_transformers_at_once(package_folder, tmp_path, version):
    report = _import_under(package_folder, version, tmp_path)
    for name, (outcome, message, _) in report.items():
        assert outcome == "ImportError", (name, outcome, message)
        assert f"transformers {version}" in message and TRANSFORMERS_REQUIREMENT in message, message


def test_the_check_can_be_skipped_with_a_warning(package_folder, tmp_path):
    report = _import_under(package_folder, "4.57.6", tmp_path, INFIMM_SKIP_TRANSFORMERS_CHECK="1")
    outcome, message, warned = report["configuration_infimm"]
    # past the check, the stand-in transformers has no AutoConfig: the import fails later, after a warning
    assert warned and "4.57.6" in warned[0]
    assert "InfiMM's model code supports" not in message


def test_saved_folder_card_states_the_range(hub_folder):
    import transformers

    card = (hub_folder / "README.md").read_text()
    assert f"transformers `{TRANSFORMERS_REQUIREMENT}`" in card
    assert f"Written with transformers {transformers.__version__}" in card
    assert "library_name: transformers" in card and "pipeline_tag: image-text-to-text" in card


def test_saving_again_keeps_a_card_the_user_wrote(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my own card\n")
    save_tiny_hub_folder(folder)
    assert (folder / "README.md").read_text() == "my own card\n"
