"""host/sd.py's conditioning and batching on ComfyUI's own SDXL and SD1.5 classes (tiny, random, in-process):
the ε it computes equals ComfyUI's sampler path (CLIPTextEncode's CONDITIONING through process_conds /
calc_cond_batch), and a batch split by the memory estimate gives what one call gives, prompt-to-prompt included.

Skips unless ``COMFYUI_PATH`` names a ComfyUI checkout importable by this interpreter."""
from __future__ import annotations

import pytest
import torch

from comfy_env import load_comfyui  # noqa: E402

load_comfyui("the SD conditioning tests")
pytestmark = pytest.mark.comfyui_host  # the host adapter uses ComfyUI's services here (conftest.py)
import comfy.model_management as mm  # noqa: E402
import comfy.sampler_helpers  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402

import tiny_models  # noqa: E402
from blended_diffusion.host import sd as host_sd  # noqa: E402
from blended_diffusion.models import inversion as ni  # noqa: E402
from blended_diffusion.models import p2p  # noqa: E402
from blended_diffusion.models.cond import Cond  # noqa: E402

def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def xl():
    """tests/tiny_models.py's tiny SDXL with two transformer blocks per attention layer, as in SDXL's own (2 and
    10): prompt-to-prompt must reach every one."""
    with torch.inference_mode():
        return tiny_models.tiny_sdxl(depth=2)[:2]


def free(value):
    """A stand-in for comfy.model_management.get_free_memory reporting ``value`` bytes free."""
    return lambda dev=None, torch_free_too=False: (value, value) if torch_free_too else value


