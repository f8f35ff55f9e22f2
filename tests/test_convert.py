"""infimm-convert: every checkpoint layout in the wild becomes a Hub folder computing the starting model's logits.

One tiny model is written out in each checkpoint layout the README lists ("Converting checkpoints") by `convert_fixtures`
(the release snapshot with its alias lists and EVA-CLIP naming, a DeepSpeed `module` file, a plain safetensors
state dict, and parts: a Hugging Face LLM folder, an EVA-CLIP file and an OpenFlamingo trainable-only connector).
Each is converted, and all outputs are loaded in ONE fresh Python process in which the `infimm` package cannot be
imported (`sys.modules["infimm"] = None`, an empty working directory, no `PYTHONPATH`), through
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`; the logits must equal the starting model's
bit for bit. The failure modes (missing / unexpected / mis-shaped keys, truncated files, pickles that are not
weights only, an existing output, an interrupted run) must stop with a message and leave no folder behind; more of
them (overwrite, checksums, errors at the door, fuzzed configs) are in `test_convert_robustness.py`.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

import convert_fixtures as fixtures
from conftest import EXPECTED_AUTO_MAP, REPO, tiny_model
from helpers_modeling import place_in_hub_cache, standalone_lm

from infimm.convert_weights import ConversionError, is_legacy_checkpoint, load_legacy_model
from infimm.convert_weights.__main__ import main
from infimm.convert_weights.formats import FLAMINGO, INFIMM, detect_format, map_keys
from infimm.convert_weights.model_card import build_model_card
from infimm.convert_weights.reader import TensorRef
from infimm import InfiMMConfig, InfiMMForConditionalGeneration
from infimm.versions_infimm import TRANSFORMERS_REQUIREMENT
from infimm.hub_infimm import remote_code_files

SHARD = "4MB"
EOC, IMAGE = 32000, 32001

CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["infimm"] = None  # only the folder's own remote code may be used

    import importlib
    import json
    import traceback

    import torch
    import transformers

    folders, inputs_file, results_file, threads = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(int(threads))
    inputs = torch.load(inputs_file)
    results = {}
    try:
        importlib.import_module("infimm")
        results["infimm_importable"] = True
    except ImportError:
        results["infimm_importable"] = False
    for name, folder in folders.items():
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            with torch.no_grad():
                logits = model(**inputs, use_cache=False).logits
            processor = transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            results[name] = {
                "class": type(model).__name__, "module": type(model).__module__, "dtype": str(model.dtype),
                "logits": logits, "processor": type(processor).__name__,
                "token_ids": processor.tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>"]),
            }
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, results_file)
    """
)

