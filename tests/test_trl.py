"""TRL's SFTTrainer on InfiMM with `assistant_only_loss=True`, on a dataset in TRL's vision layout.

With a vision dataset and no `data_collator`, SFTTrainer builds its own `DataCollatorForVisionLanguageModeling`,
which renders each row through `processor.apply_chat_template(..., return_assistant_tokens_mask=True)`: the
templates' `{% generation %}` blocks decide the labels. References: prompts written out by hand per chat format,
tokenized by the tokenizer itself, and TRL's own template checks.
"""

import copy

import pytest
import torch
from PIL import Image

from conftest import TOKENIZER_DIR, tiny_config, tiny_model

from trl.chat_template_utils import (
    get_training_chat_template,
    has_generation_markers,
    is_chat_template_stop_token_trained,
    supports_tool_calling,
)
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling


I, E, X = 32001, 32000, -100  # <image>, <|endofchunk|>, no loss
EOS = 2
RED, BLUE = Image.new("RGB", (30, 40), (200, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 200))
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions. ")

# TRL's vision layout: `{"type": "image"}` placeholders, the images in an `images` column, in order.
ROWS = [
    {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A chart."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ], "images": [RED]},
    {"messages": [  # an image inside the reply: input to the model, never a target
        {"role": "user", "content": [{"type": "text", "text": "Draw it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, {"type": "image"},
                                          {"type": "text", "text": " done."}]},
    ], "images": [BLUE]},
]

# Each row by hand: the prompt before every assistant turn (with the generation prompt), and the whole conversation.
HAND = {
    "zephyr": [
        ("<|system|>\n</s>\n<|user|>\n<|endofchunk|><image>What is it?</s>\n<|assistant|>\n",
         "A chart.</s>\n<|user|>\nSure?</s>\n<|assistant|>\n", "Yes.</s>\n"),
        ("<|system|>\n</s>\n<|user|>\nDraw it.</s>\n<|assistant|>\n", "Here:<|endofchunk|><image> done.</s>\n"),
    ],
    "vicuna": [
        (VICUNA_SYSTEM + "USER: <|endofchunk|><image>What is it? ASSISTANT:", " A chart.</s>USER: Sure? ASSISTANT:",
         " Yes.</s>"),
        (VICUNA_SYSTEM + "USER: Draw it. ASSISTANT:", " Here:<|endofchunk|><image> done.</s>"),
    ],
    "llama2": [
        ("<s>[INST] <|endofchunk|><image>What is it? [/INST]", " A chart. </s><s>[INST] Sure? [/INST]", " Yes. </s>"),
        ("<s>[INST] Draw it. [/INST]", " Here:<|endofchunk|><image> done. </s>"),
    ],
}


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _processor(chat_format="zephyr"):
    from infimm import InfiMMProcessor

    return InfiMMProcessor.from_config(tiny_config(), _tokenizer(), chat_format=chat_format)


def _hand_ids_and_labels(tokenizer, pieces):
    """Token ids of the hand-written conversation, and labels: from the end of each hand-written prompt to the first
    `</s>` after it (the reply and its end-of-turn token), minus `<|endofchunk|><image>`; -100 elsewhere.

    `pieces` are (prompt_1, reply_1 + prompt_2, ..., reply_n): the prompt of turn t is `pieces[: t + 1]` joined. One
    `<s>` comes first: the Llama-2 prompt writes it, the others get it from the tokenizer.
    """
    full = "".join(pieces)

    def ids(text):
        return tokenizer(text, add_special_tokens=not text.startswith("<s>")).input_ids

    input_ids = ids(full)
    labels = [X] * len(input_ids)
    for turn in range(len(pieces) - 1):
        prompt_ids = ids("".join(pieces[: turn + 1]))
        assert input_ids[: len(prompt_ids)] == prompt_ids  # the hand prompt is a token prefix of the conversation
        end = input_ids.index(EOS, len(prompt_ids))
        for position in range(len(prompt_ids), end + 1):
            if input_ids[position] not in (I, E):
                labels[position] = input_ids[position]
    return input_ids, labels


def _assert_batch_matches_hand(batch, tokenizer, hand_rows):
    for row, pieces in enumerate(hand_rows):
        input_ids, labels = _hand_ids_and_labels(tokenizer, pieces)
        n = len(input_ids)
        assert batch["input_ids"][row, :n].tolist() == input_ids
        assert batch["labels"][row].tolist() == labels + [X] * (batch["labels"].shape[1] - n)  # right padding
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
    assert not torch.isin(batch["labels"], torch.tensor([I, E])).any()


def test_hand_labels_helper_counts_turns():
    """The reference itself: two replies in the first row, one (without its image marker) in the second."""
    tokenizer = _tokenizer()
    _, labels = _hand_ids_and_labels(tokenizer, HAND["zephyr"][0])
    assert tokenizer.convert_ids_to_tokens([t for t in labels if t != X]) == ["A", "▁chart", ".", "</s>", "Yes", ".",
                                                                            "</s>"]
    ids, labels = _hand_ids_and_labels(tokenizer, HAND["zephyr"][1])
    assert ids[ids.index(E) + 1] == I  # the reply holds the image marker...
    assert tokenizer.convert_ids_to_tokens([t for t in labels if t != X]) == ["Here", ":", "▁done", ".", "</s>"]  # ...not


@pytest.mark.parametrize("chat_format", ["zephyr", "vicuna", "llama2"])
def test_templates_pass_trl_template_checks(chat_format):
    processor = _processor(chat_format)
    assert has_generation_markers(processor.chat_template)
    assert is_chat_template_stop_token_trained(processor)  # the `</s>` ending a reply is trained
    assert supports_tool_calling(processor) is False  # a `tool` turn is a TemplateError, not a crash
    assert get_training_chat_template(processor) is None  # nothing for TRL to patch


def test_unknown_role_is_a_template_error_and_a_clear_value_error():
    from jinja2 import TemplateError

    processor = _processor()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "tool", "content": "42"}]
    for kind in (TemplateError, ValueError):
        with pytest.raises(kind, match=r"Message 2 \('tool'\) has an unknown role.*'system', 'user' and 'assistant'"):
            processor.apply_chat_template(messages)