def comfy_denoised(model, clip, text, x_in, sigma):
    """ComfyUI's own path for a CLIPTextEncode conditioning: convert_cond → process_conds (which adds the size
    conditioning from the latent) → calc_cond_batch; the denoised x̂0."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    conds = {"positive": comfy.sampler_helpers.convert_cond([[cond, {"pooled_output": pooled}]])}
    conds = comfy.samplers.process_conds(model.model, x_in, conds, x_in.device, seed=0)
    model.model.current_patcher = model  # as ComfyUI's CFGGuider sets it for a sampling run
    try:
        return comfy.samplers.calc_cond_batch(model.model, [conds["positive"]], x_in, sigma, model.model_options)[0]
    finally:
        model.model.current_patcher = None


def test_sdxl_eps_is_comfyuis_own_sampler_path(xl):
    model, clip = xl
    with torch.inference_mode():
        sd = host_sd.SDModel(model)
        assert sd.family == "SDXL/EPS" and sd.cond_kind == "context+y"
        x = torch.randn(1, 4, 8, 12, generator=_gen(2))  # not square: width and height must not be swapped
        t = torch.tensor([501])
        c = sd.condition(clip, "a photo of a cat", x)
        assert isinstance(c, Cond) and c.context.shape == (1, 77, tiny_models.TINY_SDXL_UNET["context_dim"])
        assert c.y.shape == (1, tiny_models.TINY_SDXL_UNET["adm_in_channels"])
        got = sd.eps(x, t, c)
        sigma = sd.sigmas[t]
        x_in = x * (1 + sigma ** 2).sqrt()
        want = (x_in - comfy_denoised(model, clip, "a photo of a cat", x_in, sigma)) / sigma
        assert torch.allclose(got, want, atol=1e-5)
        # the size conditioning matters: another latent size gives another y and another ε
        other = sd.condition(clip, "a photo of a cat", torch.zeros(1, 4, 12, 8))
        assert torch.equal(other.context, c.context) and not torch.equal(other.y, c.y)
        assert (sd.eps(x, t, other) - got).abs().max() > 1e-4


def test_a_batch_split_by_the_memory_estimate_gives_the_batched_result(xl, monkeypatch):
    model, clip = xl
    with torch.inference_mode():
        sd = host_sd.SDModel(model)
        x = torch.randn(4, 4, 8, 8, generator=_gen(3))
        t = torch.full((4,), 301)
        cond = ni.C.cat([sd.condition(clip, p, x) for p in ("", "a cat", "a dog", "a red car")])
        whole = sd.eps(x, t, cond)
        calls = []
        real = sd._eps
        monkeypatch.setattr(sd, "_eps", lambda *a: calls.append(a[0].shape[0]) or real(*a))
        need = model.model.memory_required([2, 4, 8, 8]) * 1.5
        monkeypatch.setattr(mm, "get_free_memory", free(need * 1.01))  # room for 2 rows, not 3
        assert sd.rows_per_call(x) == 2
        parts = sd.eps(x, t, cond)
        assert calls == [2, 2] and torch.allclose(parts, whole, atol=1e-5)


def test_prompt_to_prompt_split_at_the_cfg_branches_is_the_batched_edit(xl, monkeypatch):
    model, clip = xl
    img = torch.rand(1, 64, 64, 3)
    src, tgt = "a photo of a cat", "a photo of a dog"
    with torch.inference_mode():
        sd = host_sd.SDModel(model)
        z0 = torch.randn(1, 4, 8, 8, generator=_gen(4))
        inv, _ = ni.invert(sd, z0, sd.condition(clip, src, z0), sd.condition(clip, "", z0), prompt=src,
                           source=img, steps=4, guidance=7.5, inner_steps=0, method="negative-prompt")

        def edit():
            ctrl = ni.controller(inv, host_sd.tokenized(clip, src), host_sd.tokenized(clip, tgt), "replace",
                                 blend_words=["cat", "dog"])
            sdp = host_sd.SDModel(model, ctrl)
            return ni.edit(sdp, inv, sdp.condition(clip, tgt, z0), ctrl, 5.0), sdp
        whole, _ = edit()
        # NPI's null is the caption: CFG runs [uncond rows, cond rows] = 4 rows; room for 2 → one branch per call
        need = model.model.memory_required([2, 4, 8, 8]) * 1.5
        monkeypatch.setattr(mm, "get_free_memory", free(need * 1.01))
        assert host_sd.SDModel(model).split(4, 2) == [(0, 2, None), (2, 4, None)]  # no controller: any rows
        split, sdp = edit()
        assert sdp.split(4, 2) == [(0, 2, [1]), (2, 4, [0])]
        assert sdp.split(4, 3) == [(0, 2, [1]), (2, 4, [0])]  # never a part of a [source, edit] group
        assert sdp.split(8, 4) == [(0, 4, [1]), (4, 8, [0])]
        assert torch.allclose(split, whole, atol=1e-5)
        assert (whole[1] - whole[0]).abs().max() > 1e-3  # the edit is not the source


def test_sdxl_tokens_are_checked_on_both_encoders(xl):
    model, clip = xl
    tp = host_sd.tokenized(clip, "a photo of a cat")
    assert tp.words == ("a", "photo", "of", "a", "cat")
    with pytest.raises(ValueError, match="plain prompts"):
        host_sd.tokenized(clip, "a photo of a (cat:1.3)")


def test_other_model_kinds_are_refused_with_the_fix(xl):
    cfg = comfy.supported_models.SDXLRefiner({**tiny_models.TINY_SDXL_UNET, "adm_in_channels": 2560,
                                               "context_dim": 1280})
    cfg.unet_config["num_head_channels"] = 16
    with torch.inference_mode():
        base = cfg.get_model({})
    with pytest.raises(ValueError, match="SD1.5, SD2.1 or SDXL base checkpoint with Load Checkpoint"):
        host_sd.check_sd(base)


@pytest.mark.parametrize("mode, extra", [
    ("replace", {"blend_words": ["cat", "dog"], "windows": {"dog": (0.0, 0.5)}}),
    ("refine", {"cross_replace_steps": 0.6}),
    ("reweight", {"reweight": {"cat": 2.0}}),
])
def test_prompt_to_prompt_reaches_every_sdxl_transformer_block(xl, mode, extra, monkeypatch):
    """Every attention layer of every transformer block (SDXL's blocks hold several) goes through the
    controller, and the source row of the edit is the inversion's reconstruction."""
    model, clip = xl
    src = "a photo of a cat"
    tgt = {"replace": "a photo of a dog", "refine": "a photo of a fluffy cat", "reweight": src}[mode]
    with torch.inference_mode():
        sd = host_sd.SDModel(model)
        z0 = torch.randn(1, 4, 8, 8, generator=_gen(5))
        inv, rec = ni.invert(sd, z0, sd.condition(clip, src, z0), sd.condition(clip, "", z0), prompt=src,
                             source=torch.rand(1, 64, 64, 3), steps=4, guidance=7.5, method="direct")
        ctrl = ni.controller(inv, host_sd.tokenized(clip, src), host_sd.tokenized(clip, tgt), mode, **extra)
        seen = []
        real = p2p.controlled_attention

        def counting(q, k, v, heads, controller, is_cross, *rest):
            seen.append(is_cross)
            return real(q, k, v, heads, controller, is_cross, *rest)
        monkeypatch.setattr(p2p, "controlled_attention", counting)  # what every attention patch calls
        sdp = host_sd.SDModel(model, ctrl)
        out = ni.edit(sdp, inv, sdp.condition(clip, tgt, z0), ctrl, 7.5)
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in model.model.diffusion_model.modules())
    assert blocks == 2 * (3 + 1 + 6)  # two per layer: 3 input levels, the middle, 6 output blocks
    assert seen.count(True) == seen.count(False) == blocks * inv.steps  # one call per layer and step
    assert torch.allclose(out[:1], rec, atol=1e-4)  # direct inversion: the source row is the reconstruction
    if mode != "reweight":
        assert (out[1] - out[0]).abs().max() > 1e-3
