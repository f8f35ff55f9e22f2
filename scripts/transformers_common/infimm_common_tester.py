"""InfiMM under transformers' own common model tests, set up the way the library's VLM testers are (LLaVA, IDEFICS).

Run it through `run.py`, which provides the common test files (they are not part of this project) and sets
`INFIMM_TRANSFORMERS_TESTS_ROOT` to the folder that holds their `tests/` package.

The tester builds the project's tiny layout (`tests/conftest.py: tiny_config`: 4 Mistral layers 64 wide, blocks
before layers 1 and 3, a 2-block 32-wide EVA tower at 28 px, a 2-layer resampler with 4 latents) with a 99-token
vocabulary so that the model stays under the common tests' one-million-parameter limit. Every sample holds two
images and two `<image>` tokens (in odd rows after a text token, so tokens before the first image are covered). As
IDEFICS' tester does with `alpha_initializer="ones"`, the gates are initialised to 1.0, so every test sees the image
path (at 0 each block is an identity and image bugs would go unnoticed).
"""

import copy
import os
import sys
import unittest
from pathlib import Path
from unittest import mock

import torch

_ROOT = os.environ.get("INFIMM_TRANSFORMERS_TESTS_ROOT")
if not _ROOT or not (Path(_ROOT) / "tests" / "test_modeling_common.py").is_file():
    raise ImportError(
        "Set INFIMM_TRANSFORMERS_TESTS_ROOT to a folder holding transformers' tests/ package; "
        "`python scripts/transformers_common/run.py` does this for you."
    )
sys.path.insert(0, _ROOT)  # `tests` below is transformers' common tests package, not this project's tests
_REPO = Path(__file__).resolve().parents[2]

from parameterized import parameterized
from tests.generation import test_utils as _generation_test_utils
from tests.test_configuration_common import ConfigTester
from tests.test_modeling_common import (
    TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION,
    ModelTesterMixin,
    _test_eager_matches_sdpa_inference,
    floats_tensor,
    ids_tensor,
)
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from transformers import initialization as init
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

from tests import test_modeling_common

GenerationTesterMixin = _generation_test_utils.GenerationTesterMixin
GENERATION_TESTS = not getattr(_generation_test_utils, "STUB", False)

try:
    import infimm  # noqa: F401
except ImportError:  # the repository root is the package; importable without installation too
    import importlib.util

    _spec = importlib.util.spec_from_file_location("infimm", _REPO / "__init__.py", submodule_search_locations=[str(_REPO)])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["infimm"] = _module
    _spec.loader.exec_module(_module)

from infimm import (
    InfiMMConfig,
    InfiMMForConditionalGeneration,
    InfiMMModel,
    InfiMMPreTrainedModel,
)
from infimm.modeling_infimm import InfiMMGatedCrossAttentionBlock

torch.set_num_threads(int(os.environ.get("INFIMM_COMMON_TESTS_THREADS", "1")))


# ------------------------------------------------------------------------------------------ auto-class registration
def register_infimm():
    """Registers InfiMM as an in-library model is registered: in the Auto classes and in the name tables that the
    common tests read (`MODEL_MAPPING_NAMES` picks the base model, `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`
    makes `_prepare_for_class` add causal-LM labels and enables the image-text-to-text checks)."""
    AutoConfig.register("infimm", InfiMMConfig, exist_ok=True)
    AutoModel.register(InfiMMConfig, InfiMMModel, exist_ok=True)
    AutoModelForImageTextToText.register(InfiMMConfig, InfiMMForConditionalGeneration, exist_ok=True)
    # The name tables map model types to class names inside `transformers.models`. "infimm" is not in
    # CONFIG_MAPPING_NAMES, so the lazy mappings never try to import `transformers.models.infimm` for it; the
    # registrations above answer lookups by config class.
    modeling_auto.MODEL_MAPPING_NAMES.setdefault("infimm", "InfiMMModel")
    modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault("infimm", "InfiMMForConditionalGeneration")


