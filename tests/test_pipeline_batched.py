"""`pipeline("image-text-to-text", batch_size=N)` over samples with 0, 1 and 2 images gives the unbatched answers.

A fresh interpreter (with `infimm` made unimportable, working directory a temporary folder) builds the pipeline from a
folder written by `save_hub_folder`, so the pipeline class comes from the folder's `custom_pipelines` entry and its
copied `pipeline_infimm.py`. It runs plain inputs (a stream of `{"images", "text"}` dicts) and chats, batched by 1 and
by 2; the tests compare the answers with each other and with `processor` + `generate` run here, one sample at a time,
with the package's classes. The stock pipeline class fails on the same batches (recorded too).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from conftest import IMAGES_DIR, tiny_model
from helpers_modeling import one_torch_thread  # noqa: F401  (autouse fixture)

from infimm import InfiMMForConditionalGeneration, InfiMMProcessor
from infimm.hub_infimm import bundled_tokenizer, mark_for_remote_code
from infimm.pipeline_infimm import CUSTOM_PIPELINE_ENTRY, InfiMMImageTextToTextPipeline


pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 3
LOGO = IMAGES_DIR / "infimm-logo.webp"
CHART = IMAGES_DIR / "mmmu-val-chart.jpeg"
# (image paths, plain prompt, chat question) per sample: 2, 0 and 1 images, then 1 again so batches of 2 pair
# different counts both ways.
SAMPLES = [
    ([LOGO, CHART], "<image>A logo.<|endofchunk|><image>A chart showing", "What differs between these two?"),
    ([], "The capital of France is", "Tell me a joke."),
    ([CHART], "<image>This chart shows", "Describe the chart."),
    ([LOGO], "<image>A picture of", "What is this?"),
]

_SCRIPT = textwrap.dedent(
    r"""
    import json, sys, traceback
    sys.modules["infimm"] = None  # only the saved folder's code may be used
    from PIL import Image
    from transformers import pipeline
    from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

    folder, samples_file, out, max_new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    samples = json.load(open(samples_file))
    report = {}
    try:
        import infimm  # noqa: F401
        report["infimm_importable"] = True
    except ImportError:
        report["infimm_importable"] = False

    def plain_inputs():
        return ({"images": [Image.open(p) for p in paths], "text": text} for paths, text, _ in samples)

    def chats():
        return [[{"role": "user", "content": [*({"type": "image", "image": p} for p in paths),
                                              {"type": "text", "text": question}]}]
                for paths, _, question in samples]

    options = dict(max_new_tokens=max_new_tokens, generate_kwargs={"do_sample": False})

    def run(pipe, batch_size):
        plain = [out[0] for out in pipe(plain_inputs(), batch_size=batch_size, return_full_text=False, **options)]
        tokens = [out[0]["generated_token_ids"].tolist()
                  for out in pipe(plain_inputs(), batch_size=batch_size, return_tensors=True, **options)]
        chat = [out[0]["generated_text"] for out in pipe(text=chats(), batch_size=batch_size, **options)]
        return {"plain": [o["generated_text"] for o in plain], "tokens": tokens,
                "chat_roles": [[m["role"] for m in c] for c in chat], "chat": [c[-1]["content"] for c in chat]}

    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    report["class"] = [type(pipe).__module__, type(pipe).__name__]
    for batch_size in (1, 2):
        report[f"batch_{batch_size}"] = run(pipe, batch_size)
    pipe.model.save_pretrained(out + "/resaved")  # the config still serialises after `pipeline()` read it

    stock = pipeline("image-text-to-text", model=folder, trust_remote_code=True, pipeline_class=ImageTextToTextPipeline)
    try:
        run(stock, 2)
        report["stock_error"] = None
    except Exception as err:
        report["stock_error"] = f"{type(err).__name__}: {err}"
    with open(out + "/report.json", "w") as handle:
        json.dump(report, handle)
    """
)


@pytest.fixture(scope="module")
def report(hub_folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fresh")
    samples_file = workdir / "samples.json"
    samples_file.write_text(json.dumps([[[str(p) for p in paths], text, question] for paths, text, question in SAMPLES]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules"), "PYTHONPATH": "",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(hub_folder), str(samples_file), str(workdir), str(MAX_NEW_TOKENS)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((workdir / "report.json").read_text())


@pytest.fixture(scope="module")
def direct(hub_folder):
    """Each sample alone through the processor and `generate` (the package's classes, not the remote code)."""
    model = InfiMMForConditionalGeneration.from_pretrained(hub_folder).eval()
    processor = InfiMMProcessor.from_pretrained(hub_folder)
    results = {"plain": [], "tokens": [], "chat": []}
    for paths, text, question in SAMPLES:
        images = [Image.open(p) for p in paths]
        messages = [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                                 {"type": "text", "text": question}]}]
        for key, inputs in (
            ("plain", processor(text=text, images=images or None, return_tensors="pt")),
            ("chat", processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")),
        ):
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            results[key].append(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:],
                                                           skip_special_tokens=True))
            if key == "plain":
                results["tokens"].append(output[0].tolist())
    return results


