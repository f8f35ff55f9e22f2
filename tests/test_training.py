"""Fine-tuning with Trainer on tiny models: stage policy, overfitting, loss scaling, LoRA, DDP, reload, device maps.

Everything runs on CPU. Two checks start subprocesses: a 2-process `torchrun` of `examples/finetune.py` (gloo) and a
fresh interpreter that reloads the folder it saved with `trust_remote_code=True` (the `infimm` package blocked).
"""

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import PIL.Image
import pytest
import torch
from accelerate import infer_auto_device_map
from transformers import AutoTokenizer, Trainer, TrainingArguments

from conftest import REPO, tiny_config, tiny_model

from infimm import InfiMMForConditionalGeneration, InfiMMProcessor
from infimm.collator_infimm import InfiMMDataCollator
from infimm import training_infimm as training

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
IMAGES = {name: PIL.Image.new("RGB", (32, 32), rgb) for name, rgb in COLORS.items()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are so small that a second thread only adds synchronisation (much more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO / "assets" / "infimm-zephyr")


def _processor(model, tokenizer):
    return InfiMMProcessor.from_config(model.config, tokenizer)


def _pairs():
    return [{"image": IMAGES[name], "caption": f"A {name} square."} for name in COLORS]


def _chats():
    return [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": IMAGES[name]}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": name.capitalize() + "."},
    ]} for name in COLORS]


def _part_digests(model) -> dict[str, str]:
    digests = {part: hashlib.sha256() for part in training.PARTS}
    for name, tensor in sorted(model.state_dict().items()):
        part = next(p for p, prefix in training.PARTS.items() if name.startswith(prefix))
        digests[part].update(tensor.detach().float().numpy().tobytes())
    return {part: digest.hexdigest() for part, digest in digests.items()}


_TRAINING_ARGUMENT_FIELDS = {field.name for field in dataclasses.fields(TrainingArguments)}


def _train(model, processor, rows, output_dir, stage, steps, batch_size=4, **overrides):
    settings = {**training.recipe(stage).training_arguments(), "bf16": False, **overrides}
    if "activation_checkpointing" in settings and "activation_checkpointing" not in _TRAINING_ARGUMENT_FIELDS:
        settings["gradient_checkpointing"] = settings.pop("activation_checkpointing")  # its name before 5.23
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size, logging_steps=1,
        save_strategy="no", report_to="none", remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
        dataloader_pin_memory=False, seed=0, **settings,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=InfiMMDataCollator(processor))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------------------------------------------- policy
def test_stage_recipes_are_the_papers():
    assert {s: (r.learning_rate, r.adam_beta1, r.adam_beta2, r.adam_epsilon) for s, r in training.RECIPES.items()} == {
        "pt": (1e-4, 0.9, 0.95, 1e-8), "mtt": (1e-5, 0.9, 0.999, 1e-5), "ift": (5e-6, 0.9, 0.999, 1e-5)}
    for r in training.RECIPES.values():
        args = r.training_arguments()
        assert (args["weight_decay"], args["lr_scheduler_type"], args["max_grad_norm"]) == (0.1, "cosine", 1.0)
    with pytest.raises(ValueError, match="Unknown stage"):
        training.recipe("sft")


def test_what_each_stage_trains():
    connector = ("resampler", "cross_attention_layers")
    zephyr, llama, vicuna = (tiny_config(p) for p in ("infimm-zephyr", "infimm-llama13b", "infimm-vicuna13b"))
    for stage in ("pt", "mtt"):
        for config in (zephyr, llama, vicuna):
            assert training.trainable_parts(config, stage) == connector
    assert training.trainable_parts(zephyr, "ift") == connector  # chat LLMs stay frozen
    assert training.trainable_parts(vicuna, "ift") == connector
    assert training.trainable_parts(llama, "ift") == (*connector, "language_model")  # base Llama-2 trains
    assert training.trainable_parts(zephyr, "ift", train_llm=True) == (*connector, "language_model")
    base_llama = tiny_config("infimm-llama13b", chat_format="none")
    assert training.llm_trains_in_ift(base_llama) and not training.llm_trains_in_ift(tiny_config(chat_format="none"))


