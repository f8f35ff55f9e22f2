"""`examples/chat.py` and `examples/few_shot.py`: their prompts against hand-built ones, stopping, batching, the REPL."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoTokenizer

from conftest import REPO, tiny_model

from infimm import InfiMMProcessor

EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))
import chat  # noqa: E402
import few_shot  # noqa: E402

sys.path.remove(str(EXAMPLES))

RED, GREEN, BLUE = (PIL.Image.new("RGB", (32, 32), rgb) for rgb in [(220, 30, 30), (30, 170, 60), (30, 60, 220)])
NOISE = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO / "assets" / "infimm-zephyr")


@pytest.fixture
def model_and_processor(tokenizer):
    model = tiny_model()
    return model, InfiMMProcessor.from_config(model.config, tokenizer)


# ------------------------------------------------------------------------------------------------- few-shot
def test_few_shot_prompt_is_the_pretraining_layout(model_and_processor):
    _, processor = model_and_processor
    assert few_shot.few_shot_prompt(processor, ["A cat.", "A dog."], "Output:") == (
        "<image>A cat.<|endofchunk|><image>A dog.<|endofchunk|><image>Output:"
    )
    assert few_shot.few_shot_prompt(processor, []) == "<image>"


def test_few_shot_batch_answers_each_query_as_alone(model_and_processor):
    model, processor = model_and_processor
    shots = [(RED, "A red square."), (GREEN, "A green square.")]
    queries = [BLUE, NOISE]
    batch = few_shot.few_shot(model, processor, shots, queries, max_new_tokens=6)
    assert batch == [few_shot.few_shot(model, processor, shots, [query], max_new_tokens=6)[0] for query in queries]

    # Independent of the helper: the hand-written prompt through the processor and generate(), one query at a time.
    for query, answer in zip(queries, batch):
        inputs = processor(text="<image>A red square.<|endofchunk|><image>A green square.<|endofchunk|><image>",
                           images=[[RED, GREEN, query]], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                             eos_token_id=[processor.tokenizer.eos_token_id, processor.eoc_token_id])
        new_tokens = out[0, inputs["input_ids"].shape[1]:]
        assert processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip() == answer


def test_few_shot_answer_ends_at_end_of_chunk(model_and_processor):
    """Forced logits: a word, then <|endofchunk|>, then another word for ever; the answer must be the first word."""
    model, processor = model_and_processor
    word, other = (processor.tokenizer.convert_tokens_to_ids(token) for token in ("▁cat", "▁dog"))
    forced = iter([word, processor.eoc_token_id])

    def force(module, args, logits):
        token = next(forced, other)
        logits = torch.full_like(logits, -1e4)
        logits[..., token] = 0
        return logits

    handle = model.lm_head.register_forward_hook(force)
    try:
        answers = few_shot.few_shot(model, processor, [(RED, "A red square.")], [BLUE], max_new_tokens=5)
        forced = iter([word, processor.eoc_token_id])
        no_stop = few_shot.few_shot(model, processor, [(RED, "A red square.")], [BLUE], max_new_tokens=5,
                                    eos_token_id=processor.tokenizer.eos_token_id)
    finally:
        handle.remove()
    assert answers == ["cat"]
    assert no_stop == ["cat dog dog dog"]


# ------------------------------------------------------------------------------------------------------ chat
def test_chat_prompt_holds_the_whole_conversation(model_and_processor):
    model, processor = model_and_processor
    conversation = chat.Chat(model, processor, system="Be brief.", max_new_tokens=4, do_sample=False)
    conversation.attach(RED)
    first = conversation.send("What is this?")
    second = conversation.send("And now?")

    def text(value):
        return [{"type": "text", "text": value}]

    by_hand = [
        {"role": "system", "content": text("Be brief.")},
        {"role": "user", "content": [{"type": "image", "image": RED}, *text("What is this?")]},
        {"role": "assistant", "content": text(first)},
        {"role": "user", "content": text("And now?")},
        {"role": "assistant", "content": text(second)},
    ]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    expected = processor.apply_chat_template(by_hand, **kwargs)
    actual = conversation.inputs()
    assert torch.equal(actual["input_ids"], expected["input_ids"])
    assert torch.equal(actual["pixel_values"], expected["pixel_values"]) and actual["pixel_values"].shape[1] == 1

    # The first answer is what generate() gives for the first turn alone.
    single = processor.apply_chat_template(by_hand[:2], **kwargs)
    out = model.generate(**single, max_new_tokens=4, do_sample=False)
    assert processor.post_process_image_text_to_text(out, input_ids=single["input_ids"])[0].strip() == first
    assert "And now?" in processor.tokenizer.decode(actual["input_ids"][0])

    conversation.reset()
    assert [m["role"] for m in conversation.messages] == ["system"] and not conversation.pending_images


def test_chat_keeps_the_conversation_when_a_turn_does_not_fit(model_and_processor):
    model, processor = model_and_processor
    conversation = chat.Chat(model, processor, max_new_tokens=2, do_sample=False)
    conversation.send("Hello")
    before = list(conversation.messages)
    with pytest.raises(ValueError, match="model_max_length"):
        conversation.send("word " * (processor.tokenizer.model_max_length + 10))
    assert conversation.messages == before


def test_chat_needs_a_chat_template(model_and_processor):
    model, processor = model_and_processor
    processor.chat_template = None
    with pytest.raises(ValueError, match="few_shot.py"):
        chat.Chat(model, processor)


def _script_env(tmp_path):
    """Offline, with the random model's cache and the temporary folder under `tmp_path` (not the user's)."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
            "HF_HOME": str(tmp_path / "hf"), "TMPDIR": str(tmp_path / "tmp"), "TOKENIZERS_PARALLELISM": "false"}


def _assert_left_only_the_cached_model(tmp_path):
    assert [path.name for path in (tmp_path / "hf" / "infimm").iterdir()] == ["random-infimm-zephyr-seed0"]
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow
def test_chat_script_runs_a_session_from_stdin(tmp_path):
    session = "\n".join([
        f"/image {REPO / 'assets' / 'sample-chart.jpg'}", "What is this?", f"/image {tmp_path / 'missing.jpg'}",
        "And now?", "/reset", "Hello", "/quit", "never read",
    ]) + "\n"
    env = _script_env(tmp_path)
    result = subprocess.run([sys.executable, str(EXAMPLES / "chat.py"), "--max-new-tokens", "3"], input=session,
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "RANDOM weights" in out
    assert out.count("infimm> ") == 3
    assert "(1 image(s) attached to your next message)" in out
    assert "(could not load an image, so none of these was attached:" in out and "missing.jpg" in out
    assert "(conversation cleared)" in out
    _assert_left_only_the_cached_model(tmp_path)


@pytest.mark.slow
def test_few_shot_script_demo_runs(tmp_path):
    env = _script_env(tmp_path)
    result = subprocess.run([sys.executable, str(EXAMPLES / "few_shot.py"), "--max-new-tokens", "3"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Prompt: <image>A red square.<|endofchunk|><image>A green square.<|endofchunk|><image>" in result.stdout
    assert "a blue square: " in result.stdout and "a yellow square: " in result.stdout
    _assert_left_only_the_cached_model(tmp_path)