def strip_padding(ids, pad_id):
    """A batched row without its left padding and the padding after an early end (the pad id is EOS here)."""
    start = next(i for i, token in enumerate(ids) if token != pad_id)
    end = len(ids)
    while end > start + 1 and ids[end - 1] == pad_id and ids[end - 2] == pad_id:
        end -= 1
    return ids[start:end]


# -------------------------------------------------------------------------------------------- the saved folder
def test_folder_names_the_batching_pipeline(hub_folder):
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["custom_pipelines"] == {"image-text-to-text": CUSTOM_PIPELINE_ENTRY}
    source = (hub_folder / "pipeline_infimm.py").read_text()
    assert "import infimm" not in source and "from infimm" not in source


def test_fresh_process_uses_the_folder_pipeline(report):
    assert report["infimm_importable"] is False
    module, name = report["class"]
    assert module.startswith("transformers_modules.") and module.endswith("pipeline_infimm")
    assert name == "InfiMMImageTextToTextPipeline"


def test_stock_pipeline_cannot_batch_these_samples(report):
    # Why the subclass exists: transformers' collation refuses or breaks on mixed image counts.
    assert report["stock_error"] is not None, "the stock pipeline batched these samples; is the subclass needed?"
    assert "different keys" in report["stock_error"] or "Sizes of tensors must match" in report["stock_error"]


# -------------------------------------------------------------------------------------------- batched answers
@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_batch_of_two_gives_the_answers_of_batch_of_one(report, kind):
    assert report["batch_2"][kind] == report["batch_1"][kind]
    assert all(report["batch_1"][kind])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_plain_inputs_equal_processor_and_generate(report, direct, batch_size):
    got = report[f"batch_{batch_size}"]
    # The pipeline keeps the space a word token starts with; decoding the new tokens alone drops it.
    assert [text.strip() for text in got["plain"]] == [text.strip() for text in direct["plain"]]
    pad_id = bundled_tokenizer().pad_token_id
    assert [strip_padding(ids, pad_id) for ids in got["tokens"]] == direct["tokens"]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_chats_equal_processor_and_generate(report, direct, batch_size):
    got = report[f"batch_{batch_size}"]
    assert got["chat_roles"] == [["user", "assistant"]] * len(SAMPLES)
    assert [text.strip() for text in got["chat"]] == [text.strip() for text in direct["chat"]]


# -------------------------------------------------------------------------------------------- the collate step
def test_collate_equals_the_processor_batch():
    model = tiny_model()
    processor = InfiMMProcessor.from_config(model.config, bundled_tokenizer())
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=model, processor=processor,
                    pipeline_class=InfiMMImageTextToTextPipeline)
    images = [[Image.open(p) for p in paths] for paths, _, _ in SAMPLES]
    texts = [text for _, text, _ in SAMPLES]
    items = [pipe.preprocess({"images": ims, "text": text}) for ims, text in zip(images, texts)]
    batch = pipe._collate(items)
    expected = processor(text=texts, images=images, return_tensors="pt")  # the processor's own batching
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_mask", "text"}
    for key in ("input_ids", "attention_mask", "image_mask"):
        assert torch.equal(batch[key], expected[key]), key
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], atol=0, rtol=0)
    assert batch["text"] == texts
    # Text-only batches carry no pixel keys, as the processor's.
    text_only = pipe._collate([pipe.preprocess(text) for text in ("Hello", "The capital of France is")])
    assert "pixel_values" not in text_only and "image_mask" not in text_only


def test_plain_save_pretrained_after_the_saver_does_not_name_a_missing_file(hub_folder, tmp_path):
    model = InfiMMForConditionalGeneration.from_pretrained(hub_folder)
    assert model.config.custom_pipelines["image-text-to-text"]["impl"] == CUSTOM_PIPELINE_ENTRY["impl"]
    # A checkpoint written through `mark_for_remote_code` + `save_pretrained` (as Trainer does) only names the
    # pipeline if its file is copied with the model code.
    mark_for_remote_code(model)
    model.save_pretrained(tmp_path / "checkpoint")
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    copied = (tmp_path / "checkpoint" / "pipeline_infimm.py").exists()
    assert ("image-text-to-text" in config.get("custom_pipelines", {})) == copied