def test_parameter_counts():
    model = tiny_model(gates=None)
    training.apply_stage(model, "pt")
    counts = training.count_parameters(model)
    sizes = {part: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
             for part, prefix in training.PARTS.items()}
    assert counts.total == sum(p.numel() for p in model.parameters()) == sum(sizes.values())
    assert counts.trainable == sizes["resampler"] + sizes["cross_attention_layers"]
    assert counts.by_part["vision_tower"] == (0, sizes["vision_tower"])
    assert "trainable parameters" in str(counts)


# ----------------------------------------------------------------------------------------------- overfitting
@pytest.mark.parametrize("stage, preset, rows, lr, checkpointing", [
    ("pt", "infimm-zephyr", _pairs, 3e-3, False),
    ("mtt", "infimm-zephyr", _chats, 3e-3, True),   # activation checkpointing: the blocks run from layer hooks
    ("ift", "infimm-llama13b", _chats, 1e-3, False),  # Llama-2: the LLM trains too
])
def test_stage_overfits_and_freezes_the_rest(stage, preset, rows, lr, checkpointing, tokenizer, tmp_path):
    model = tiny_model(preset)
    trained = set(training.apply_stage(model, stage))
    before = _part_digests(model)
    losses = _train(model, _processor(model, tokenizer), rows(), tmp_path, stage, steps=4, learning_rate=lr,
                    weight_decay=0.0, activation_checkpointing=checkpointing)
    assert losses[-1] < losses[0] - 0.5, losses
    after = _part_digests(model)
    for part in training.PARTS:
        assert (before[part] != after[part]) == (part in trained), part


def test_gradient_accumulation_scales_the_loss_by_token_count(tokenizer, tmp_path):
    rows = [{"image": IMAGES["red"], "caption": "A red square."},
            {"image": IMAGES["blue"], "caption": "A blue square on a white background, drawn large."},
            {"image": IMAGES["green"], "caption": "Green."},
            {"image": IMAGES["yellow"], "caption": "A yellow square with a long caption that has many tokens."}]
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = tiny_model()
        training.apply_stage(model, "pt")
        _train(model, _processor(model, tokenizer), rows, tmp_path, "pt", steps=1, batch_size=batch_size,
               gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, weight_decay=0.0,
               max_grad_norm=0.0, lr_scheduler_type="constant")
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    initial = {n: p for n, p in tiny_model().named_parameters() if n in results[0]}
    assert any(not torch.equal(initial[n], results[0][n]) for n in initial)
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------------ LoRA
def test_lora_round_trip(tokenizer, tmp_path):
    model = tiny_model()
    training.apply_stage(model, "ift")
    llm_before = {n: p.detach().clone() for n, p in model.model.language_model.named_parameters()}
    peft_model = training.apply_lora(model, r=4, alpha=8, dropout=0.0)
    counts = training.count_parameters(peft_model)
    assert counts.by_part["lora"][0] > 0 and counts.by_part["language_model"][0] == 0  # adapters only
    processor = _processor(model, tokenizer)
    _train(peft_model, processor, _chats(), tmp_path / "run", "ift", steps=2, learning_rate=1e-2)
    for name, param in peft_model.get_base_model().model.language_model.named_parameters():
        if "lora_" not in name:  # the LLM's own weights never move
            assert torch.equal(param, llm_before[name.replace(".base_layer", "")]), name

    batch = InfiMMDataCollator(processor)(_chats()[:2])
    batch.pop("labels")
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    folder = training.save_lora(peft_model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "connector.safetensors"} <= set(os.listdir(folder))

    loaded = training.load_lora(tiny_model(), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
        merged = loaded.merge_and_unload()
        assert isinstance(merged, InfiMMForConditionalGeneration)
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        base = tiny_model().eval()
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)


