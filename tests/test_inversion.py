"""models/inversion.py without a host: invert → file → prompt-to-prompt edit and SDEdit on the tiny eps network of
test_nulltext.py (the NULL-text nodes run the same functions on ComfyUI's models in test_nulltext_nodes.py)."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from blended_diffusion.models import inversion as ni
from blended_diffusion.models import nulltext as nt
from blended_diffusion.models import p2p
from blended_diffusion.models.cond import Cond
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


# --------------------------------------------------------------------------------------------- methods (issue 14)
METHOD_STEPS = 20


class Counted:
    """The tiny model with its eps calls counted: ``calls`` (UNet invocations) and ``rows`` (latents evaluated)."""

    def __init__(self, model):
        self.device, self.alphas_cumprod, self._eps = model.device, model.alphas_cumprod, model.eps
        self.calls = self.rows = 0

    def eps(self, x, t, c):
        self.calls += 1
        self.rows += x.shape[0]
        return self._eps(x, t, c)


@pytest.fixture(scope="module")
def by_method(model, prompts):
    """Every method at guidance 7.5, 20 steps, 10 inner steps: {method: (inversion, reconstruction, calls, rows)},
    plus the plain DDIM inversion (no optimisation, empty prompt) as "ddim"."""
    _, _, c_src, _ = prompts
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for m in ni.METHODS + ("ddim",):
        cm = Counted(model)
        inv, rec = ni.invert(cm, z0, c_src, torch.zeros_like(c_src), prompt="a cat", source=torch.rand(1, 8, 8, 3),
                             steps=METHOD_STEPS, guidance=7.5, inner_steps=0 if m == "ddim" else 10,
                             method="null-text" if m == "ddim" else m)
        out[m] = (inv, rec, cm.calls, cm.rows)
    lines = [f"{'method':18} {'eps calls':>9} {'latents':>8} {'latent MSE':>11}"]
    lines += [f"{m:18} {c:9d} {r:8d} {inv.info['latent_mse']:11.3g}" for m, (inv, _, c, r) in out.items()]
    print("\n" + "\n".join(lines))  # the README's table (pytest -s shows it)
    return out


def test_each_method_reconstructs_at_guidance_7_5_and_costs_what_it_should(by_method):
    n = METHOD_STEPS
    err = {m: v[0].info["latent_mse"] for m, v in by_method.items()}
    # measured (20 steps, z0 of unit variance): ddim 1.2e-2, null-text 3.3e-4, null-text global 8.9e-4,
    # negative-prompt 6.2e-4, direct 0
    assert err["direct"] < 1e-10
    assert err["null-text"] < 1e-3 and err["null-text global"] < 2e-3 and err["negative-prompt"] < 1.5e-3
    for m in ("null-text", "null-text global", "negative-prompt"):
        assert err[m] < 0.5 * err["ddim"], m
    calls = {m: v[2] for m, v in by_method.items()}
    # DDIM inversion (N calls) + the method's pass; NPI's and direct's are one guided step per sampling step
    assert calls["negative-prompt"] == calls["direct"] == calls["ddim"] == 2 * n
    assert 2 * n + 2 * n < calls["null-text"] <= n + n * (10 + 2) + n
    assert calls["null-text global"] == n + 10 * n * 3 + n  # per step of each epoch: e_c, e_u (grad), e_u
    assert calls["null-text"] > 5 * calls["negative-prompt"]
    rows = {m: v[3] for m, v in by_method.items()}  # NPI's guided step is its conditional one: one latent a call
    assert rows["negative-prompt"] == 2 * n and rows["direct"] == rows["ddim"] == n + 2 * n
    inv = by_method["null-text"][0]
    assert inv.info["not_converged_steps"] == sum(l >= nt.early_stop_threshold(i) for i, l in enumerate(inv.losses))
    assert by_method["direct"][0].method == "direct" and len(by_method["direct"][0].corrections) == n
    npi = by_method["negative-prompt"][0]
    assert len(npi.nulls) == 1 and torch.equal(npi.nulls[0], npi.cond)


def test_direct_inversion_edits_keep_the_source_exactly(net, model, prompts, by_method, tmp_path):
    src, edit, _, c_edit = prompts
    inv = by_method["direct"][0]
    inv.to_file(tmp_path / "direct.safetensors")
    inv = ni.Inversion.from_file(tmp_path / "direct.safetensors")
    assert inv.method == "direct" and len(inv.corrections) == METHOD_STEPS
    # SDEdit from z*_N with the caption is the reconstruction: exact
    out = ni.sdedit_run(model, inv, inv.cond, 1.0, 7.5, "inversion")
    assert torch.allclose(out, inv.latents[0], atol=1e-5)
    ctrl = ni.controller(inv, src, edit, "replace")
    with p2p.apply_attention_control(net, ctrl):
        both = ni.edit(model, inv, c_edit, ctrl, 7.5)
    assert torch.allclose(both[:1], inv.latents[0], atol=1e-5)  # the source row stays on the trajectory
    assert not torch.allclose(both[1], both[0], atol=1e-3)
    runs = ni.sdedit_runs(model, inv, c_edit, [0.5], 7.5, 0, decode=lambda z: z[:, :3], plain=False)
    assert [r.method for r in runs] == ["SDEdit after direct inversion"]


def test_negative_prompt_inversion_edits_with_the_caption_as_null(model, prompts, by_method, tmp_path):
    inv, rec, _, _ = by_method["negative-prompt"]
    inv.to_file(tmp_path / "npi.safetensors")
    again = ni.Inversion.from_file(tmp_path / "npi.safetensors")
    assert again.method == "negative-prompt" and again.corrections == [] and again.report()["method"] == \
        "negative-prompt"
    out = ni.sdedit_run(model, again, again.cond, 1.0, 7.5, "inversion")
    assert torch.allclose(out, rec, atol=1e-5)
    # the caption as the null embedding: guided sampling of the caption is its conditional prediction
    guided_1 = nt.ddim_sample_cfg(model.eps, again.schedule(), again.latents[-1], again.cond, again.uncond, 1.0)
    assert torch.allclose(out, guided_1, atol=1e-5)


def test_method_choice_errors_and_old_files(model, prompts, inverted, tmp_path):
    with pytest.raises(ValueError, match="global_null applies to NULL-text only"):
        ni.resolve_method("direct", global_null=True)
    with pytest.raises(ValueError, match="method 'fast' unknown"):
        ni.resolve_method("fast")
    assert ni.resolve_method("null-text", True) == "null-text global"
    assert ni.invert_steps(8, 5, method="direct") == ni.invert_steps(8, 5, method="negative-prompt") == 16
    assert ni.invert_steps(8, 5, True) == ni.invert_steps(8, 5, method="null-text global") == 8 + 40 + 8
    # a version-1 file (before methods) still loads, as NULL-text
    from safetensors import safe_open
    from safetensors.torch import save_file
    inv = inverted[0]
    inv.to_file(tmp_path / "v2.safetensors")
    with safe_open(str(tmp_path / "v2.safetensors"), framework="pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    old = {k: v for k, v in meta.items() if k != "method"}
    save_file(t, str(tmp_path / "v1.safetensors"), metadata={**old, "version": "1"})
    v1 = ni.Inversion.from_file(tmp_path / "v1.safetensors")
    assert v1.method == "null-text" and v1.corrections == [] and torch.equal(torch.cat(v1.nulls), torch.cat(inv.nulls))
    save_file(t, str(tmp_path / "bad.safetensors"), metadata={**meta, "method": "direct"})
    with pytest.raises(ValueError, match="do not fit a 8-step direct inversion"):
        ni.Inversion.from_file(tmp_path / "bad.safetensors")
    save_file(t, str(tmp_path / "v9.safetensors"), metadata={**meta, "version": "9"})
    with pytest.raises(ValueError, match="format version '9'"):
        ni.Inversion.from_file(tmp_path / "v9.safetensors")


def test_null_text_optimises_in_fp32_under_a_half_precision_model_and_reports_non_convergence(net, model, prompts,
                                                                                                caplog):
    _, _, c_src, _ = prompts
    seen = set()

    def eps(x, t, c):  # the network computes in bfloat16 (as a half-precision host model would)
        seen.add((x.dtype, c.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t, c.expand(x.shape[0], -1, -1))
        return out.to(x.dtype)

    bf = SimpleNamespace(eps=eps, device=model.device, alphas_cumprod=model.alphas_cumprod)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a cat", source=torch.rand(1, 8, 8, 3), steps=STEPS, guidance=7.5)
    with caplog.at_level("WARNING", logger="blended_diffusion.models.inversion"):
        inv, _ = ni.invert(bf, z0.half(), c_src.half(), torch.zeros_like(c_src).half(), inner_steps=1, **kw)
    plain, _ = ni.invert(bf, z0, c_src, torch.zeros_like(c_src), inner_steps=0, **kw)
    assert seen == {(torch.float32, torch.float32)}  # latents and embeddings reach eps in float32
    assert all(n.dtype == torch.float32 for n in inv.nulls) and all(math.isfinite(x) for x in inv.losses)
    assert inv.info["latent_mse"] < plain.info["latent_mse"]
    # one Adam step per DDIM step cannot reach the early-stop threshold: counted, logged, in the report
    assert inv.info["not_converged_steps"] == STEPS and inv.info["not_converged_at"] == list(range(STEPS))
    assert "did not converge at 8 of 8 steps" in inv.report()["convergence"]
    assert any("did not converge" in r.message for r in caplog.records)


def test_an_inversion_is_refused_by_a_model_of_another_family(model, prompts, tmp_path):
    _, _, c_src, c_edit = prompts
    sd15 = SimpleNamespace(**vars(model), family="SD15/EPS", cond_kind="context")
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inv, rec = ni.invert(sd15, z0, c_src, torch.zeros_like(c_src), prompt="a cat", source=torch.rand(1, 8, 8, 3),
                         steps=4, guidance=7.5, method="direct")
    assert (inv.family, inv.cond_kind) == ("SD15/EPS", "context") and inv.report()["family"] == "SD15/EPS"
    inv.to_file(tmp_path / "sd15.safetensors")
    again = ni.Inversion.from_file(tmp_path / "sd15.safetensors")
    assert (again.family, again.cond_kind) == ("SD15/EPS", "context")
    assert torch.allclose(ni.sdedit_run(sd15, again, c_src, 1.0), rec, atol=1e-5)
    for other, what in ((dict(family="SDXL/EPS", cond_kind="context+pooled"), "model family is SDXL/EPS"),
                        (dict(family="SD15/EPS", cond_kind="context+pooled"), "conditioning is context\\+pooled"),
                        (dict(family="SD20/V_PREDICTION", cond_kind="context"), "SD20/V_PREDICTION")):
        m = SimpleNamespace(**vars(model), **other)
        with pytest.raises(ValueError, match=f"made with a SD15/EPS model \\(context conditioning\\).*{what}"):
            ni.sdedit_run(m, again, c_src, 0.5)
        with pytest.raises(ValueError, match="made with a SD15/EPS model"):
            ni.edit(m, again, c_edit, ni.controller(again, prompts[0], prompts[1]))
    # a model (or file) that does not say is not checked: the tiny model here, and files from before version 2
    assert ni.sdedit_run(model, again, c_src, 0.5).shape == (1, 4, 8, 8)


# --------------------------------------------------------------------------------------------- full conditioning
class TinyEpsY(torch.nn.Module):
    """TinyEps plus an SDXL-like vector input: y [B, A] shifts the features (as SDXL's label embedding does)."""

    def __init__(self, net, a=12):
        super().__init__()
        self.net = net
        g = torch.Generator().manual_seed(3)
        self.proj = torch.randn(a, 4, generator=g) * 0.5

    def forward(self, x, t, c):
        assert isinstance(c, Cond) and c.y is not None, "the core must hand a Cond through to eps"
        b = x.shape[0]
        return self.net(x, t, c.context.expand(b, -1, -1)) + 0.3 * (c.y.expand(b, -1) @ self.proj)[:, :, None, None]


@pytest.fixture(scope="module")
def with_y(net, prompts):
    _, _, c_src, c_edit = prompts
    g = torch.Generator().manual_seed(4)
    y_src, y_null, y_edit = (torch.randn(1, 12, generator=g) for _ in range(3))
    net_y = TinyEpsY(net)
    model = SimpleNamespace(eps=net_y, device=torch.device("cpu"), alphas_cumprod=nt.scaled_linear_alphas_cumprod(),
                            family="TinyXL/EPS", cond_kind="context+y")
    return model, Cond(c_src, y_src), Cond(torch.zeros_like(c_src), y_null), Cond(c_edit, y_edit)


@pytest.mark.parametrize("method", ni.METHODS)
def test_every_method_takes_the_full_conditioning_and_keeps_y(with_y, prompts, method, tmp_path):
    model, cond, uncond, cond_edit = with_y
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inv, rec = ni.invert(model, z0, cond, uncond, prompt="a cat", source=torch.rand(1, 64, 64, 3), steps=STEPS,
                         guidance=7.5, inner_steps=3, method=method)
    # the null embeddings keep the vector they were made with: the caption's for NPI, else the empty prompt's
    y_null = cond.y if method == "negative-prompt" else uncond.y
    assert all(isinstance(n, Cond) and torch.equal(n.y, y_null) for n in inv.nulls)
    if method == "direct":
        assert inv.info["latent_mse"] < 1e-10
    # y changes the prediction: the same inversion sampled with another y of the nulls is another image
    other = [Cond(n.context, n.y + 1) for n in inv.step_nulls()]
    moved = nt.ddim_sample_cfg(model.eps, inv.schedule(), inv.latents[-1], cond, other, 7.5,
                               corrections=inv.step_corrections())
    assert (moved - rec).abs().max() > 1e-3
    # the file keeps y (format 3) and the reloaded inversion edits like the original
    inv.to_file(tmp_path / "xl.safetensors")
    again = ni.Inversion.from_file(tmp_path / "xl.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "xl.safetensors"), framework="pt") as f:
        assert f.metadata()["version"] == ni.Y_VERSION and {"cond_y", "uncond_y", "nulls_y"} <= set(f.keys())
    assert torch.equal(again.cond.y, cond.y) and torch.equal(again.uncond.y, uncond.y)
    assert all(torch.equal(a.y, b.y) and torch.equal(a.context, b.context) for a, b in zip(again.nulls, inv.nulls))
    out = ni.sdedit_run(model, again, cond, 1.0, 7.5, "inversion")
    assert torch.allclose(out, rec, atol=1e-5)
    ctrl = ni.controller(again, tp(10, 11, 12), tp(10, 13, 12), "replace")
    both = ni.edit(model, again, cond_edit, ctrl, 7.5)
    assert both.shape[0] == 2 and torch.allclose(both[:1], rec, atol=1e-4)


def test_a_context_only_inversion_is_refused_by_a_model_with_y(with_y, model, prompts, inverted, tmp_path):
    xl = with_y[0]
    inv = dataclasses.replace(inverted[0], family="SD15/EPS", cond_kind="context")
    with pytest.raises(ValueError, match="SD15/EPS model .context conditioning.*TinyXL/EPS"):
        ni.sdedit_run(xl, inv, with_y[1], 0.5)
    with pytest.raises(ValueError, match="with and without a pooled/size vector"):
        nt.ddim_sample_cfg(xl.eps, inv.schedule(), inv.latents[-1], with_y[1], inv.uncond, 7.5)
