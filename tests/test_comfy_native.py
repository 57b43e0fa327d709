"""The pack as a native ComfyUI citizen (issue 13): its UNet and CLIP under ComfyUI's model management.

Skips unless ``COMFYUI_PATH`` names a ComfyUI checkout importable by this interpreter, e.g.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_comfy_native.py

ComfyUI is imported in-process (``--cpu`` without CUDA) before the pack, so the host adapter uses ComfyUI's
services; the nodes run under ``torch.inference_mode()`` as ComfyUI runs them.
"""
from __future__ import annotations


import pytest
import torch

from comfy_env import load_comfyui  # noqa: E402

COMFY = str(load_comfyui("the model-management tests"))
pytestmark = pytest.mark.comfyui_host  # the host adapter uses ComfyUI's services here (conftest.py)
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import folder_paths  # noqa: E402

import tiny  # noqa: E402  (tests/ is on sys.path)
from blended_diffusion import host  # noqa: E402
from blended_diffusion.nodes import NODE_CLASS_MAPPINGS as N  # noqa: E402
from blended_diffusion.nodes import loaders  # noqa: E402



@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory):
    """ComfyUI's models folder with the tiny checkpoints in ddpm/ and clip_guidance/ (registered by host.register)."""
    root = tmp_path_factory.mktemp("comfy_models")
    (root / "ddpm").mkdir()
    (root / "clip_guidance").mkdir()
    tiny.save_unet(root / "ddpm" / "64x64_classes.pt", tiny.UNET_64_CLASSES)
    tiny.save_clip(root / "clip_guidance" / "ViT-B-16.pt", "torchscript")
    old = folder_paths.models_dir
    folder_paths.models_dir = str(root)
    host.register()
    for kind in ("ddpm", "clip_guidance"):
        folder_paths.add_model_folder_path(kind, str(root / kind), is_default=True)
    loaders.clear_cache()
    yield root
    folder_paths.models_dir = old
    loaders.clear_cache()
    mm.unload_all_models()


def _image_and_mask():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 48, 64, 3, generator=g)
    mask = torch.zeros(1, 48, 64)
    mask[:, 10:30, 20:44] = 1
    return img, mask


def _run(seed=404):
    """LoadDDPM + LoadCLIP + NoiseImage + CLIPGuidedStep + MaskBlend + sampler, as ComfyUI runs them."""
    with torch.inference_mode():
        ddpm = N["LoadDDPM"]().load("64x64_classes.pt", "10", "fp32")[0]
        clip = N["LoadCLIP"]().load("ViT-B-16.pt", "fp32")[0]
        img, mask = _image_and_mask()
        noise = N["NoiseImage"]().noise(img, ddpm, skip_timesteps=7)[0]
        aug = N["ExtendingAugment"]().settings(num_views=2)[0]
        step = N["CLIPGuidedStep"]().step(ddpm, prompt="a blue cube", clip=clip, augment=aug)[0]
        blend = N["MaskBlend"]().blend(mask)[0]
        out = N["BlendedDiffusionSampler"]().sample(noise, step, seed=seed, batch_size=1, blend=blend)[0]
    return ddpm, clip, out


def test_models_are_loaded_offloaded_and_reloaded_by_comfyui(comfy_models):
    ddpm, clip, first = _run()
    assert host.loaded(ddpm) and host.loaded(clip)   # in comfy.model_management.current_loaded_models
    patchers = [lm.model for lm in mm.current_loaded_models]
    assert ddpm.model.bd_patcher in patchers and clip.model.bd_patcher in patchers
    assert ddpm.model.bd_patcher.load_device == mm.get_torch_device()

    mm.unload_all_models()                            # what POST /free with unload_models does
    assert not host.loaded(ddpm) and not host.loaded(clip)

    ddpm2, clip2, again = _run()                      # the loader cache gives the same objects back
    assert ddpm2.model is ddpm.model and clip2.model is clip.model
    assert host.loaded(ddpm2) and host.loaded(clip2)
    assert torch.equal(first, again)                  # same seed, same images after the reload


def test_another_model_loaded_first_still_runs_ours(comfy_models):
    _, _, ref = _run()
    other = torch.nn.Sequential(torch.nn.Linear(8, 8))
    patcher = comfy.model_patcher.ModelPatcher(other, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    mm.unload_all_models()
    with torch.inference_mode():   # ComfyUI loads (and moves) models in inference mode
        mm.load_models_gpu([patcher])
    assert any(lm.model is patcher for lm in mm.current_loaded_models)
    ddpm, clip, out = _run()       # our models still load and guidance still gets gradients
    assert host.loaded(ddpm) and host.loaded(clip)
    assert torch.equal(out, ref)


def test_inference_tensors_from_a_host_move_are_thawed(comfy_models):
    """A model ComfyUI moved in inference mode has inference parameters; the run still takes gradients."""
    ddpm, clip, ref = _run()
    with torch.inference_mode():
        for m in (ddpm.model, clip.model):
            for mod in m.modules():
                for name, p in list(mod._parameters.items()):
                    if p is not None:
                        mod._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
    assert any(p.is_inference() for p in ddpm.model.parameters())
    _, _, out = _run()
    assert not any(p.is_inference() for p in ddpm.model.parameters())
    assert torch.equal(out, ref)


def test_auto_precision_is_comfyuis_choice(comfy_models):
    dev = mm.get_torch_device()
    want = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        mm.unet_dtype(device=dev, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32]), "fp32")
    assert host.auto_precision("ddpm") == want
    with torch.inference_mode():
        ddpm = N["LoadDDPM"]().load("64x64_classes.pt", "10", "auto")[0]
    assert ddpm.precision == want
    if dev.type == "cpu":
        assert want == "fp32"


def test_out_of_memory_hook_on_cpu_frees_nothing(comfy_models):
    """On the CPU there is no device memory to free: the hook says so and the batch is split instead."""
    assert host.on_out_of_memory("cpu") is False


def test_loader_downloads_an_official_file_into_comfyuis_folder(comfy_models, tmp_path, monkeypatch):
    """LoadCLIP offers ViT-B-16.pt though absent, and fetches it (local server) into ComfyUI's first
    clip_guidance folder, with its progress on ComfyUI's progress bar."""
    from local_http import official_from, serve
    import comfy.utils
    served, empty = tmp_path / "served", tmp_path / "empty_clip"
    served.mkdir()
    (served / "ViT-B-16.pt").write_bytes((comfy_models / "clip_guidance" / "ViT-B-16.pt").read_bytes())
    saved = folder_paths.folder_names_and_paths["clip_guidance"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "clip_guidance", ([str(empty)], saved[1]))
    folder_paths.filename_list_cache.pop("clip_guidance", None)
    assert host.list_models("clip_guidance") == []
    assert "ViT-B-16.pt" in N["LoadCLIP"].INPUT_TYPES()["required"]["clip_name"][0]
    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        seen.append((value, total)))
    loaders.clear_cache()
    with serve(served) as url:
        official_from(monkeypatch, "clip", served / "ViT-B-16.pt", url)
        with torch.inference_mode():
            clip = N["LoadCLIP"]().load("ViT-B-16.pt", "fp32")[0]
    assert (empty / "ViT-B-16.pt").read_bytes() == (served / "ViT-B-16.pt").read_bytes()
    assert clip.path == str(empty / "ViT-B-16.pt")
    assert seen and seen[-1] == (1000, 1000)
    folder_paths.filename_list_cache.pop("clip_guidance", None)
    loaders.clear_cache()
