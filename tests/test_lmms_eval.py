"""The lmms-eval `infimm` model against the processor + `generate` / forward path done by hand.

Requests are built as lmms-eval 0.7.3's `ConfigurableTask.construct_requests` builds them for a simple model:
`generate_until` arguments `(context, generation_kwargs, doc_to_visual, doc_id, task, split)`, multiple-choice
`loglikelihood` arguments `(context, " choice", doc_to_visual, doc_id, task, split)` and the unconditional
`(context, continuation)` pairs of `acc_mutual_info`; the documents live in `lm.task_dict[task][split]`, as the
evaluator puts them there. The model is a tiny random InfiMM saved as a Hub folder and loaded the way the lmms-eval
command line loads it (entry point lookup, `create_from_arg_string`).
"""

from importlib.metadata import entry_points

import pytest
import torch
from PIL import Image

from conftest import IMAGES_DIR, save_tiny_hub_folder, tiny_model
from helpers_modeling import one_torch_thread  # noqa: F401  (autouse fixture)

from lmms_eval.api.instance import Instance, unwrap_generation_output

from infimm import InfiMMForConditionalGeneration, InfiMMProcessor
from infimm.hub_infimm import bundled_tokenizer
from infimm.lmms_eval_infimm import InfiMM


TASK, SPLIT = "tiny_task", "test"
MAX_NEW_TOKENS = 4
LOGO = Image.open(IMAGES_DIR / "infimm-logo.webp").convert("RGB")
CHART = Image.open(IMAGES_DIR / "mmmu-val-chart.jpeg").convert("RGB")
# Documents with 0, 1 and 2 images; the third task text places its images itself.
DOCS = [
    {"images": [], "question": "What is two plus two?"},
    {"images": [LOGO], "question": "Describe the picture."},
    {"images": [LOGO, CHART], "question": "Compare <image> with <image>, please."},
]
# The Zephyr prompts these documents must become (the release's chat format, written out by hand).
ZEPHYR_PROMPTS = [
    "<|system|>\n</s>\n<|user|>\nWhat is two plus two?</s>\n<|assistant|>\n",
    "<|system|>\n</s>\n<|user|>\n<|endofchunk|><image>Describe the picture.</s>\n<|assistant|>\n",
    "<|system|>\n</s>\n<|user|>\nCompare <|endofchunk|><image> with <|endofchunk|><image>, please.</s>\n<|assistant|>\n",
]


def doc_to_visual(doc):
    return doc["images"]


