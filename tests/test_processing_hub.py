"""A saved InfiMM folder works without this package: AutoProcessor, AutoModel* and the image-text-to-text pipeline.

One fresh interpreter (with `infimm` made unimportable, working directory a temporary folder) loads everything with
`trust_remote_code=True` and reports what it got; the tests compare that with the release's token ids, the
torchvision pixel reference and a generation run here on the same weights.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXPECTED_AUTO_MAP, IMAGES_DIR
from infimm.hub_infimm import remote_code_files
from test_processing import QUESTION, RELEASE_IDS, reference_pixels


pytestmark = pytest.mark.slow

LOGO = IMAGES_DIR / "infimm-logo.webp"
MAX_NEW_TOKENS = 4

_SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    sys.modules["infimm"] = None  # the saved folder must be self-sufficient
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, logo, out = sys.argv[1], sys.argv[2], sys.argv[3]
    report = {}
    try:
        import infimm  # noqa: F401
        report["infimm_importable"] = True
    except ImportError:
        report["infimm_importable"] = False

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    report["processor"] = [type(processor).__module__, type(processor).__name__, type(processor.image_processor).__name__]
    messages = [{"role": "user", "content": [{"type": "image", "image": logo}, {"type": "text", "text": sys.argv[4]}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    report["ids"] = inputs["input_ids"].tolist()
    report["image_mask"] = inputs["image_mask"].tolist()
    np.save(out + "/pixels.npy", inputs["pixel_values"].numpy())

    import transformers.models.auto.image_processing_auto as image_processing_auto
    from transformers import AutoImageProcessor

    choices = {"use_fast=True": {"use_fast": True}, "use_fast=False": {"use_fast": False}, "default": {}}
    if hasattr(image_processing_auto, "_resolve_backend"):  # transformers with the `backend=` argument
        choices.update({"backend=torchvision": {"backend": "torchvision"}, "backend=pil": {"backend": "pil"}})
    report["image_processors"] = {}
    for label, kwargs in choices.items():
        image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, **kwargs)
        report["image_processors"][label] = [type(image_processor).__module__, type(image_processor).__name__,
                                             dict(image_processor.crop_size)]
        pixels = image_processor(Image.open(logo), return_tensors="pt")["pixel_values"]
        np.save(out + f"/pixels-{label}.npy", pixels.numpy())

    report["auto"] = {
        "config": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__,
        "model": type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__,
        "causal_lm": type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)).__name__,
    }
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    report["model_module"] = type(model).__module__

    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    report["plain"] = pipe(images=Image.open(logo), text="<image>A picture of", max_new_tokens=int(sys.argv[5]),
                           do_sample=False)[0]["generated_text"]
    chat = pipe(text=messages, max_new_tokens=int(sys.argv[5]), do_sample=False)[0]["generated_text"]
    report["chat"] = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "<list>"} for m in chat]
    report["chat_new"] = pipe(text=messages, max_new_tokens=int(sys.argv[5]), do_sample=False,
                              return_full_text=False)[0]["generated_text"]
    with open(out + "/report.json", "w") as handle:
        json.dump(report, handle)
    """
)


@pytest.fixture(scope="module")
def fresh_report(hub_folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fresh")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules"),
           "PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(hub_folder), str(LOGO), str(workdir), QUESTION, str(MAX_NEW_TOKENS)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((workdir / "report.json").read_text())
    report["pixels"] = np.load(workdir / "pixels.npy")
    report["workdir"] = workdir
    return report


