"""A saved InfiMM folder is a self-contained Hub repo: remote code, full `auto_map`, (sharded) safetensors.

The loading checks run in a fresh Python process where the `infimm` package cannot be imported (its entry in
`sys.modules` is `None`, the working directory is an empty folder and `PYTHONPATH` does not name the repository), so
everything must come from the saved files through `trust_remote_code=True`:

(a) the folder itself, through AutoConfig, AutoModel, AutoModelForCausalLM and AutoModelForImageTextToText;
(b) the same files placed in a Hugging Face cache as `huggingface_hub` lays one out, loaded by repo id with
    `HF_HUB_OFFLINE=1`;
(c) a copy saved in bfloat16.

The parent computes the reference logits with the in-repo classes and hands them over in a `.pt` file.
"""

import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from safetensors import safe_open

from conftest import EXPECTED_AUTO_MAP, REPO, tiny_model
from helpers_modeling import place_in_hub_cache, read_json, save_remote_code_folder
from helpers_modeling import one_torch_thread  # noqa: F401  (autouse fixture)

from infimm import InfiMMForConditionalGeneration

REPO_ID = "Infi-MM/infimm-tiny"
AUTO_MODEL_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText")
SHARD_LIMIT = 3 * 1024 * 1024

CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["infimm"] = None  # the package must not be needed: only the saved remote code may be used

    import importlib
    import traceback

    import torch
    import transformers

    folder, bf16_folder, repo_id, inputs_file, results_file, threads = sys.argv[1:]
    torch.set_num_threads(int(threads))
    inputs = torch.load(inputs_file)
    results = {}

    def importable(name):
        try:
            importlib.import_module(name)
            return True
        except ImportError:
            return False

    results["importable"] = {name: importable(name) for name in ("infimm", "modeling_infimm", "configuration_infimm")}

    def run(name, auto_class, source):
        try:
            model = getattr(transformers, auto_class).from_pretrained(source, trust_remote_code=True).eval()
            with torch.no_grad():
                logits = model(
                    input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], use_cache=False
                ).logits
            results[name] = {
                "class": type(model).__name__, "module": type(model).__module__, "dtype": str(model.dtype),
                "config_class": type(model.config).__name__, "logits": logits,
            }
        except Exception:
            results[name] = {"error": traceback.format_exc()}

    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
        results["config"] = {"class": type(config).__name__, "module": type(config).__module__,
                             "model_type": config.model_type, "auto_map": dict(config.auto_map)}
    except Exception:
        results["config"] = {"error": traceback.format_exc()}
    for auto_class in ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"):
        run("folder/" + auto_class, auto_class, folder)
    run("repo_id/AutoModelForCausalLM", "AutoModelForCausalLM", repo_id)
    run("bf16/AutoModelForCausalLM", "AutoModelForCausalLM", bf16_folder)
    torch.save(results, results_file)
    """
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = tiny_model(gates=1.0, text_config={"initializer_range": 0.05})
    config = model.config
    ids = torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, [1, 6]] = config.media_token_id
    ids[1, 4] = config.media_token_id
    pixels = torch.randn(2, 2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    pixels[1, 1] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
    # Images must matter for these logits, or equal logits would prove little.
    with torch.no_grad():
        other = model(input_ids=ids, pixel_values=pixels.flip(-1), use_cache=False).logits
    assert (other - logits).abs().max() > 1e-2

    folder = save_remote_code_folder(model, root / "infimm-tiny", max_shard_size=SHARD_LIMIT)
    bf16_folder = save_remote_code_folder(copy.deepcopy(model).to(torch.bfloat16), root / "infimm-tiny-bf16")
    # Reference for the bfloat16 copy: the in-repo class loading it (a `.to(bfloat16)` model is no reference, it
    # also rounds the rotary `inv_freq` buffers that loading recomputes in float32).
    bf16_reloaded = InfiMMForConditionalGeneration.from_pretrained(bf16_folder).eval()
    with torch.no_grad():
        bf16_logits = bf16_reloaded(input_ids=ids, pixel_values=pixels, use_cache=False).logits
    cache = root / "hf-cache"
    snapshot = place_in_hub_cache(folder, cache, REPO_ID)

    inputs_file, results_file = root / "inputs.pt", root / "results.pt"
    torch.save({"input_ids": ids, "pixel_values": pixels}, inputs_file)
    child_dir = root / "child"
    child_dir.mkdir()
    script = child_dir / "load_saved.py"
    script.write_text(CHILD)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.pop("PYTHONPATH", None)
    env.update(
        HF_HUB_CACHE=str(cache), HF_HOME=str(root / "hf-home"), HF_MODULES_CACHE=str(root / "hf-modules"),
        HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
    )
    completed = subprocess.run(
        [sys.executable, str(script), str(folder), str(bf16_folder), REPO_ID, str(inputs_file), str(results_file),
         str(torch.get_num_threads())],
        cwd=child_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return {
        "model": model, "bf16_reloaded": bf16_reloaded, "folder": folder, "bf16_folder": bf16_folder,
        "snapshot": snapshot, "cache": cache,
        "logits": logits, "bf16_logits": bf16_logits, "results": torch.load(results_file),
    }


def _loaded(hub, name):
    result = hub["results"][name]
    assert "error" not in result, result.get("error")
    return result


# ------------------------------------------------------------------------------------------ the saved folder
def test_config_json_maps_every_auto_class(hub):
    config = read_json(hub["folder"] / "config.json")
    assert config["auto_map"] == EXPECTED_AUTO_MAP
    assert config["model_type"] == "infimm"
    assert config["architectures"] == ["InfiMMForConditionalGeneration"]


def test_remote_code_files_are_copied(hub):
    for name in ("configuration_infimm.py", "modeling_infimm.py"):
        assert (hub["folder"] / name).read_bytes() == (REPO / name).read_bytes(), name


def test_safetensors_are_sharded_when_asked(hub):
    folder = hub["folder"]
    index = read_json(folder / "model.safetensors.index.json")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    expected = hub["model"].state_dict()
    assert set(index["weight_map"]) == set(expected)
    seen = set()
    for shard in shards:
        with safe_open(shard, "pt") as f:
            keys = set(f.keys())
            assert all(index["weight_map"][k] == shard.name for k in keys)
            if len(keys) > 1:  # a single tensor larger than the limit gets a shard of its own
                assert sum(4 * math.prod(f.get_slice(k).get_shape()) for k in keys) <= SHARD_LIMIT
            for key in keys:
                assert torch.equal(f.get_tensor(key), expected[key]), key
            seen |= keys
    assert seen == set(expected)


# ------------------------------------------------------------------------------- loading in a fresh process
def test_fresh_process_cannot_import_the_package(hub):
    assert hub["results"]["importable"] == {"infimm": False, "modeling_infimm": False, "configuration_infimm": False}


def test_auto_config_from_folder(hub):
    config = _loaded(hub, "config")
    assert config["class"] == "InfiMMConfig" and config["model_type"] == "infimm"
    assert config["module"].startswith("transformers_modules.")
    assert config["auto_map"] == EXPECTED_AUTO_MAP


@pytest.mark.parametrize("auto_class", AUTO_MODEL_CLASSES)
def test_each_auto_class_loads_the_folder_with_identical_logits(hub, auto_class):
    loaded = _loaded(hub, "folder/" + auto_class)
    assert loaded["class"] == "InfiMMForConditionalGeneration"
    assert loaded["module"].startswith("transformers_modules.")
    assert loaded["dtype"] == "torch.float32"
    torch.testing.assert_close(loaded["logits"], hub["logits"], atol=0, rtol=0)


def test_hub_cache_layout(hub):
    repo_dir = hub["cache"] / "models--Infi-MM--infimm-tiny"
    commit = (repo_dir / "refs" / "main").read_text()
    assert len(commit) == 40 and hub["snapshot"] == repo_dir / "snapshots" / commit
    files = sorted(p.name for p in hub["folder"].iterdir())
    assert sorted(p.name for p in hub["snapshot"].iterdir()) == files
    for name in files:
        link = hub["snapshot"] / name
        assert link.is_symlink() and link.resolve().parent == (repo_dir / "blobs").resolve()
        assert link.read_bytes() == (hub["folder"] / name).read_bytes()
    # huggingface_hub itself reads the cache as one clean repo at that revision.
    scan = scan_cache_dir(hub["cache"])
    assert not scan.warnings
    (repo,) = scan.repos
    (revision,) = repo.revisions
    assert (repo.repo_id, repo.repo_type, revision.commit_hash, revision.refs) == (REPO_ID, "model", commit, {"main"})
    assert sorted(f.file_name for f in revision.files) == files
    assert try_to_load_from_cache(REPO_ID, "config.json", cache_dir=hub["cache"]) == str(hub["snapshot"] / "config.json")


def test_loads_by_repo_id_from_the_offline_cache(hub):
    loaded = _loaded(hub, "repo_id/AutoModelForCausalLM")
    assert loaded["class"] == "InfiMMForConditionalGeneration"
    assert loaded["module"].startswith("transformers_modules.")
    torch.testing.assert_close(loaded["logits"], hub["logits"], atol=0, rtol=0)


def test_bfloat16_save_and_reload(hub):
    folder = hub["bf16_folder"]
    assert read_json(folder / "config.json")["dtype"] == "bfloat16"
    with safe_open(folder / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    reloaded = hub["bf16_reloaded"]
    assert reloaded.dtype == torch.bfloat16
    for name, param in hub["model"].named_parameters():
        assert torch.equal(reloaded.get_parameter(name), param.to(torch.bfloat16)), name
    loaded = _loaded(hub, "bf16/AutoModelForCausalLM")
    assert loaded["dtype"] == "torch.bfloat16"
    assert loaded["logits"].dtype == torch.bfloat16
    torch.testing.assert_close(loaded["logits"], hub["bf16_logits"], atol=0, rtol=0)
    # bfloat16 rounding keeps the logits near the float32 ones.
    torch.testing.assert_close(loaded["logits"].float(), hub["logits"], atol=0.1, rtol=0.05)
