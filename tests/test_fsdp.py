"""FSDP2 through accelerate: `accelerate launch --config_file examples/fsdp.yaml examples/finetune.py` on two CPU
processes (gloo), against the same steps in one process.

accelerate 1.15 turns an FSDP launch into FSDP only for GPU-type process groups (`AcceleratorState.__init__` lists
MULTI_GPU, MULTI_XPU, ...; MULTI_CPU is not among them), so on CPU processes it drops the plugin and the run would be
plain DDP; `test_accelerate_enables_fsdp_only_on_gpus` pins that down. The launch below lifts only that check, in
the child processes: the sharding (`fully_shard`, the script's layer + cross-attention units, accelerate's
auto-wrap), the optimizer's switch to the shards, gradient reduction and the full state dict on save are accelerate's
and torch's own code, on gloo.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

from infimm import InfiMMForConditionalGeneration
from infimm import training_infimm as training

FINETUNE = REPO / "examples" / "finetune.py"
FSDP_CONFIG = REPO / "examples" / "fsdp.yaml"

# Run in each launched process in place of the script: lifts accelerate's device check for FSDP (see above), records
# the FSDP units after training, then runs examples/finetune.py as `__main__`.
LAUNCHED = textwrap.dedent(
    """
    import json, os, runpy, sys
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    build_state = AcceleratorState.__init__

    def gpu_like_state(self, *args, **kwargs):
        shared = PartialState._shared_state
        lift = shared.get("distributed_type") == DistributedType.MULTI_CPU
        if lift:
            shared["distributed_type"] = DistributedType.MULTI_GPU  # becomes FSDP inside, from the launch's env
        try:
            build_state(self, *args, **kwargs)
        finally:
            if lift and shared.get("distributed_type") == DistributedType.MULTI_GPU:
                shared["distributed_type"] = DistributedType.MULTI_CPU

    AcceleratorState.__init__ = gpu_like_state

    from torch.distributed.fsdp import FSDPModule
    from transformers import Trainer

    train = Trainer.train

    def train_and_record_units(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        module_names = {id(module): name for name, module in self.model.named_modules()}
        units = {}
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                # FSDP2 keeps one parameter group per unit (shared by the modules of a list unit).
                group = module._get_fsdp_state()._fsdp_param_group
                if group is not None:
                    units[id(group)] = sorted(
                        f"{module_names[id(p._module_info.module)]}.{p._module_info.param_name}".lstrip(".")
                        for p in group.fsdp_params
                    )
        if self.is_world_process_zero():
            with open(os.environ["FSDP_UNITS_FILE"], "w") as handle:
                json.dump(sorted(units.values()), handle)
        return result

    Trainer.train = train_and_record_units
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _import_finetune():
    import importlib.util

    spec = importlib.util.spec_from_file_location("infimm_finetune_example", FINETUNE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Each step's global batch is the whole synthetic set (4 examples: 2 per process, or 4 in one), so both runs see
# the same batches whatever the sampler's order. SGD with momentum: its update is linear in the gradients, so a wrong
# gradient average (a sum, a missing rank) shows in the weights, where Adam's normalised step would hide it; and it
# has optimizer state, which the checkpoint at step 2 gathers from the shards.
RECIPE = ["--stage", "pt", "--synthetic", "4", "--max-steps", "3", "--optim", "sgd", "--optim-args", "momentum=0.9",
          "--learning-rate", "0.5", "--disable-tqdm", "true", "--logging-steps", "1", "--seed", "0",
          "--save-strategy", "steps", "--save-steps", "2"]


def test_fsdp2_two_cpu_processes_match_one_process(tmp_path):
    out = tmp_path / "fsdp"
    launched = tmp_path / "launched.py"
    launched.write_text(LAUNCHED)
    units_file = tmp_path / "units.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--main_process_port", str(_free_port()), str(launched), str(FINETUNE), *RECIPE,
               "--per-device-train-batch-size", "2", "--output-dir", str(out),
               "--checksum-dir", str(tmp_path / "checksums")]
    run = subprocess.run(command, cwd=tmp_path, env=_child_env(FSDP_UNITS_FILE=str(units_file)),
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]

    # Units: decoder layer i and block i together (layers 1 and 3 have blocks), each block in no other unit.
    units = json.loads(units_file.read_text())
    reference = _import_finetune().main([*RECIPE, "--per-device-train-batch-size", "4",
                                         "--output-dir", str(tmp_path / "single")])
    names = [name for name, _ in reference.model.named_parameters()]
    trainable = {name for name, param in reference.model.named_parameters() if param.requires_grad}
    for index in range(4):
        layer = {n for n in names if n.startswith(f"model.language_model.model.layers.{index}.")}
        block = {n for n in names if n.startswith(f"model.cross_attention_layers.{index}.")}
        assert bool(block) == (index in (1, 3))
        assert sorted(layer | block) in units, index
        if block:
            assert block <= trainable and not layer & trainable  # frozen and trained weights in one unit
    resampler = sorted(n for n in names if n.startswith("model.resampler."))
    assert resampler in units  # accelerate's auto-wrap, from the model's _no_split_modules
    assert sorted(n for unit in units for n in unit) == sorted(names)  # every weight in exactly one unit

    # The folder holds full weights that load with from_pretrained, equal to the one-process run's.
    assert {"model.safetensors", "trainer_state.json", "train_results.json", "modeling_infimm.py"} <= {
        p.name for p in out.iterdir()}
    assert not list(out.glob("_fsdp*.py"))
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert set(auto_map.values()) == {"configuration_infimm.InfiMMConfig",
                                      "modeling_infimm.InfiMMForConditionalGeneration"}
    expected = reference.model.state_dict()
    raw = load_file(str(out / "model.safetensors"))
    assert {name: tuple(t.shape) for name, t in raw.items()} == {name: tuple(t.shape) for name, t in expected.items()}
    saved = InfiMMForConditionalGeneration.from_pretrained(out)
    actual = saved.state_dict()
    differences = {name: (actual[name] - expected[name]).abs().max().item() for name in expected}
    assert max(differences.values()) < 1e-6, max(differences.items(), key=lambda item: item[1])
    untrained = _import_finetune().build_tiny_model(0)[0].state_dict()
    moved = max((expected[n] - untrained[n]).abs().max().item() for n in trainable)
    assert moved > 1e-3  # the steps moved the weights far beyond the tolerance
    for name in expected:
        if name not in trainable:
            assert torch.equal(actual[name], untrained[name]), name

    # Every rank saw the full trained weights, and those are the ones saved.
    checksums = {(tmp_path / "checksums" / f"rank{r}.sha256").read_text() for r in (0, 1)}
    training.apply_stage(saved, "pt")
    assert checksums == {training.weights_checksum(saved) + "\n"}

    # The checkpoint's optimizer state: every trained weight's momentum, gathered to its full shape.
    optimizer_state = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)["state"]
    assert set(optimizer_state) == trainable
    assert all(optimizer_state[n]["momentum_buffer"].shape == expected[n].shape for n in trainable)

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    fsdp_losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    single_losses = [entry["loss"] for entry in reference.state.log_history if "loss" in entry]
    torch.testing.assert_close(fsdp_losses, single_losses, rtol=1e-5, atol=1e-5)


