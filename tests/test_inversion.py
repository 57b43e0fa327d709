"""models/inversion.py without a host: invert → file → prompt-to-prompt edit and SDEdit on the tiny eps network of
test_nulltext.py (the NULL-text nodes run the same functions on ComfyUI's models in test_nulltext_nodes.py)."""
from types import SimpleNamespace

import pytest
import torch

from blended_diffusion.models import inversion as ni
from blended_diffusion.models import nulltext as nt
from blended_diffusion.models import p2p
from test_nulltext import TinyEps, contexts, one_thread, tp  # noqa: F401  (one_thread: a fixture)

STEPS = 8


@pytest.fixture(scope="module")
def net():
    return TinyEps()


@pytest.fixture(scope="module")
def model(net):
    return SimpleNamespace(eps=lambda x, t, c: net(x, t, c.expand(x.shape[0], -1, -1)), device=torch.device("cpu"),
                           alphas_cumprod=nt.scaled_linear_alphas_cumprod())


@pytest.fixture(scope="module")
def prompts():
    src, edit = tp(10, 11, 12), tp(10, 13, 12)
    c_src, c_edit = contexts(*([i % 64 for i in p.ids(8)] for p in (src, edit)))
    return src, edit, c_src, c_edit


@pytest.fixture(scope="module")
def inverted(model, prompts):
    _, _, c_src, _ = prompts
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = []
    inv, rec = ni.invert(model, z0, c_src, torch.zeros_like(c_src), prompt="a cat", source=torch.rand(1, 64, 64, 3),
                         steps=STEPS, guidance=7.5, inner_steps=5, callback=lambda i, n, z: steps.append((i, n)))
    return inv, rec, steps


def test_invert_reports_every_stage_and_reconstructs(model, prompts, inverted):
    inv, rec, steps = inverted
    total = ni.invert_steps(STEPS, 5)
    assert steps == [(i, total) for i in range(1, total + 1)] and total == 3 * STEPS
    assert inv.steps == STEPS and len(inv.nulls) == STEPS and len(inv.losses) == STEPS and not inv.is_global
    assert {"latent_mse", "ddim_inversion_s", "null_text_s", "reconstruction_s"} <= set(inv.info)
    plain, _ = ni.invert(model, inv.latents[0], inv.cond, inv.uncond, prompt="a cat", source=inv.source,
                         steps=STEPS, guidance=7.5, inner_steps=0)
    assert plain.is_global and len(plain.step_nulls()) == STEPS
    assert inv.info["latent_mse"] < 0.5 * plain.info["latent_mse"]
    assert inv.report()["final_losses"] == inv.losses and inv.report()["steps"] == STEPS


def test_file_round_trip_and_sdedit(model, prompts, inverted, tmp_path):
    inv, rec, _ = inverted
    inv.to_file(tmp_path / "inv.safetensors")
    again = ni.Inversion.from_file(tmp_path / "inv.safetensors")
    assert again.info == inv.info and again.prompt == inv.prompt
    # SDEdit from z*_N with the caption at the inversion's guidance is the reconstruction
    out = ni.sdedit_run(model, again, inv.cond, 1.0, 7.5, "inversion")
    assert torch.allclose(out, rec, atol=1e-5)
    seen = []
    ni.sdedit_run(model, inv, prompts[3], 0.5, 7.5, "random noise", seed=1, callback=lambda i, n, z: seen.append(n))
    assert seen == [ni.sdedit_steps(inv, 0.5)] * ni.sdedit_steps(inv, 0.5)
    runs = ni.sdedit_runs(model, inv, prompts[3], [0.5, 1.0], 7.5, 0, decode=lambda z: z[:, :3], plain=True)
    assert [(r.method, r.value) for r in runs] == [("SDEdit after NULL-text inversion", 0.5),
                                                   ("SDEdit after NULL-text inversion", 1.0),
                                                   ("plain SDEdit", 0.5), ("plain SDEdit", 1.0)]
    assert runs[1].make().shape == (1, 3, 8, 8)
    other = SimpleNamespace(**{**vars(model), "alphas_cumprod": nt.scaled_linear_alphas_cumprod(beta_end=0.02)})
    with pytest.raises(ValueError, match="noise schedule differs"):
        ni.sdedit_run(other, inv, inv.cond, 0.5)
    with pytest.raises(ValueError, match="start 'x' unknown"):
        ni.sdedit_run(model, inv, inv.cond, 0.5, start="x")


def test_prompt_to_prompt_edit_keeps_the_source_row(net, model, prompts, inverted):
    src, edit, _, c_edit = prompts
    inv, rec, _ = inverted
    ctrl = ni.controller(inv, src, edit, "replace", windows=ni.word_windows("13: 0.5"))
    with p2p.apply_attention_control(net, ctrl):
        out = ni.edit(model, inv, c_edit, ctrl, 7.5)
    assert out.shape == (2, 4, 8, 8)
    assert torch.allclose(out[:1], rec, atol=1e-5) and not torch.allclose(out[1], out[0], atol=1e-3)
    with pytest.raises(ValueError, match="neither prompt"):
        ni.controller(inv, src, edit, blend_words=ni.split_words("tree, house"))
    with pytest.raises(ValueError, match="word: fraction"):
        ni.word_windows("dog 0.4")
