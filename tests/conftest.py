import os

import pytest
import torch

# Two cores: keep each test process to one BLAS thread so parallel runs don't thrash.
torch.set_num_threads(int(os.environ.get("VISPROMPT_TEST_THREADS", "1")))
# A fixed kernel plan: no calibration timing inside tests, the same code paths on every machine
# (tests/test_cpu_choice.py covers the calibrated plan).
os.environ.setdefault("VISPROMPT_KERNEL_ROWS", "128")


def image_conv(color, question, n_images=1):
    """A one-turn chat with `n_images` plain-colour images (each a different size) and a question."""
    from PIL import Image

    images = [{"type": "image", "image": Image.new("RGB", (40, 30 + 7 * k), color)} for k in range(n_images)]
    return [{"role": "user", "content": [*images, {"type": "text", "text": question}]}]


# Chats that cover one image, two images, a system prompt and prompts of different lengths.
IMAGE_CONVS = [
    image_conv("red", "What color is the circle?"),
    image_conv("blue", "How many shapes are there? Describe the image please, in detail."),
    image_conv("green", "Where is the square?", n_images=2),
    [{"role": "system", "content": "Be brief."}, *image_conv("yellow", "yes or no?")],
]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes dataset, generated once per test session (nothing is downloaded)."""
    from visprompt.data.shapes import generate_shapes_dataset

    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(
        out, n_train=48, n_test=8, seed=3, turns_per_record=0, image_after_question=False
    )  # multi-turn, image first
    return out


def tiny_config(**overrides):
    from visprompt.models.config import VLMConfig

    base = dict(
        vision_type="vit",
        vision_hidden_size=32,
        vision_layers=1,
        vision_heads=2,
        vision_patch_size=8,
        image_size=32,
        lm_hidden_size=48,
        lm_layers=2,
        lm_heads=2,
        lm_kv_heads=1,
        lm_max_position=256,
        tokenizer_vocab_size=320,
    )
    base.update(overrides)
    return VLMConfig(**base)


TEXTS = [
    "What color is the circle?",
    "red",
    "blue",
    "green",
    "How many shapes are there?",
    "3",
    "yes",
    "no",
    "Describe the image.",
    "a small red circle and a large blue square",
    "Where is the square?",
    "top left",
]


def spread_weights(model, std=0.4, seed=0):
    """Random init with a wide spread, so greedy decoding of an untrained model varies token to token
    (the default 0.02 init makes every step pick the same token, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_model():
    from visprompt.models.vision_language_model import VisionLanguageModel

    torch.manual_seed(0)
    return spread_weights(VisionLanguageModel.build(tiny_config(), TEXTS)).eval()


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] input ids and attention mask, left padded (a batch whose next tokens all sit last)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    # mask: [B, T] -> position ids [B, T] counting real tokens only; pads get 0
    return (mask.cumsum(-1) - 1).clamp(min=0)
