import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("BLENDED_DIFFUSION_LPIPS_RANDOM", "1")  # no torchvision download in tests
torch.set_num_threads(2)

from pack import load_pack  # noqa: E402

load_pack()
import tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui_host: the module runs the pack inside an in-process ComfyUI "
                            "(tests/comfy_env.py): the host adapter uses ComfyUI's services for its tests")


@pytest.fixture(scope="module", autouse=True)
def _host_mode(request):
    """The host adapter's services for this module's tests: ComfyUI's for modules marked ``comfyui_host``, the
    standalone ones otherwise. The host picks its mode once, when first imported, so in one pytest process
    (``COMFYUI_PATH`` set, every file) whichever module imported it first would decide for all of them."""
    host = sys.modules.get("blended_diffusion.host")
    want = request.node.get_closest_marker("comfyui_host") is not None
    if host is None or host.IN_COMFYUI == want:
        yield
        return
    host.attach(want)
    try:
        yield
    finally:
        host.attach(not want)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tiny.save_unet(d / "256x256_diffusion_uncond.pt")
    tiny.save_unet(d / "uncond.safetensors")
    tiny.save_unet(d / "64x64_classes.pt", tiny.UNET_64_CLASSES)
    tiny.save_clip(d / "ViT-B-16.pt", "torchscript")
    tiny.save_clip(d / "clip_sd.pt", "pt")
    tiny.save_clip(d / "clip.safetensors", "safetensors")
    return d


@pytest.fixture(scope="session")
def ddpm(ckpt_dir):
    from blended_diffusion.models import load_ddpm
    return load_ddpm(str(ckpt_dir / "256x256_diffusion_uncond.pt"), respacing="10")


@pytest.fixture(scope="session")
def clip(ckpt_dir):
    from blended_diffusion.models import load_clip
    return load_clip(str(ckpt_dir / "ViT-B-16.pt"))


@pytest.fixture
def image_and_mask():
    """A smooth 96x128 test image and a rectangular mask (non-square, smaller than the model)."""
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 128), indexing="ij")
    img = torch.stack([xx, yy, (xx + yy) / 2])[None] * 0.8 + 0.1 * torch.rand(1, 3, 96, 128, generator=g)
    img = (img * 255).round() / 255  # 8-bit values, as loaded images are
    mask = torch.zeros(1, 96, 128)
    mask[:, 30:70, 40:90] = 1
    return img, mask


@pytest.fixture(autouse=True)
def _allocator_back_to_defaults():
    """The CLI keeps freed memory for its whole process on the CPU (models/memory.py); in this shared test
    process give it back after each test, so every test starts from glibc's behaviour."""
    yield
    from blended_diffusion.models import memory
    if memory._on or memory._returning:  # (the latter: set after an out-of-memory on the CPU)
        memory.keep_freed_memory(False)
