"""edit()'s start state (issue 12): start="noise" | "fixed" | "ddim_inversion" chosen inside the engine,
the progress total the engine announces, the Schedule object, and the guidance loss as a list of terms."""
import dataclasses

import pytest
import torch

from blended_diffusion.models import Guide, edit, load_ddpm
from blended_diffusion.models import guidance as gd
from blended_diffusion.models.ddpm import Schedule, ddim_move
from blended_diffusion.models.edit import pixel_x_start, run_steps, start_noise
from blended_diffusion.models.region import crop, plan_box

KW = dict(skip_timesteps=7, batch_size=2, ddim=True, blend=False, enforce_background=False, class_label=3)


@pytest.fixture(scope="module")
def small(ckpt_dir):
    return load_ddpm(str(ckpt_dir / "64x64_classes.pt"), respacing="10")


def test_fixed_start_is_q_sample_of_the_seeded_noise(small, image_and_mask):
    image, mask = image_and_mask
    fixed = edit(small, image, mask, Guide(), start="fixed", noise_seed=9, **KW)
    box = plan_box(mask[0], small.image_size, 0.25)
    source = crop(image, box, small.image_size) * 2 - 1
    x_k = small.q_sample(source, 2, start_noise(small.image_size, 9))
    assert torch.equal(fixed, edit(small, image, mask, Guide(), x_start=x_k, **KW))
    assert torch.equal(fixed[0], fixed[1])  # same x_k, DDIM, unguided: the same result
    other = edit(small, image, mask, Guide(), start="fixed", noise_seed=10, **KW)
    assert not torch.equal(fixed, other)


def test_ddim_inversion_start_equals_the_explicit_inversion(small, image_and_mask):
    image, mask = image_and_mask
    seen = []
    inside = edit(small, image, mask, Guide(), start="ddim_inversion", callback=lambda d, t, x: seen.append((d, t)),
                  **KW)
    explicit = edit(small, image, mask, Guide(), x_start=pixel_x_start(small, image, mask, 7, batch_size=2,
                                                                        class_label=3), **KW)
    assert torch.equal(inside, explicit)
    total = run_steps(small, 1, 7, 2, start="ddim_inversion")
    assert total == 3 + 3 and seen == [(d, total) for d in range(1, total + 1)]  # inversion + one batch


def test_progress_total_counts_every_batch_and_image(small, image_and_mask):
    image, mask = image_and_mask
    seen = []
    edit(small, image.expand(2, -1, -1, -1), mask, Guide(), max_batch=1, callback=lambda d, t, x: seen.append((d, t)),
         **KW)
    total = run_steps(small, 2, 7, 2, max_batch=1)
    assert total == 2 * 2 * 3 and seen == [(d, total) for d in range(1, total + 1)]


def test_start_errors_name_the_fix(small, image_and_mask):
    image, mask = image_and_mask
    with pytest.raises(ValueError, match="start = 'random': use one of noise, fixed, ddim_inversion"):
        edit(small, image, mask, Guide(), start="random", **KW)
    with pytest.raises(ValueError, match="either x_start or start"):
        edit(small, image, mask, Guide(), start="fixed", x_start=torch.zeros(2, 3, 64, 64), **KW)
    with pytest.raises(ValueError, match=r"x_start must be \[1 or batch_size=2, 3, 64, 64\]"):
        edit(small, image, mask, Guide(), x_start=torch.zeros(3, 3, 64, 64), **KW)
    with pytest.raises(ValueError, match="class_label"):
        edit(small, image, mask, Guide(), start="ddim_inversion", **{**KW, "class_label": None})


def test_schedule_is_named_tensors_with_the_guided_diffusion_math(small):
    s = small.schedule
    assert isinstance(s, Schedule) and len(s.tensors()) == len(dataclasses.fields(Schedule))
    d = small.diffusion
    x0, noise = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = torch.tensor([5])
    assert torch.allclose(s.q_sample(x0, 5, noise), d.q_sample(x0, t, noise=noise), atol=1e-6)
    assert torch.equal(s.q_sample(x0, -1, noise), x0)
    assert torch.allclose(s.pred_xstart(noise, 5, x0), d._predict_xstart_from_eps(noise, t, x0), atol=1e-5)
    with torch.inference_mode():  # as a host that moved the model in inference mode leaves them
        frozen = Schedule(*[v.clone() for v in s.tensors()])
    assert all(v.is_inference() for v in frozen.tensors()) and not any(v.is_inference() for v in s.to("cpu").tensors())
    assert not any(v.is_inference() for v in frozen.thaw().tensors())
    # the one DDIM formula: float levels and tensor levels agree, and a move and its reverse cancel
    x, e = torch.randn(2, 3), torch.randn(2, 3)
    there = ddim_move(x, e, 0.9, 0.3)
    assert torch.allclose(there, ddim_move(x, e, torch.tensor(0.9), torch.tensor(0.3)), atol=1e-6)
    assert torch.allclose(ddim_move(there, e, 0.3, 0.9), x, atol=1e-5)


def test_a_loss_term_is_one_entry(monkeypatch):
    """The README's recipe: a new loss is a Guide field and one LossTerm; guidance_loss adds λ · its batch
    sum, and CLIPGuidedStep shows its widget after 'fast' (saved workflows keep their widget positions)."""
    import blended_diffusion.nodes.sampling as sampling

    @dataclasses.dataclass
    class TVGuide(Guide):
        tv_lambda: float = 0.0

    tv = gd.LossTerm("tv_lambda", lambda i: (i.x0[..., 1:] - i.x0[..., :-1]).abs().mean((1, 2, 3)),
                     (0.0, 100.0, 1.0, "total variation of x̂0 (a test term)"))
    x0, x = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    source, mask, fac = torch.zeros(2, 3, 8, 8), torch.ones(1, 1, 8, 8), torch.tensor(0.5)
    assert not TVGuide(tv_lambda=3.0).active
    monkeypatch.setattr(gd, "LOSS_TERMS", (*gd.LOSS_TERMS, tv))
    guide = TVGuide(tv_lambda=3.0)
    assert guide.active and not TVGuide().active
    want = (x0[..., 1:] - x0[..., :-1]).abs().mean((1, 2, 3)).sum() * 3.0
    assert torch.allclose(gd.guidance_loss(guide, x0, x, fac, source, mask, None), want)
    assert gd.guidance_loss(TVGuide(), x0, x, fac, source, mask, None) == 0
    monkeypatch.setattr(sampling, "LOSS_TERMS", gd.LOSS_TERMS)
    names = list(sampling.CLIPGuidedStep.INPUT_TYPES()["required"])
    assert names[2:] == ["clip_lambda", "range_lambda", "lpips_lambda", "l2_lambda", "fast", "tv_lambda"]
    with pytest.raises(TypeError, match="no input"):
        sampling.CLIPGuidedStep().step(None, "", cfg_lambda=1.0)