@pytest.mark.parametrize("every_block", [False, True])
def test_peft_modules_to_save_copies_are_the_blocks_that_run(every_block, tokenizer):
    """PEFT's own way to train connector parts next to LoRA: its copies must be what the decoder layers call, what
    trains, and what steps aside under `disable_adapter()`."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model().eval()
    batch = InfiMMDataCollator(_processor(model, tokenizer))(_chats()[:2])
    labels = batch.pop("labels")
    targeted = list(model.model.cross_attention_layers) if every_block else ["1"]
    with torch.no_grad():
        before = model(**batch).logits
        # Independent expectation: the same model with the targeted blocks' gates shut, edited directly.
        shut = tiny_model().eval()
        for i in targeted:
            shut.model.cross_attention_layers[i].attn_gate.zero_()
            shut.model.cross_attention_layers[i].ff_gate.zero_()
        expected = shut(**batch).logits
    assert not torch.allclose(expected, before, atol=1e-4)

    names = [f"cross_attention_layers.{i}" for i in targeted] + (["resampler"] if every_block else [])
    # LoRA's B starts at zero, so only the copies' edits below can change the output.
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=names))
    wrappers = {name: module for name, module in peft_model.named_modules() if name.endswith(tuple(names))}
    blocks = [wrappers[n].modules_to_save["default"] for n in wrappers if "cross_attention_layers" in n]
    assert len(blocks) == len(targeted)
    resampler_calls = []
    for name, wrapper in wrappers.items():
        if name.endswith("resampler"):
            for which, module in (("original", wrapper.original_module), ("copy", wrapper.modules_to_save["default"])):
                module.register_forward_hook(lambda *_, which=which: resampler_calls.append(which))
    with torch.no_grad():
        for block in blocks:
            block.attn_gate.zero_()
            block.ff_gate.zero_()
        torch.testing.assert_close(peft_model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(**batch).logits, before, rtol=1e-5, atol=1e-5)
    assert resampler_calls == (["copy", "original"] if every_block else [])

    peft_model.train()
    peft_model(**batch, labels=labels).loss.backward()
    for block in blocks:
        assert block.attn_gate.grad is not None and block.attn_gate.grad.abs().sum() > 0
    originals = [p for n, p in peft_model.named_parameters() if "original_module" in n]
    assert originals and all(p.grad is None and not p.requires_grad for p in originals)


def test_lora_resume_from_checkpoint_is_exact(tmp_path):
    finetune = _import_finetune()
    common = ["--stage", "pt", "--synthetic", "4", "--lora", "--lora-r", "4", "--max-steps", "2",
              "--per-device-train-batch-size", "2", "--learning-rate", "1e-2", "--disable-tqdm", "true",
              "--logging-steps", "1"]
    straight = finetune.main([*common, "--output-dir", str(tmp_path / "a"), "--save-strategy", "steps",
                              "--save-steps", "1"])
    assert (tmp_path / "a" / "checkpoint-1" / "connector.safetensors").is_file()
    resumed = finetune.main([*common, "--output-dir", str(tmp_path / "a"),
                             "--resume-from-checkpoint", str(tmp_path / "a" / "checkpoint-1")])
    assert resumed.state.global_step == 2
    # every weight (the merged LLM included) and the adapters' effect
    assert training.weights_checksum(resumed.model, trainable_only=False) == training.weights_checksum(
        straight.model, trainable_only=False)


def test_outputs_and_resume_from_checkpoint_continue_the_run(tmp_path):
    """The run's folder holds what transformers' example scripts leave (trainer_state.json with the log history,
    train_results.json, all_results.json); a rerun that resumes from the last checkpoint continues at its global step
    and ends where the uninterrupted run ended."""
    finetune = _import_finetune()
    out = tmp_path / "run"
    common = ["--stage", "pt", "--synthetic", "4", "--max-steps", "3", "--per-device-train-batch-size", "2",
              "--learning-rate", "1e-2", "--disable-tqdm", "true", "--logging-steps", "1", "--output-dir", str(out),
              "--save-strategy", "steps", "--save-steps", "1"]
    straight = finetune.main(common)
    history = straight.state.log_history
    losses = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    assert sorted(losses) == [1, 2, 3]

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["log_history"] == history
    results = json.loads((out / "train_results.json").read_text())
    summary = history[-1]  # Trainer's own end-of-training entry
    assert results["train_loss"] == summary["train_loss"] and results["epoch"] == summary["epoch"] == 1.5
    assert results["train_samples"] == 4 and results["train_runtime"] == summary["train_runtime"]
    assert json.loads((out / "all_results.json").read_text()) == results
    weights = training.weights_checksum(straight.model, trainable_only=False)

    # Interrupted after step 1: the later checkpoints never got written. A mark in the checkpoint's log shows that
    # the rerun takes its state from there (a run from scratch would log step 1 afresh).
    for step in (2, 3):
        shutil.rmtree(out / f"checkpoint-{step}")
    checkpoint_state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    checkpoint_state["log_history"][0]["from_checkpoint"] = True
    (out / "checkpoint-1" / "trainer_state.json").write_text(json.dumps(checkpoint_state))
    resumed = finetune.main([*common, "--resume-from-checkpoint", "last"])
    assert resumed.state.global_step == 3
    assert resumed.state.log_history[0] == {**history[0], "from_checkpoint": True}
    assert not any(entry.get("from_checkpoint") for entry in resumed.state.log_history[1:])
    resumed_losses = {entry["step"]: entry["loss"] for entry in resumed.state.log_history if "loss" in entry}
    assert resumed_losses == losses  # steps 2 and 3 trained again, from the checkpoint's weights and optimiser
    assert training.weights_checksum(resumed.model, trainable_only=False) == weights
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]


def _data_with_a_bad_row(folder, bad_row):
    """Four synthetic image-caption rows with `bad_row` inserted as line 3."""
    path = _import_finetune().write_synthetic_dataset(folder, 4, "pt")
    lines = path.read_text().splitlines()
    lines.insert(2, json.dumps(bad_row))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_bad_row_stops_the_example_before_the_model_loads(tmp_path, monkeypatch):
    finetune = _import_finetune()
    data = _data_with_a_bad_row(tmp_path / "data", {"image": "images/gone.png", "caption": "Gone."})

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(finetune, "load_model", load_model)
    with pytest.raises(ValueError, match=r"(?s)data.jsonl, line 3: Image file '.*images/gone.png' does not exist.*"
                                         r"as 'images/gone.png'.*--skip-bad-rows"):
        finetune.main(["--stage", "pt", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--max-steps", "1"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_skip_bad_rows_reports_them_and_resumes_exactly(tmp_path):
    """`--skip-bad-rows` leaves the bad row out before training and writes the count and reason to the results; a run
    interrupted after step 1 and resumed from its checkpoint ends with the same weights as the uninterrupted run."""
    finetune = _import_finetune()
    data = _data_with_a_bad_row(tmp_path / "data", {"text": "<image><image>A red square.",
                                                    "images": ["images/red-square.png"]})
    out = tmp_path / "run"
    common = ["--stage", "pt", "--data", str(data), "--skip-bad-rows", "--max-steps", "3",
              "--per-device-train-batch-size", "2", "--learning-rate", "1e-2", "--disable-tqdm", "true",
              "--logging-steps", "1", "--output-dir", str(out), "--save-strategy", "steps", "--save-steps", "1"]
    straight = finetune.main(common)
    weights = training.weights_checksum(straight.model, trainable_only=False)
    losses = {entry["step"]: entry["loss"] for entry in straight.state.log_history if "loss" in entry}
    assert sorted(losses) == [1, 2, 3]
    results = json.loads((out / "train_results.json").read_text())
    assert (results["train_samples"], results["data_rows"], results["data_rows_skipped"]) == (4, 5, 1)
    [reason] = results["data_skipped_reasons"]
    assert reason.startswith(f"{data}, line 3: An interleaved document has 2 `<image>` tokens but 1 images.")
    assert json.loads((out / "all_results.json").read_text())["data_skipped_reasons"] == [reason]

    for step in (2, 3):  # interrupted after step 1
        shutil.rmtree(out / f"checkpoint-{step}")
    resumed = finetune.main([*common, "--resume-from-checkpoint", "last"])
    assert resumed.state.global_step == 3
    resumed_losses = {entry["step"]: entry["loss"] for entry in resumed.state.log_history if "loss" in entry}
    assert resumed_losses == losses
    assert training.weights_checksum(resumed.model, trainable_only=False) == weights


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_a_stream_is_checked_row_by_row_while_training(tokenizer, tmp_path):
    """Past the rows checked up front, each row of an iterable dataset is checked before it reaches a batch."""
    rows = [*_pairs(), {"text": "<image> without its image"}, *_pairs()]
    model = tiny_model()
    training.apply_stage(model, "pt")
    collator = InfiMMDataCollator(_processor(model, tokenizer))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, report_to="none",
                             remove_unused_columns=False, use_cpu=True, disable_tqdm=True, save_strategy="no")
    stream, report = training.validate_dataset(_Stream(rows), collator, first_rows=2, name="stream")
    trainer = Trainer(model=model, args=args, train_dataset=stream, data_collator=collator)
    with pytest.raises(ValueError, match="stream, row index 4: An interleaved document has 1 `<image>` tokens"):
        trainer.train()
    assert trainer.state.global_step < 3

    stream, report = training.validate_dataset(_Stream(rows), collator, first_rows=2, skip_bad_rows=True,
                                               name="stream")
    Trainer(model=model, args=args, train_dataset=stream, data_collator=collator).train()
    assert report.skipped == 1 and report.reasons[0].startswith("stream, row index 4: ")


# ----------------------------------------------------------------------------------- distributed and reload
RELOAD = textwrap.dedent(
    """
    import json, sys
    sys.modules["infimm"] = None  # only the saved remote code may be used
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    folder, image = sys.argv[1:]
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(text="<image>A", images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1, :8]
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    print(json.dumps({"module": type(model).__module__, "logits": logits.tolist(),
                      "new_tokens": generated.shape[1] - inputs["input_ids"].shape[1]}))
    """
)


def _child_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.mark.slow
def test_torchrun_two_processes_then_reload_with_remote_code(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "examples" / "finetune.py"), "--stage", "pt", "--synthetic", "8", "--output-dir", str(out),
               "--max-steps", "2", "--per-device-train-batch-size", "2", "--learning-rate", "1e-2",
               "--checksum-dir", str(tmp_path / "checksums"), "--disable-tqdm", "true", "--logging-steps", "1"]
    run = subprocess.run(command, cwd=tmp_path, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "'loss'" in run.stdout + run.stderr and "trainable parameters" in run.stdout
    ranks = [(tmp_path / "checksums" / f"rank{r}.sha256").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1]

    saved = InfiMMForConditionalGeneration.from_pretrained(out).eval()
    training.apply_stage(saved, "pt")
    assert training.weights_checksum(saved) + "\n" == ranks[0]  # the saved folder holds what the ranks trained

    image = out / "synthetic-data" / "images" / "red-square.png"
    child = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(image)], cwd=tmp_path, env=_child_env(),
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-6000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.") and result["new_tokens"] == 3
    processor = InfiMMProcessor.from_pretrained(out)
    inputs = processor(text="<image>A", images=[str(image)], return_tensors="pt")
    with torch.no_grad():
        expected = saved(**inputs).logits[0, -1, :8]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-5, atol=1e-5)


def test_accelerate_launch_two_processes(tmp_path):
    """The same script under `accelerate launch` (two gloo processes on a CPU-only machine)."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29533",
               str(REPO / "examples" / "finetune.py"), "--stage", "pt", "--synthetic", "8", "--output-dir", str(out),
               "--max-steps", "2", "--per-device-train-batch-size", "2", "--learning-rate", "1e-2",
               "--checksum-dir", str(tmp_path / "checksums"), "--disable-tqdm", "true", "--logging-steps", "1"]
    run = subprocess.run(command, cwd=tmp_path, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    ranks = [(tmp_path / "checksums" / f"rank{r}.sha256").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1]
    saved = InfiMMForConditionalGeneration.from_pretrained(out).eval()
    training.apply_stage(saved, "pt")
    assert training.weights_checksum(saved) + "\n" == ranks[0]


# ------------------------------------------------------------------------------------------------ device map
@pytest.mark.parametrize("cap, devices", [
    (17_000_000, {"cpu", "disk"}),  # room for the tower, resampler, embeddings and two layers; the rest on disk
    (1_000_000, {"cpu", "disk"}),  # accelerate alone would put everything on disk, the tower included
])
def test_device_map_keeps_blocks_with_layers_and_offloads(cap, devices, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    meta = training.meta_model(model.config)
    raw = infer_auto_device_map(meta, max_memory={"cpu": cap}, no_split_module_classes=sorted(meta._no_split_modules))
    device_map = training.infer_device_map(meta, max_memory={"cpu": cap})
    assert training.blocks_follow_layers(meta, device_map)
    assert set(device_map.values()) == devices and device_map["model.vision_tower"] == "cpu"
    assert device_map != raw

    loaded = InfiMMForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")).eval()
    assert training.blocks_follow_layers(loaded, loaded.hf_device_map)
    pixel_values = torch.randn(2, 2, 3, 28, 28)
    input_ids = torch.tensor([[1, 32001, 330, 5255, 28723, 32000, 32001, 330],
                              [1, 32001, 330, 3914, 28723, 32000, 2, 2]])
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_mask=torch.tensor([[True, True], [True, False]]),
                  attention_mask=torch.tensor([[1] * 8, [1] * 6 + [0] * 2]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_device_map_auto_keeps_blocks_with_layers(tmp_path):
    """`from_pretrained(device_map="auto")` itself plans the map, with offload to disk under a memory cap."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    loaded = InfiMMForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": 17_000_000},
        offload_folder=str(tmp_path / "offload")).eval()
    assert set(loaded.hf_device_map.values()) == {"cpu", "disk"}
    assert training.blocks_follow_layers(loaded, loaded.hf_device_map)
    input_ids = torch.tensor([[1, 32001, 330, 5255, 28723, 32000, 32001, 330]])
    inputs = dict(input_ids=input_ids, pixel_values=torch.randn(1, 2, 3, 28, 28))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


REMOTE_DEVICE_MAP = textwrap.dedent(
    """
    import sys
    sys.modules["infimm"] = None  # only the saved remote code may be used
    import torch
    from transformers import AutoModelForImageTextToText

    folder, offload, inputs_file, results_file = sys.argv[1:]
    torch.set_num_threads(1)
    model = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, device_map="auto", max_memory={"cpu": 1_000_000}, offload_folder=offload
    ).eval()
    with torch.no_grad():
        logits = model(**torch.load(inputs_file)).logits
    torch.save({"module": type(model).__module__, "device_map": dict(model.hf_device_map), "logits": logits},
               results_file)
    """
)


@pytest.mark.slow
def test_device_map_auto_is_planned_by_the_remote_code_too(tmp_path):
    """Loaded from the Hub files alone, `device_map="auto"` under a cap where accelerate by itself would send the
    vision tower to disk (never loaded there): the shipped planner keeps it on the CPU and blocks with layers."""
    from helpers_modeling import save_remote_code_folder

    model = tiny_model()
    folder = save_remote_code_folder(model, tmp_path / "model")
    assert (folder / "device_map_infimm.py").is_file()
    meta = training.meta_model(model.config)
    raw = infer_auto_device_map(meta, max_memory={"cpu": 1_000_000}, no_split_module_classes=sorted(meta._no_split_modules))
    tower_keys = [key for key in raw if key == "" or "model.vision_tower".startswith(key + ".") or key == "model.vision_tower"]
    assert {raw[key] for key in tower_keys} == {"disk"}  # accelerate alone: the tower (and all else) on disk

    inputs = dict(input_ids=torch.tensor([[1, 32001, 330, 5255, 28723, 32000, 32001, 330]]),
                  pixel_values=torch.randn(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(0)))
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**_child_env(), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    child = subprocess.run(
        [sys.executable, "-c", REMOTE_DEVICE_MAP, str(folder), str(tmp_path / "offload"), str(tmp_path / "inputs.pt"),
         str(tmp_path / "results.pt")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-6000:]
    result = torch.load(tmp_path / "results.pt")
    assert result["module"].startswith("transformers_modules.")
    device_map = result["device_map"]
    assert set(device_map.values()) == {"cpu", "disk"} and device_map["model.vision_tower"] == "cpu"
    assert training.blocks_follow_layers(meta, device_map)
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_device_map_strategy_must_be_known():
    with pytest.raises(ValueError, match="'balanced_low_0' or 'sequential'"):
        training.infer_device_map(training.meta_model(tiny_config()), strategy="fastest")


def test_device_map_without_accelerate_says_what_to_install(monkeypatch):
    import infimm.device_map_infimm as planner

    monkeypatch.setattr(planner, "is_accelerate_available", lambda: False)
    with pytest.raises(ImportError, match="pip install accelerate"):
        planner.infer_device_map(training.meta_model(tiny_config()))


def test_accelerate_alone_splits_a_block_from_its_layer():
    meta = training.meta_model(tiny_config())
    raw = infer_auto_device_map(meta, max_memory={"cpu": 17_000_000},
                                no_split_module_classes=sorted(meta._no_split_modules))
    assert not training.blocks_follow_layers(meta, raw)  # block 1 on disk, layer 1 on cpu
    assert training.blocks_follow_layers(meta, training.place_blocks_with_layers(meta, raw))


# ------------------------------------------------------------------------------------------------- DeepSpeed
DEEPSPEED_CONFIG = REPO / "examples" / "deepspeed_zero2.json"


def test_deepspeed_config_mirrors_the_paper():
    config = json.loads(DEEPSPEED_CONFIG.read_text())
    assert config["zero_optimization"]["stage"] == 2
    assert config["bf16"]["enabled"] is True and config["gradient_clipping"] == 1.0
    assert config["optimizer"]["type"] == "AdamW"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (GPU machines)")
def test_training_arguments_accept_the_deepspeed_config(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(DEEPSPEED_CONFIG), bf16=True, report_to="none")
    assert args.deepspeed_plugin is not None


DEEPSPEED_ZERO3_CONFIG = REPO / "examples" / "deepspeed_zero3.json"


def _auto_keys(config, prefix=""):
    keys = set()
    for key, value in config.items():
        if isinstance(value, dict):
            keys |= _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.add(prefix + key)
    return keys


def test_deepspeed_configs_fill_from_each_stage_recipe(tmp_path, monkeypatch):
    """Both DeepSpeed configs through transformers' own "auto" filling (`HfTrainerDeepSpeedConfig`, as Trainer runs
    it) with the script's TrainingArguments for every stage: no value may be left "auto" or contradict the recipe.

    DeepSpeed itself is not installed here; without it transformers' class derives from `object`, so accelerate's
    config parser (its normal base) is mixed back in, and the version check and the global registration are skipped.
    """
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    import transformers.integrations.deepspeed as hf_deepspeed

    monkeypatch.setattr(hf_deepspeed, "dep_version_check", lambda *args, **kwargs: None)
    monkeypatch.setattr(hf_deepspeed, "set_hf_deepspeed_config", lambda config: None)
    filler = type("Filler", (hf_deepspeed.HfTrainerDeepSpeedConfig, HfDeepSpeedConfig), {})
    finetune = _import_finetune()
    zero2, zero3 = (json.loads(path.read_text()) for path in (DEEPSPEED_CONFIG, DEEPSPEED_ZERO3_CONFIG))
    assert zero3["zero_optimization"]["stage"] == 3
    # Same recipe (precision, optimiser, clipping, batch sizes); only the sharding differs.
    assert {k: v for k, v in zero3.items() if k != "zero_optimization"} == {
        k: v for k, v in zero2.items() if k != "zero_optimization"}
    # Trainer.save_model writes loadable weights under ZeRO-3 only when they are gathered on save.
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert {"zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
            "zero_optimization.stage3_param_persistence_threshold"} <= _auto_keys(zero3)

    model = tiny_model()
    hidden = model.config.text_config.hidden_size  # InfiMM's config has no top-level hidden_size
    assert not hasattr(model.config, "hidden_size")
    for stage in training.STAGES:
        _, args = finetune.parse_args(["--stage", stage, "--synthetic", "4", "--output-dir", str(tmp_path),
                                       "--bf16", "true", "--use-cpu", "true"])
        r = training.recipe(stage)
        for config in (zero2, zero3):
            filled = filler(json.loads(json.dumps(config)))
            filled.trainer_config_process(args)
            filled.trainer_config_finalize(args, model, num_training_steps=100)  # raises on a contradiction
            assert _auto_keys(filled.config) == set()
            assert filled.config["optimizer"]["params"] == {
                "lr": r.learning_rate, "betas": [r.adam_beta1, r.adam_beta2], "eps": r.adam_epsilon,
                "weight_decay": r.weight_decay}
            assert filled.config["gradient_clipping"] == r.max_grad_norm
        assert filled.config["zero_optimization"]["reduce_bucket_size"] == hidden * hidden
        assert filled.config["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * hidden


# ----------------------------------------------------------------------------------------------- the example
def _import_finetune():
    spec = importlib.util.spec_from_file_location("infimm_finetune_example", REPO / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