def test_accelerate_enables_fsdp_only_on_gpus(tmp_path):
    """The check the launch above lifts: a CPU process group with an FSDP config gets no FSDP from accelerate."""
    code = textwrap.dedent(
        """
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=True)
        print(accelerator.distributed_type, getattr(accelerator.state, "fsdp_plugin", None))
        """
    )
    env = _child_env(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1",
                     LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.split() == ["DistributedType.MULTI_CPU", "None"]


def test_fsdp_asked_for_but_not_enabled_is_refused(monkeypatch):
    finetune = _import_finetune()
    trainer = types.SimpleNamespace(is_fsdp_enabled=False, args=types.SimpleNamespace(fsdp=[]))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="only on GPUs"):
        finetune.prepare_fsdp(trainer, lora=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert finetune.prepare_fsdp(trainer, lora=False) is False


def test_layer_units_refuse_what_they_cannot_shard():
    def accelerator(**plugin):
        return types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(**plugin)))

    with pytest.raises(ValueError, match="needs FSDP2"):
        training.shard_blocks_with_layers(None, accelerator(fsdp_version=1, cpu_ram_efficient_loading=False))
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading"):
        training.shard_blocks_with_layers(None, accelerator(fsdp_version=2, cpu_ram_efficient_loading=True))