register_infimm()

GATE_VALUE = 1.0
_original_init_weights = InfiMMPreTrainedModel._init_weights


@torch.no_grad()
def _init_weights_open_gates(self, module):
    """The model's own init, then the gates at `GATE_VALUE` (IDEFICS' tester: `alpha_initializer="ones"`). Weights
    loaded from a checkpoint keep their values (transformers' init functions skip initialised tensors)."""
    _original_init_weights(self, module)
    if isinstance(module, InfiMMGatedCrossAttentionBlock):
        init.constant_(module.attn_gate, GATE_VALUE)
        init.constant_(module.ff_gate, GATE_VALUE)


# ----------------------------------------------------------------------------------------------------- the tester
class InfiMMModelTester:
    def __init__(
        self,
        parent,
        batch_size=3,
        seq_length=7,
        num_images=2,
        vocab_size=99,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        image_size=28,
        patch_size=14,
        vision_embed_dim=32,
        vision_depth=2,
        vision_heads=2,
        is_training=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.num_images = num_images
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = 3
        self.vision_depth = vision_depth
        self.is_training = is_training
        # Special ids at the bottom of the vocabulary, as LLaVA's tester puts its image token at 0: the resize tests
        # shrink the vocabulary and clamp `input_ids` to it, which must not turn an `<image>` into text. The
        # generation tests read `image_token_id` to keep `<image>` out of generated text.
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 1, 2, 2
        self.media_token_id = self.image_token_id = 3
        self.eoc_token_id = 4
        self.first_text_id = 5
        self.text_settings = {
            "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads, "max_position_embeddings": 512,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        }
        self.vision_settings = {
            "model_args": {"img_size": image_size, "patch_size": patch_size, "embed_dim": vision_embed_dim,
                           "depth": vision_depth, "num_heads": vision_heads},
        }

    def get_config(self):
        return InfiMMConfig.from_preset(
            "infimm-zephyr",
            vision_config=copy.deepcopy(self.vision_settings),
            text_config=dict(self.text_settings),
            resampler_depth=2, resampler_num_latents=4, resampler_heads=2, resampler_head_dim=8,
            cross_attn_heads=2, cross_attn_head_dim=8,
            media_token_id=self.media_token_id, eoc_token_id=self.eoc_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        # text ids only (no bos / eos / pad, no `<|endofchunk|>`), then two `<image>` tokens per row
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - self.first_text_id)
        input_ids += self.first_text_id
        for row in range(self.batch_size):
            input_ids[row, [row % 2, 4]] = self.media_token_id
        attention_mask = torch.ones_like(input_ids)
        pixel_values = floats_tensor(
            [self.batch_size, self.num_images, self.num_channels, self.image_size, self.image_size]
        )
        return config, {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


# --------------------------------------------------------------------------------------------------- the test case
class InfiMMModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (InfiMMModel, InfiMMForConditionalGeneration)
    _is_composite = True
    # The eager / SDPA comparison passes only the main input and these; InfiMM needs the images with their tokens.
    additional_model_inputs = ("pixel_values",)
    # `_init_weights` must cover every weight; the common test skips files without a copyright year before 2023.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        patcher = mock.patch.object(InfiMMPreTrainedModel, "_init_weights", _init_weights_open_gates)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.model_tester = InfiMMModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=InfiMMConfig, has_text_modality=False,
            common_properties=["media_token_id", "eoc_token_id", "cross_attn_every_n_layers"],
            resampler_depth=2, resampler_num_latents=4, cross_attn_heads=2,
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_gates_are_open(self):
        """The tester's premise: a fresh model's gates are at GATE_VALUE, so the images change the logits."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = InfiMMForConditionalGeneration(config).to(torch_device).eval()
        for block in model.model.cross_attention_layers.values():
            self.assertEqual(block.attn_gate.item(), GATE_VALUE)
            self.assertEqual(block.ff_gate.item(), GATE_VALUE)
        with torch.no_grad():
            first = model(**inputs).logits
            inputs["pixel_values"] = inputs["pixel_values"] + 1.0
            second = model(**inputs).logits
        self.assertGreater(float((first - second).abs().max()), 1e-5)

    def test_num_layers_is_small(self):
        """The library asks for at most 2 decoder layers; this tester keeps the project's tiny layout (4 layers,
        blocks before layers 1 and 3, so a block's key differs from its rank) and the parameter limit still holds."""
        self.assertLessEqual(self.model_tester.num_hidden_layers, 4)
        self.assertLessEqual(self.model_tester.vision_depth, 2)

    @parameterized.expand(TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION)
    def test_eager_matches_sdpa_inference(
        self, name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels
    ):
        """The library's comparison, with a tester batch of the 7 rows it runs: it pads shorter inputs with random
        rows, whose images would have no `<image>` tokens (InfiMM refuses that mismatch, README "Forward inputs")."""
        self.model_tester.batch_size = 7
        _test_eager_matches_sdpa_inference(
            self, name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels
        )

    @parameterized.expand([("linear",), ("dynamic",), ("yarn",)])
    def test_model_rope_scaling_from_config(self, scaling_type):
        """The library's test feeds random ids over the whole vocabulary without images. InfiMM refuses `<image>`
        tokens without images (README "Forward inputs": a mismatch raises), so the ids are drawn from the text ids."""
        first = self.model_tester.first_text_id

        def text_ids(shape, vocab_size, rng=None, name=None):
            return ids_tensor(shape, vocab_size - first, rng=rng, name=name) + first

        # `parameterized.expand` replaced the library's method by one per scaling type
        (library_test,) = [
            getattr(ModelTesterMixin, name) for name in dir(ModelTesterMixin)
            if name.startswith("test_model_rope_scaling_from_config_") and name.endswith(f"_{scaling_type}")
        ]
        with mock.patch.object(test_modeling_common, "ids_tensor", text_ids):
            library_test(self)

    def check_training_gradient_checkpointing(self, gradient_checkpointing_kwargs=None):
        """The library's check, with the vision tower's final norm frozen as the check's "intentionally frozen". By
        design the features are the tower's last block BEFORE its final norm (the release's; the norm stays in the
        checkpoint, which is timm's layout), so that norm never gets a gradient, checkpointing or not."""
        original = InfiMMPreTrainedModel.post_init

        def post_init(model):
            original(model)
            if isinstance(model, InfiMMModel):
                model.vision_tower.timm_model.norm.requires_grad_(False)

        with mock.patch.object(InfiMMPreTrainedModel, "post_init", post_init):
            super().check_training_gradient_checkpointing(gradient_checkpointing_kwargs)

    @unittest.skip(reason="timm towers return no attention maps (TimmWrapperModel takes no output_attentions); "
                          "get_image_features documents `attentions` as None")
    def test_get_image_features_attentions(self):
        pass

    if not GENERATION_TESTS:

        @unittest.skip(reason="GenerationTesterMixin is not in the sdist; pass --transformers-src to run the generation tests")
        def test_generation_tester_mixin_inheritance(self):
            pass


# Causes found for tests that failed on InfiMM, printed by run.py beside a failure of that test (test name or name
# prefix -> cause). A failure listed here with a different message than the cause describes needs a fresh look.
DIAGNOSES = {
    "test_training_gradient_checkpointing_use_reentrant_true": (
        "InfiMM: with reentrant checkpointing a cross-attention block must see the resampled latents as a "
        "positional tensor input; if they travel inside another object, each block's recomputation backpropagates "
        "into the resampler's graph and the second block finds it freed. Fix: hand the latents to the block as a "
        "positional tensor."
    ),
    "test_multimodal_outputs_are_returned": (
        "InfiMM: forward's `image_outputs` lists the encoded images flat (one entry per image) where "
        "`get_image_features(pixel_values)` and the library give one entry per sample. Fix: lay `image_outputs` "
        "out as get_image_features does."
    ),
}