def test_folder_layout(hub_folder):
    names = {path.name for path in hub_folder.iterdir()}
    assert {"config.json", "processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
            "configuration_infimm.py", "modeling_infimm.py", "processing_infimm.py", "image_processing_infimm.py",
            "model.safetensors"} <= names
    assert json.loads((hub_folder / "config.json").read_text())["auto_map"] == EXPECTED_AUTO_MAP
    processor_config = json.loads((hub_folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_infimm.InfiMMProcessor"
    # a (PIL, torchvision) pair, so `use_fast` / `backend` can pick either class
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == [
        "image_processing_infimm.InfiMMImageProcessor", "image_processing_infimm.InfiMMImageProcessorFast"]
    assert processor_config["image_processor"]["crop_size"] == {"height": 28, "width": 28}
    assert "<|endofchunk|><image>" in (hub_folder / "chat_template.jinja").read_text()
    # exactly the declared remote code travels (the fresh-process tests below load it without the package)
    assert sorted(path.name for path in hub_folder.glob("*.py")) == remote_code_files()
    # remote code imports this project only relatively (the modeling code's optional use of the installed package's
    # converter is indented, inside a `try:`, which transformers' import check skips)
    for code in hub_folder.glob("*.py"):
        lines = code.read_text().splitlines()
        assert not [line for line in lines if line.startswith(("import infimm", "from infimm"))], code.name


def test_fresh_process_loads_processor_without_the_package(fresh_report):
    assert fresh_report["infimm_importable"] is False
    module, name, image_processor = fresh_report["processor"]
    assert module.startswith("transformers_modules.") and name == "InfiMMProcessor"
    assert image_processor == "InfiMMImageProcessor"
    assert fresh_report["ids"] == [RELEASE_IDS]
    assert fresh_report["image_mask"] == [[True]]
    expected = reference_pixels(Image.open(LOGO), 28).numpy()
    np.testing.assert_allclose(fresh_report["pixels"][0, 0], expected, atol=1e-6, rtol=0)


def test_fresh_process_auto_image_processor_picks_the_backend(fresh_report):
    import transformers.models.auto.image_processing_auto as image_processing_auto

    chosen = {label: name for label, (module, name, _) in fresh_report["image_processors"].items()}
    expected = {"use_fast=True": "InfiMMImageProcessorFast", "use_fast=False": "InfiMMImageProcessor"}
    if hasattr(image_processing_auto, "_resolve_backend"):
        expected.update({"backend=torchvision": "InfiMMImageProcessorFast", "backend=pil": "InfiMMImageProcessor",
                         # transformers 5 picks torchvision when nothing is asked (and torchvision is installed)
                         "default": "InfiMMImageProcessorFast"})
    assert {label: chosen[label] for label in expected} == expected
    for label, (module, _, crop_size) in fresh_report["image_processors"].items():
        assert module.startswith("transformers_modules.") and crop_size == {"height": 28, "width": 28}, label
    reference = reference_pixels(Image.open(LOGO), 28).numpy()
    for label, name in chosen.items():
        pixels = np.load(fresh_report["workdir"] / f"pixels-{label}.npy")[0]
        # exact for the PIL class; the torchvision class stays within its documented 0.035
        np.testing.assert_allclose(pixels, reference, atol=1e-6 if name == "InfiMMImageProcessor" else 0.035, rtol=0)


def test_fresh_process_loads_every_auto_class(fresh_report):
    assert fresh_report["auto"] == {"config": "InfiMMConfig", "model": "InfiMMForConditionalGeneration",
                                    "causal_lm": "InfiMMForConditionalGeneration"}
    assert fresh_report["model_module"].startswith("transformers_modules.")


def test_pipeline_plain_and_chat_match_direct_generation(fresh_report, hub_folder):
    from infimm import InfiMMForConditionalGeneration, InfiMMProcessor

    model = InfiMMForConditionalGeneration.from_pretrained(hub_folder).eval()
    processor = InfiMMProcessor.from_pretrained(hub_folder)
    image = Image.open(LOGO)

    def new_text(inputs):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return processor.post_process_image_text_to_text(out, input_ids=inputs["input_ids"])[0]

    plain = new_text(processor(text="<image>A picture of", images=image, return_tensors="pt"))
    assert fresh_report["plain"].startswith("<image>A picture of")
    assert fresh_report["plain"].replace("<image>A picture of", "", 1).strip() == plain.strip()

    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    chat = new_text(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt"))
    assert [m["role"] for m in fresh_report["chat"]] == ["user", "assistant"]
    assert fresh_report["chat"][1]["content"].strip() == chat.strip()
    assert fresh_report["chat_new"].strip() == chat.strip()