@pytest.mark.parametrize("chat_format", ["zephyr", "vicuna", "llama2"])
def test_trl_collator_and_ours_label_exactly_the_replies(chat_format):
    from infimm.collator_infimm import InfiMMDataCollator

    processor = _processor(chat_format)
    trl_batch = DataCollatorForVisionLanguageModeling(processor, max_length=1024, assistant_only_loss=True)(
        copy.deepcopy(ROWS)
    )
    ours = InfiMMDataCollator(processor)(copy.deepcopy(ROWS))
    for batch in (trl_batch, ours):
        _assert_batch_matches_hand(batch, processor.tokenizer, HAND[chat_format])
        assert batch["image_mask"].tolist() == [[True], [True]]
        reference = processor.image_processor([RED, BLUE], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(batch["pixel_values"][:, 0], reference)


def test_collator_fills_trl_placeholders_and_checks_their_count():
    from infimm.collator_infimm import InfiMMDataCollator

    processor = _processor()
    collator = InfiMMDataCollator(processor)
    # TRL's rule for plain-string messages: the images go before the first user message's text
    plain = {"messages": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A chart."}],
             "images": [RED]}
    structured = copy.deepcopy(ROWS[0])
    structured["messages"] = structured["messages"][:2]
    assert collator.encode(plain).input_ids == collator.encode(structured).input_ids
    assert collator.encode(plain).images == [RED]
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\).*its `images` holds 2"):
        collator.encode({**copy.deepcopy(ROWS[0]), "images": [RED, BLUE]})


def test_sft_trainer_assistant_only_loss_trains_on_replies(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    processor = _processor()
    model = tiny_model()
    dataset = Dataset.from_list(copy.deepcopy(ROWS) * 2)
    args = SFTConfig(
        output_dir=str(tmp_path), assistant_only_loss=True, max_steps=12, per_device_train_batch_size=2,
        learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    # The path users get: TRL's own vision collator, calling our processor's chat template
    assert type(trainer.data_collator) is DataCollatorForVisionLanguageModeling
    batch = trainer.data_collator([copy.deepcopy(row) for row in dataset.select(range(2))])
    _assert_batch_matches_hand(batch, processor.tokenizer, HAND["zephyr"])
    assert batch["pixel_values"].shape == (2, 1, 3, 28, 28)

    def loss():
        model.eval()
        with torch.no_grad():
            return model(**{key: value for key, value in batch.items()}).loss.item()

    before = loss()
    trainer.train()
    after = loss()
    assert after < 0.5 * before, (before, after)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 12 and logged[-1] < logged[0]