def instance(request_type, arguments, doc_id=0):
    return Instance(request_type=request_type, arguments=arguments, idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def generate_requests(gen_kwargs):
    return [instance("generate_until", (doc["question"], dict(gen_kwargs), doc_to_visual, i, TASK, SPLIT), i)
            for i, doc in enumerate(DOCS)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_hub_folder(tmp_path_factory.mktemp("lmms") / "tiny-infimm")


@pytest.fixture(scope="module")
def lm(folder):
    from lmms_eval.models import get_model

    # What `lmms-eval --model infimm --model_args ... --batch_size 2` does.
    model = get_model("infimm").create_from_arg_string(
        f"pretrained={folder},device=cpu,dtype=float32,max_new_tokens={MAX_NEW_TOKENS}",
        {"batch_size": 2, "max_batch_size": None, "device": None},
    )
    model.task_dict = {TASK: {SPLIT: DOCS}}
    return model


@pytest.fixture(scope="module")
def reference(folder):
    """The package's own classes reading the same folder (not the remote code the lmms-eval model loads)."""
    return InfiMMForConditionalGeneration.from_pretrained(folder).eval(), InfiMMProcessor.from_pretrained(folder)


@pytest.fixture
def batch_size(lm):
    previous = lm.batch_size_per_gpu
    yield lambda size: setattr(lm, "batch_size_per_gpu", size)
    lm.batch_size_per_gpu = previous


def reference_messages(doc):
    """The chat messages of a document, written by hand: images first, or at the text's `<image>` places."""
    pieces = doc["question"].split("<image>") if "<image>" in doc["question"] else [""] * len(doc["images"]) + [doc["question"]]
    content = []
    for index, piece in enumerate(pieces):
        if index:
            content.append({"type": "image", "image": doc["images"][index - 1]})
        if piece:
            content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


def reference_answer(reference, doc, **generate_kwargs):
    model, processor = reference
    inputs = processor.apply_chat_template(reference_messages(doc), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    generate_kwargs.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    with torch.no_grad():
        output = model.generate(**inputs, pad_token_id=processor.tokenizer.pad_token_id, **generate_kwargs)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def reference_loglikelihood(reference, prompt, continuation, images):
    """Sum of log-softmax over the continuation's tokens from one plain forward of prompt + continuation."""
    model, processor = reference
    inputs = processor(text=prompt + continuation, images=images or None, return_tensors="pt")
    prompt_length = len(processor.tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0]
    targets = inputs["input_ids"][0, prompt_length:]
    log_probs = torch.log_softmax(logits[prompt_length - 1 : -1].double(), dim=-1)
    greedy = bool((logits[prompt_length - 1 : -1].argmax(-1) == targets).all())
    return float(log_probs[torch.arange(len(targets)), targets].sum()), greedy


# ------------------------------------------------------------------------------------------------ registration
def test_entry_point_registers_the_model():
    (entry,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "infimm"]
    assert entry.value == "infimm.lmms_eval_infimm:lmms_eval_manifest"
    manifest = entry.load()()
    assert manifest.model_id == "infimm"
    assert manifest.simple_class_path == "infimm.lmms_eval_infimm.InfiMM"


def test_lmms_eval_resolves_the_model_by_name():
    from lmms_eval.models import get_model, list_available_models

    assert "infimm" in list_available_models()
    assert get_model("infimm") is InfiMM
    assert InfiMM.is_simple


def test_model_args_are_parsed_like_the_command_line(lm):
    assert lm.batch_size == 2 and lm.max_new_tokens == MAX_NEW_TOKENS
    assert lm.device == torch.device("cpu") and lm.model.dtype == torch.float32
    assert type(lm.model).__module__.startswith("transformers_modules.")  # the folder's own code


def test_unknown_model_arg_is_refused(folder):
    with pytest.raises(ValueError, match="Unknown model_args.*max_lenght"):
        InfiMM(pretrained=str(folder), device="cpu", max_lenght=10)


# ------------------------------------------------------------------------------------------------ prompts
def test_prompts_follow_the_zephyr_chat_format(lm):
    assert [lm._prompt(doc["question"], doc["images"]) for doc in DOCS] == ZEPHYR_PROMPTS


def test_placeholders_that_do_not_match_the_images_become_words(lm):
    # MMMU's interleaved format mentions one image twice: one image, two placeholders.
    expected = "<|system|>\n</s>\n<|user|>\n<|endofchunk|><image>Is image the same as image?</s>\n<|assistant|>\n"
    assert lm._prompt("Is <image> the same as <image>?", [LOGO]) == expected


def test_videos_are_refused(lm):
    lm.task_dict["video_task"] = {SPLIT: [{"video": "clip.mp4"}]}
    request = instance("generate_until", ("What happens?", {}, lambda doc: [doc["video"]], 0, "video_task", SPLIT))
    with pytest.raises(ValueError, match="images only"):
        lm.generate_until([request])


# ------------------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def greedy_references(reference):
    return [reference_answer(reference, doc, do_sample=False) for doc in DOCS]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_generate_until_equals_processor_and_generate(lm, batch_size, greedy_references, size):
    batch_size(size)
    gen_kwargs = {"until": ["\n\n\n\n"], "temperature": 0, "top_p": 1.0, "num_beams": 1}
    answers = lm.generate_until(generate_requests(gen_kwargs))
    assert answers == greedy_references
    assert all(answers)


def test_generate_until_takes_max_new_tokens_from_the_request(lm, reference):
    answers = lm.generate_until(generate_requests({"max_new_tokens": 2, "do_sample": False}))
    assert answers == [reference_answer(reference, doc, max_new_tokens=2, do_sample=False) for doc in DOCS]


def test_generate_until_stops_at_until(lm, greedy_references):
    # A stop string from the middle of each unrestricted answer: the answer is cut right before it.
    stops = [answer[len(answer) // 2 : len(answer) // 2 + 2] for answer in greedy_references]
    requests = [instance("generate_until", (doc["question"], {"until": [stop]}, doc_to_visual, i, TASK, SPLIT), i)
                for i, (doc, stop) in enumerate(zip(DOCS, stops))]
    answers = lm.generate_until(requests)
    assert answers == [answer.split(stop)[0] for answer, stop in zip(greedy_references, stops)]
    assert all(len(a) < len(full) for a, full in zip(answers, greedy_references))


def test_sampling_settings_reach_generate(lm, reference, batch_size):
    batch_size(1)
    doc_id = 1
    request = instance("generate_until", (DOCS[doc_id]["question"], {"temperature": 1.5, "do_sample": True,
                                                                    "max_new_tokens": 6}, doc_to_visual, doc_id, TASK, SPLIT), doc_id)
    torch.manual_seed(123)
    (answer,) = lm.generate_until([request])
    torch.manual_seed(123)
    expected = reference_answer(reference, DOCS[doc_id], do_sample=True, temperature=1.5, max_new_tokens=6)
    assert answer == expected


# ------------------------------------------------------------------------------------------------ log-likelihood
CHOICES = [" A", " B. Blue", " Paris is the capital"]


def loglikelihood_requests():
    requests = [instance("loglikelihood", (doc["question"], choice, doc_to_visual, i, TASK, SPLIT), i)
                for i, doc in enumerate(DOCS) for choice in CHOICES]
    requests.append(instance("loglikelihood", ("", " A")))  # acc_mutual_info's unconditional request
    return requests


@pytest.fixture(scope="module")
def loglikelihood_references(reference):
    expected = [reference_loglikelihood(reference, prompt, choice, doc["images"])
                for prompt, doc in zip(ZEPHYR_PROMPTS, DOCS) for choice in CHOICES]
    empty_prompt = "<|system|>\n</s>\n<|user|>\n</s>\n<|assistant|>\n"
    expected.append(reference_loglikelihood(reference, empty_prompt, " A", []))
    return expected


@pytest.mark.parametrize("size", [1, 4, 10])
def test_loglikelihood_equals_log_softmax_of_a_plain_forward(lm, batch_size, loglikelihood_references, size):
    batch_size(size)
    results = lm.loglikelihood(loglikelihood_requests())
    assert len(results) == len(loglikelihood_references)
    for (value, greedy), (expected, expected_greedy) in zip(results, loglikelihood_references):
        assert value == pytest.approx(expected, abs=1e-4, rel=1e-5)
        assert greedy is expected_greedy
    # The images matter: the same choice scores differently with and without them.
    assert abs(results[len(CHOICES)][0] - results[0][0]) > 1e-3


def test_loglikelihood_is_greedy_for_the_greedy_answer(lm, reference, batch_size):
    batch_size(2)
    model, processor = reference
    doc_id = 2
    prompt, images = ZEPHYR_PROMPTS[doc_id], DOCS[doc_id]["images"]
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # The answer's text as it reads after the prompt (decoding the new tokens alone would drop a leading space).
    decode = processor.tokenizer.decode
    continuation = decode(output[0])[len(decode(inputs["input_ids"][0])):]
    # Precondition: the answer tokenizes back to the generated tokens after the prompt.
    joined = processor.tokenizer(prompt + continuation)["input_ids"]
    assert joined == output[0].tolist()
    requests = [instance("loglikelihood", (DOCS[doc_id]["question"], continuation, doc_to_visual, doc_id, TASK, SPLIT), doc_id),
                instance("loglikelihood", (DOCS[doc_id]["question"], " A", doc_to_visual, doc_id, TASK, SPLIT), doc_id)]
    (value, greedy), (_, other_greedy) = lm.loglikelihood(requests)
    expected, expected_greedy = reference_loglikelihood(reference, prompt, continuation, images)
    assert expected_greedy and greedy
    assert value == pytest.approx(expected, abs=1e-4, rel=1e-5)
    assert not other_greedy


def test_loglikelihood_results_survive_the_evaluator_unwrapping(lm):
    # lmms-eval 0.7.3's evaluator passes every response through `unwrap_generation_output` before the task scores
    # it; a bare tuple would come out as its string.
    assert unwrap_generation_output((-1.5, True))[0] == "(-1.5, True)"
    (result,) = lm.loglikelihood([instance("loglikelihood", (DOCS[1]["question"], " A", doc_to_visual, 1, TASK, SPLIT), 1)])
    value, greedy = result
    assert isinstance(value, float) and isinstance(greedy, bool)
    kept, _ = unwrap_generation_output(result)
    assert type(kept) is tuple and kept == (value, greedy)


def test_original_release_snapshot_is_read_directly(tmp_path):
    import convert_fixtures

    source = tiny_model(seed=3)
    snapshot = convert_fixtures.write_release_snapshot(source, tmp_path / "release")
    lm = InfiMM(pretrained=str(snapshot), device="cpu", max_new_tokens=MAX_NEW_TOKENS)
    lm.task_dict = {TASK: {SPLIT: DOCS}}
    # Reference: the model the snapshot was written from, with the processor its config implies.
    processor = InfiMMProcessor.from_config(source.config, bundled_tokenizer())
    expected = [reference_answer((source, processor), doc, do_sample=False) for doc in DOCS]
    assert lm.generate_until(generate_requests({"do_sample": False})) == expected