def _clean_env(root):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.pop("PYTHONPATH", None)
    env.update(HF_HOME=str(root / "hf-home"), HF_MODULES_CACHE=str(root / "hf-modules"), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONDONTWRITEBYTECODE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _read_folder(folder) -> dict:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(folder / name, "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def _partials(output):
    return sorted(p.name for p in output.parent.glob(f".{output.name}.*"))


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reference():
    model = tiny_model(gates=1.0, text_config={"initializer_range": 0.05})
    ids = torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, [1, 6]] = IMAGE
    ids[1, 4] = IMAGE
    pixels = torch.randn(2, 2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    pixels[1, 1] = 0
    inputs = {"input_ids": ids, "pixel_values": pixels}
    logits = _logits(model, inputs)
    # The images must move these logits, or equal logits would prove little about the vision and connector weights.
    assert (_logits(model, {**inputs, "pixel_values": pixels.flip(-1)}) - logits).abs().max() > 1e-2
    return {"model": model, "inputs": inputs, "logits": logits, "state": model.state_dict()}


@pytest.fixture(scope="module")
def sources(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    model = reference["model"]
    snapshot = fixtures.write_release_snapshot(model, root / "infimm-tiny-release")
    plain = fixtures.flamingo_state_dict(model, alias_index="block", share_aliases=False)
    save_file({key: value.clone() for key, value in plain.items()}, root / "weights.safetensors")
    return {
        "root": root,
        "snapshot": snapshot,
        "deepspeed": fixtures.write_deepspeed(model, root / "global_step100" / "mp_rank_00_model_states.pt"),
        "safetensors": root / "weights.safetensors",
        "llm": fixtures.write_llm(model, root / "tiny-mistral"),
        "vision": fixtures.write_eva_clip(model, root / "EVA02_CLIP_tiny.pt"),
        "connector": fixtures.write_openflamingo(model, root / "checkpoint_2.pt"),
    }


@pytest.fixture(scope="module")
def converted(reference, sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    out = {name: root / name for name in ("release", "deepspeed", "safetensors", "parts")}
    snapshot = sources["snapshot"]
    # The release through the installed command line, in its own process.
    completed = subprocess.run(
        [sys.executable, "-m", "infimm.convert_weights", "--input", str(snapshot), "--output", str(out["release"]),
         "--max-shard-size", SHARD],
        cwd=REPO, env=_clean_env(root), capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    common = ["--config", str(snapshot / "config.json"), "--tokenizer", str(snapshot), "--max-shard-size", SHARD]
    assert main(["--input", str(sources["deepspeed"]), "--output", str(out["deepspeed"]), "--check-values",
                 *common]) == 0
    assert main(["--input", str(sources["safetensors"]), "--output", str(out["safetensors"]), *common]) == 0
    assert main(["--llm", str(sources["llm"]), "--vision", str(sources["vision"]), "--connector",
                 str(sources["connector"]), "--config", str(snapshot / "config.json"), "--output",
                 str(out["parts"]), "--max-shard-size", SHARD]) == 0

    inputs_file, results_file = root / "inputs.pt", root / "results.pt"
    torch.save(reference["inputs"], inputs_file)
    child = root / "child"
    child.mkdir()
    (child / "load.py").write_text(CHILD)
    completed = subprocess.run(
        [sys.executable, str(child / "load.py"), json.dumps({k: str(v) for k, v in out.items()}), str(inputs_file),
         str(results_file), str(torch.get_num_threads())],
        cwd=child, env=_clean_env(root), capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return {"folders": out, "results": torch.load(results_file)}


def _loaded(converted, name):
    result = converted["results"][name]
    assert "error" not in result, result.get("error")
    return result


# ------------------------------------------------------------------------- every format, loaded elsewhere
FORMATS = ("release", "deepspeed", "safetensors", "parts")


def test_fresh_process_cannot_import_the_package(converted):
    assert converted["results"]["infimm_importable"] is False


@pytest.mark.parametrize("name", FORMATS)
def test_converted_folder_gives_the_starting_models_logits(converted, reference, name):
    loaded = _loaded(converted, name)
    assert loaded["class"] == "InfiMMForConditionalGeneration"
    assert loaded["module"].startswith("transformers_modules.")
    assert loaded["dtype"] == "torch.float32"
    torch.testing.assert_close(loaded["logits"], reference["logits"], atol=0, rtol=0)
    assert loaded["processor"] == "InfiMMProcessor"
    assert loaded["token_ids"] == [EOC, IMAGE]


@pytest.mark.parametrize("name", FORMATS)
def test_every_tensor_equals_the_starting_model(converted, reference, name):
    written = _read_folder(converted["folders"][name])
    assert set(written) == set(reference["state"])
    for key, value in reference["state"].items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key


@pytest.mark.parametrize("name", FORMATS)
def test_output_folder_is_a_complete_hub_repo(converted, name):
    folder = converted["folders"][name]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == EXPECTED_AUTO_MAP
    assert config["architectures"] == ["InfiMMForConditionalGeneration"] and config["model_type"] == "infimm"
    assert "visual" not in config and "vision_config" in config and config["dtype"] == "float32"
    # the declared remote code, byte for byte, and nothing else
    assert sorted(p.name for p in folder.glob("*.py")) == remote_code_files()
    for code in remote_code_files():
        assert (folder / code).read_bytes() == (REPO / code).read_bytes(), code
    assert config["custom_pipelines"]["image-text-to-text"]["impl"] == "pipeline_infimm.InfiMMImageTextToTextPipeline"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    count = len(shards)
    assert count > 1 and shards == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    assert sorted(set(index["weight_map"].values())) == shards
    for name_ in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                  "generation_config.json", "README.md"):
        assert (folder / name_).is_file(), name_
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["auto_map"]["AutoProcessor"] == "processing_infimm.InfiMMProcessor"
    assert not list(folder.parent.glob(f".{folder.name}.*")), "staging folders left behind"


def test_release_keeps_its_generation_defaults(converted):
    generation = json.loads((converted["folders"]["release"] / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("do_sample", "top_p", "top_k", "max_new_tokens")} == {
        "do_sample": True, "top_p": 0.5, "top_k": 0, "max_new_tokens": 512}
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2


def test_model_cards_parse_with_hub_metadata(converted):
    for name, license in (("release", "cc-by-nc-4.0"), ("parts", "other")):
        card = ModelCard.load(converted["folders"][name] / "README.md")
        assert card.data.license == license
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
        assert "custom_code" in card.data.tags
        # the supported transformers range travels with the code it applies to
        assert f"transformers `{TRANSFORMERS_REQUIREMENT}`" in card.text
    release = ModelCard.load(converted["folders"]["release"] / "README.md").text
    # What was left out is reported by reason: 2 head tensors, 6 rope tables, 36 + 22 alias duplicates.
    for line in ("2 tensors: EVA-CLIP projection head", "6 tensors: rotary table",
                 "36 tensors: alias duplicate in `lang_encoder.old_decoder_blocks`",
                 "22 tensors: alias duplicate in `lang_encoder.gated_cross_attn_layers`"):
        assert line in release, line


def test_model_card_of_a_released_variant():
    card = build_model_card(
        name="someone/infimm-zephyr", config=InfiMMConfig.from_preset("infimm-zephyr"), variant="infimm-zephyr",
        license="cc-by-nc-4.0", base_model="Infi-MM/infimm-zephyr", source="the release snapshot", dropped={},
        dtype="bfloat16",
    )
    parsed = ModelCard(str(card))
    assert parsed.data.base_model == "Infi-MM/infimm-zephyr"
    assert "HuggingFaceM4/OBELICS" in parsed.data.datasets
    # The InfiMM paper / model card: Zephyr-7B pretrained 4-shot COCO 108.6, chat MMMU-val 39.4.
    assert "| 4-shot | 108.6 | 71.9 | 59.1 | 34.3 | 50.5 |" in parsed.text
    assert "39.4" in parsed.text and 'from_pretrained("someone/infimm-zephyr"' in parsed.text


def test_help_documents_every_input(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for needle in ("mp_rank_00_model_states.pt", "model_state_dict", "--llm", "--vision", "--connector",
                   "--init-connector", "--push-to-hub", "--max-shard-size", "visual"):
        assert needle in text, needle


# ----------------------------------------------------------------------------------- options and parts
def test_dtype_is_the_only_change_asked_for(reference, sources, tmp_path):
    out = tmp_path / "bf16"
    assert main(["--input", str(sources["deepspeed"]), "--config", str(sources["snapshot"] / "config.json"),
                 "--output", str(out), "--dtype", "bfloat16"]) == 0
    written = _read_folder(out)
    for key, value in reference["state"].items():
        assert written[key].dtype == torch.bfloat16 and torch.equal(written[key], value.to(torch.bfloat16)), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()


def test_fresh_connector_leaves_the_language_model_alone(reference, sources, tmp_path):
    out = tmp_path / "fresh"
    args = ["--llm", str(sources["llm"]), "--vision", str(sources["vision"]), "--init-connector",
            "--config", str(sources["snapshot"] / "config.json"), "--output", str(out)]
    assert main(args) == 0
    model = InfiMMForConditionalGeneration.from_pretrained(out).eval()
    blocks = model.model.cross_attention_layers.values()
    assert all(float(b.attn_gate.detach()) == 0 and float(b.ff_gate.detach()) == 0 for b in blocks)
    start = reference["state"]
    assert not torch.equal(model.model.resampler.latents, start["model.resampler.latents"])
    # Closed gates: with images, the logits are exactly the bare language model's.
    bare = standalone_lm(reference["model"])
    torch.testing.assert_close(_logits(model, reference["inputs"]),
                               _logits(bare, {"input_ids": reference["inputs"]["input_ids"]}), atol=0, rtol=0)
    # A second run gives the same weights (seeded), and the connector needs its flag.
    assert main(args[:-1] + [str(tmp_path / "again")]) == 0
    assert all(torch.equal(a, b) for a, b in zip(_read_folder(out).values(), _read_folder(tmp_path / "again").values()))


def test_parts_add_the_media_tokens_to_a_bare_llm(reference, sources, tmp_path):
    llm = fixtures.write_llm(reference["model"], tmp_path / "bare-llm", vocab_size=32000)
    out = tmp_path / "grown"
    assert main(["--llm", str(llm), "--vision", str(sources["vision"]), "--connector", str(sources["connector"]),
                 "--config", str(sources["snapshot"] / "config.json"), "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 32002
    assert (config["eoc_token_id"], config["media_token_id"]) == (EOC, IMAGE)
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    assert {t["content"]: t["id"] for t in tokenizer["added_tokens"] if t["id"] >= 32000} == {
        "<|endofchunk|>": EOC, "<image>": IMAGE}
    written = _read_folder(out)
    for key in ("model.language_model.model.embed_tokens.weight", "model.language_model.lm_head.weight"):
        old = reference["state"][key][:32000]
        assert written[key].shape == (32002, old.shape[1])
        assert torch.equal(written[key][:32000], old), key
        # New rows: drawn around the mean of the old ones with 1e-5 of their covariance.
        spread = (old - old.mean(0)).pow(2).mean(0).sqrt()
        assert ((written[key][32000:] - old.mean(0)).abs() < 6 * spread * 1e-5 ** 0.5 + 1e-7).all(), key


# ----------------------------------------------------------------------------------- layouts, unit level
@pytest.mark.parametrize("prefix", ["", "module.", "model.", "module.model."])
def test_release_layout_maps_to_every_model_key_whatever_the_prefix(reference, prefix):
    model = reference["model"]
    state = {prefix + key: value for key, value in fixtures.flamingo_state_dict(model).items()}
    refs = {key: TensorRef(key, tuple(v.shape), v.dtype, loader=(lambda v=v: v)) for key, v in state.items()}
    assert detect_format(refs) is FLAMINGO
    mapping = map_keys(refs, FLAMINGO, vision_tower=model.model.vision_tower.timm_model,
                       cross_attention_layers=model.config.cross_attention_layers)
    assert not mapping.unmatched
    assert set(mapping.targets) == set(reference["state"])
    for key, ref in mapping.targets.items():
        assert torch.equal(ref.load(), reference["state"][key]), key
    assert len(mapping.targets) + len(mapping.dropped) == len(state)


def test_this_packages_layout_is_recognised(reference):
    state = {"module." + key: value for key, value in reference["state"].items()}
    refs = {key: TensorRef(key, tuple(v.shape), v.dtype, loader=(lambda v=v: v)) for key, v in state.items()}
    assert detect_format(refs) is INFIMM
    assert set(map_keys(refs, INFIMM).targets) == set(reference["state"])


# ------------------------------------------------------------------------------------------ legacy loading
@pytest.mark.parametrize("shards", [1, 3])
def test_legacy_snapshot_loads_directly(reference, sources, tmp_path, shards):
    snapshot = sources["snapshot"] if shards == 1 else fixtures.write_release_snapshot(
        reference["model"], tmp_path / "sharded", shards=shards)
    assert is_legacy_checkpoint(snapshot)
    model = load_legacy_model(InfiMMForConditionalGeneration, snapshot).eval()
    assert model.dtype == torch.float32
    torch.testing.assert_close(_logits(model, reference["inputs"]), reference["logits"], atol=0, rtol=0)


def test_legacy_loading_wired_into_from_pretrained(reference, sources):
    # The recipe for `InfiMMForConditionalGeneration.from_pretrained`: legacy snapshots go through the converter's
    # mapping (which calls back `from_pretrained(None, state_dict=...)`), everything else through transformers.
    class Wired(InfiMMForConditionalGeneration):
        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
            if pretrained_model_name_or_path is not None and is_legacy_checkpoint(pretrained_model_name_or_path,
                                                                                   **kwargs):
                return load_legacy_model(cls, pretrained_model_name_or_path, *model_args, **kwargs)
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    model = Wired.from_pretrained(sources["snapshot"], dtype=torch.bfloat16)
    assert type(model) is Wired and model.dtype == torch.bfloat16
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference["state"][key].to(torch.bfloat16)), key


def test_legacy_repo_id_loads_from_the_hub_cache(reference, sources, tmp_path):
    # Offline (conftest): the repo id resolves through the cache laid out as huggingface_hub does.
    cache = tmp_path / "hub-cache"
    place_in_hub_cache(sources["snapshot"], cache, "Infi-MM/infimm-tiny-legacy")
    assert is_legacy_checkpoint("Infi-MM/infimm-tiny-legacy", cache_dir=cache)
    assert not is_legacy_checkpoint("Infi-MM/not-in-the-cache", cache_dir=cache)
    model = load_legacy_model(InfiMMForConditionalGeneration, "Infi-MM/infimm-tiny-legacy", cache_dir=cache).eval()
    torch.testing.assert_close(_logits(model, reference["inputs"]), reference["logits"], atol=0, rtol=0)


def test_converted_folder_is_not_legacy(converted):
    assert not is_legacy_checkpoint(converted["folders"]["release"])


# ---------------------------------------------------------------------------------------- failure modes
def _deepspeed_with(reference, path, edit):
    state = fixtures.flamingo_state_dict(reference["model"])
    edit(state)
    return fixtures.write_deepspeed(reference["model"], path, state=state)


def _fails(capsys, args, output, *needles):
    assert main([*args, "--output", str(output)]) == 2
    message = capsys.readouterr().err
    for needle in needles:
        assert needle in message, message
    assert not output.exists() and not _partials(output)
    return message


def _config(sources):
    return ["--config", str(sources["snapshot"] / "config.json")]


def test_missing_key_stops_the_conversion(reference, sources, tmp_path, capsys):
    path = _deepspeed_with(reference, tmp_path / "ds.pt", lambda s: s.pop("perceiver.layers.1.1.3.weight"))
    _fails(capsys, ["--input", str(path), *_config(sources)], tmp_path / "out", "missing (1)",
           "model.resampler.layers.1.ff.3.weight", "nothing was written")


def test_unexpected_keys_stop_the_conversion(reference, sources, tmp_path, capsys):
    def add(state):
        state["perceiver.layers.0.0.to_k.weight"] = torch.zeros(16, 32)
        state["lang_encoder.transformer.wte.weight"] = torch.zeros(4, 4)

    path = _deepspeed_with(reference, tmp_path / "ds.pt", add)
    _fails(capsys, ["--input", str(path), *_config(sources)], tmp_path / "out", "unexpected (2)",
           "module.perceiver.layers.0.0.to_k.weight -> model.resampler.layers.0.attn.to_k.weight",
           "module.lang_encoder.transformer.wte.weight")


def test_wrong_shape_stops_the_conversion(reference, sources, tmp_path, capsys):
    path = _deepspeed_with(reference, tmp_path / "ds.pt", lambda s: s.update({"perceiver.latents": torch.zeros(5, 32)}))
    _fails(capsys, ["--input", str(path), *_config(sources)], tmp_path / "out", "wrong shape (1)",
           "model.resampler.latents: [5, 32]", "model expects [4, 32]")


def test_differing_alias_stops_the_conversion(reference, sources, tmp_path, capsys):
    def edit(state):
        state["lang_encoder.old_decoder_blocks.2.mlp.up_proj.weight"] = state[
            "lang_encoder.old_decoder_blocks.2.mlp.up_proj.weight"] + 1

    path = _deepspeed_with(reference, tmp_path / "ds.pt", edit)
    _fails(capsys, ["--input", str(path), *_config(sources)], tmp_path / "out",
           "old_decoder_blocks.2.mlp.up_proj.weight", "differ")


def test_vision_checkpoint_for_another_image_size_is_refused(sources, tmp_path, capsys):
    config = json.loads((sources["snapshot"] / "config.json").read_text())
    config["visual"]["image_size"] = 42
    (tmp_path / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["--input", str(sources["deepspeed"]), "--config", str(tmp_path / "config.json")],
           tmp_path / "out", "pos_embed", "another image or patch size")


def test_release_config_the_tower_cannot_express_stops_the_conversion(sources, tmp_path, capsys):
    # Without `intp_freq` the release's 16x16 rotary table fits only a 16x16 patch grid, not this tower's 2x2.
    config = json.loads((sources["snapshot"] / "config.json").read_text())
    config["visual"]["intp_freq"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["--input", str(sources["deepspeed"]), "--config", str(tmp_path / "config.json")],
           tmp_path / "out", "visual.pt_hw_seq_len", "intp_freq")


def test_trainable_only_checkpoint_points_to_parts_mode(sources, tmp_path, capsys):
    _fails(capsys, ["--input", str(sources["connector"]), *_config(sources)], tmp_path / "out",
           "--llm DIR --vision FILE --connector FILE")


def test_fresh_connector_refuses_a_checkpoint_that_has_one(sources, tmp_path, capsys):
    _fails(capsys, ["--input", str(sources["deepspeed"]), "--init-connector", *_config(sources)], tmp_path / "out",
           "--init-connector asks for a fresh connector")


def test_truncated_pickle_is_reported(sources, tmp_path, capsys):
    data = sources["deepspeed"].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) * 2 // 3])
    _fails(capsys, ["--input", str(tmp_path / "cut.pt"), *_config(sources)], tmp_path / "out", "truncated")


def test_truncated_safetensors_is_reported(sources, tmp_path, capsys):
    data = sources["safetensors"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1000])
    _fails(capsys, ["--input", str(tmp_path / "cut.safetensors"), *_config(sources)], tmp_path / "out",
           "cut.safetensors is truncated")


def test_pickle_with_code_is_refused_without_running_it(reference, sources, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    path = fixtures.write_unsafe_pickle(reference["model"], tmp_path / "unsafe.pt", marker)
    message = _fails(capsys, ["--input", str(path), *_config(sources)], tmp_path / "out",
                     "holds more than tensors", "refused", "weights_only=False")
    assert not marker.exists()
    assert "argparse.Namespace" in message or "CodeInPickle" in message or "pathlib" in message


def test_existing_output_needs_overwrite(sources, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--input", str(sources["deepspeed"]), *_config(sources), "--output", str(out)]
    assert main(args) == 0
    (out / "stale.txt").write_text("left by hand in the converted folder")
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "stale.txt").is_file()
    assert main([*args, "--overwrite"]) == 0  # an earlier conversion's folder: replaced whole
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert not _partials(out)
    # Someone else's folder is never replaced (tests/test_convert_robustness.py covers it in detail).
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    assert main([*args[:-1], str(tmp_path / "mine"), "--overwrite"]) == 2
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"


def test_interrupted_run_leaves_no_folder(sources, tmp_path, monkeypatch):
    import infimm.convert_weights.writer as writer

    original, calls = writer.write_safetensors, []

    def write_then_interrupt(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(args[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_safetensors", write_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["--input", str(sources["deepspeed"]), *_config(sources), "--output", str(out), "--max-shard-size",
              SHARD])
    assert calls and not out.exists() and not _partials(out)


def test_terminated_run_leaves_no_folder(sources, tmp_path, monkeypatch):
    import infimm.convert_weights.writer as writer

    original = writer.write_safetensors

    def write_then_terminate(*args, **kwargs):
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a job scheduler would, after the first shard

    monkeypatch.setattr(writer, "write_safetensors", write_then_terminate)
    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(sources["deepspeed"]), *_config(sources), "--output", str(out), "--max-shard-size",
              SHARD])
    assert exit_.value.code == 128 + signal.SIGTERM
    assert not out.exists() and not _partials(out)
    assert signal.getsignal(signal.SIGTERM) == handler  # the command line put the previous handler back


def test_staging_folder_of_a_killed_run_is_cleared(sources, tmp_path):
    # A run killed outright (SIGKILL: no chance to clean up) leaves its staging folder; the next run removes it.
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}-x1y2"
    stale.mkdir()
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"half")
    assert main(["--input", str(sources["deepspeed"]), *_config(sources), "--output", str(out)]) == 0
    assert out.is_dir() and not stale.exists()


def test_push_to_hub_uploads_the_finished_folder(sources, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], os.listdir(kw["folder_path"]))))
    out = tmp_path / "out"
    assert main(["--input", str(sources["deepspeed"]), *_config(sources), "--output", str(out),
                 "--push-to-hub", "someone/infimm-tiny", "--private"]) == 0
    assert calls[0][:2] == ("create", "someone/infimm-tiny") and calls[0][2]["private"] is True
    assert calls[1][:2] == ("upload", "someone/infimm-tiny") and "config.json" in calls[1][2]
    assert 'from_pretrained("someone/infimm-tiny"' in (out / "README.md").read_text()


def test_conversion_error_is_also_raised_from_python(sources, tmp_path):
    from infimm.convert_weights import Options, convert

    with pytest.raises(ConversionError, match="needs the architecture"):
        convert(Options(input=sources["deepspeed"], output=tmp_path / "out"))
