"""NULL-text inversion and prompt-to-prompt control (models/nulltext.py, models/p2p.py) with a tiny
conditional eps-network defined here: a conv + self-attention + cross-attention block on [B, 4, 8, 8]
latents, added to the exact denoiser of N(0, I) data (eps = sqrt(1 − ᾱ_t)·x), so that DDIM behaves
like it does with a trained model. Runs single-threaded (tiny ops are slower with 2 threads under load)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blended_diffusion.models import nulltext as nt
from blended_diffusion.models.ddpm import ddim_invert_pixel, thaw
from blended_diffusion.models.edit import pixel_x_start
from blended_diffusion.models import p2p

L, D = 8, 16  # context tokens, context width


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Attn(nn.Module):
    """LDM-style attention (to_q/to_k/to_v/to_out/heads); cross-attention when given a context."""

    def __init__(self, dim, ctx_dim=None, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        ctx = x if context is None else context
        b, n, d = x.shape
        q, k, v = (t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class TinyEps(nn.Module):
    def __init__(self, r=0.3, dim=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Conv2d(4, dim, 3, padding=1)
        self.temb = nn.Linear(16, dim)
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attn(dim)
        self.attn2 = Attn(dim, D)
        self.out = nn.Conv2d(dim, 4, 3, padding=1)
        self.register_buffer("s", (1 - nt.scaled_linear_alphas_cumprod()).sqrt().float())
        self.r = r
        self.eval().requires_grad_(False)

    def forward(self, x, t, context):
        f = torch.exp(-math.log(1000) * torch.arange(8) / 8)
        a = t.float()[:, None] * f
        h = self.inp(x) + self.temb(torch.cat([a.sin(), a.cos()], 1))[:, :, None, None]
        b, c, hh, ww = h.shape
        s = h.flatten(2).transpose(1, 2)
        s = s + self.attn1(self.n1(s))
        s = s + self.attn2(self.n2(s), context)
        res = self.out(F.silu(s.transpose(1, 2).reshape(b, c, hh, ww)))
        return self.s[t].view(-1, 1, 1, 1) * x + self.r * res


@pytest.fixture(scope="module")
def net():
    return TinyEps()


@pytest.fixture(scope="module")
def eps(net):
    return lambda x, t, c: net(x, t, c.expand(x.shape[0], -1, -1))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, L, D, generator=g) * 0.5
    uncond = torch.randn(1, L, D, generator=g) * 0.5
    return z0, cond, uncond


@pytest.fixture(scope="module")
def inverted(eps, data):
    z0, cond, _ = data
    schedule = nt.DDIMSchedule(20)
    return schedule, nt.ddim_invert(eps, schedule, z0, cond)


def mse(a, b):
    return (a - b).pow(2).mean().item()


# ------------------------------------------------------------------------------------------ schedule
def test_schedule_matches_diffusers_ddim_convention():
    s = nt.DDIMSchedule(50)
    assert s.timesteps[:3] == [1, 21, 41] and s.timesteps[-1] == 981
    ac = nt.scaled_linear_alphas_cumprod()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(ac, torch.cumprod(1 - betas, 0))
    assert s.levels[0] == pytest.approx(float(ac[0]))  # set_alpha_to_one=False
    assert s.levels[-1] == pytest.approx(float(ac[981]))
    assert abs(float(ac[-1]) - 0.0047) < 1e-4  # SD1: ᾱ_999 ≈ 0.0047
    with pytest.raises(ValueError, match="DDIM steps"):
        nt.DDIMSchedule(0)


def test_ddim_step_is_invertible_for_a_fixed_eps():
    g = torch.Generator().manual_seed(3)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    y = nt.ddim_step(x, e, 0.9, 0.3)
    assert torch.allclose(nt.ddim_step(y, e, 0.3, 0.9), x, atol=1e-5)


# ------------------------------------------------------------------------------------------ inversion
def test_inversion_then_sampling_reconstructs_at_guidance_1(eps, data, inverted):
    z0, cond, uncond = data
    schedule, lat = inverted
    assert len(lat) == 21 and torch.equal(lat[0], z0)
    assert 0.8 < lat[-1].std().item() < 1.3  # z*_T looks like noise
    rec = nt.ddim_sample_cfg(eps, schedule, lat[-1], cond, uncond, guidance=1.0)
    assert mse(rec, z0) < 2e-3  # measured 5.9e-4 (z0 has unit variance)
    # guidance 1 ignores the null embedding entirely
    assert torch.equal(rec, nt.ddim_sample_cfg(eps, schedule, lat[-1], cond, uncond * 0, guidance=1.0))


def test_null_text_restores_reconstruction_at_guidance_7_5(eps, data, inverted):
    z0, cond, uncond = data
    schedule, lat = inverted
    plain = mse(nt.ddim_sample_cfg(eps, schedule, lat[-1], cond, uncond, 7.5), z0)
    at_1 = mse(nt.ddim_sample_cfg(eps, schedule, lat[-1], cond, uncond, 1.0), z0)
    losses, calls = [], []
    nulls = nt.null_text_optimize(eps, schedule, lat, cond, uncond, guidance=7.5, losses=losses,
                                  callback=lambda i, n, z: calls.append((i, n, z.shape)))
    assert len(nulls) == 20 and all(u.shape == (1, L, D) for u in nulls)
    assert calls == [(i, 20, (1, 4, 8, 8)) for i in range(1, 21)]
    assert not torch.equal(nulls[0], uncond) and not torch.equal(nulls[0], nulls[-1])
    rec = mse(nt.ddim_sample_cfg(eps, schedule, lat[-1], cond, nulls, 7.5), z0)
    assert plain > 10 * at_1       # measured 0.045 vs 5.9e-4: plain CFG reconstruction is bad
    assert rec < 1e-3              # measured 3.9e-4: NULL-text brings it back ...
    assert rec < 1.5 * at_1        # ... to the guidance-1 level
    assert max(losses) < 1e-3


def test_global_null_text_converges_more_slowly(eps, data, inverted):
    z0, cond, uncond = data
    schedule, lat = inverted
    nulls = nt.null_text_optimize(eps, schedule, lat, cond, uncond, inner_steps=10)
    calls = []
    glob = nt.null_text_optimize_global(eps, schedule, lat, cond, uncond, epochs=10,
                                        callback=lambda i, n, z: calls.append(i))
    assert glob.shape == (1, L, D) and calls == list(range(1, 201))
    per_step = mse(nt.ddim_sample_cfg(eps, schedule, lat[-1], cond, nulls, 7.5), z0)
    single = mse(nt.ddim_sample_cfg(eps, schedule, lat[-1], cond, glob, 7.5), z0)
    plain = mse(nt.ddim_sample_cfg(eps, schedule, lat[-1], cond, uncond, 7.5), z0)
    # same budget of 10 gradient steps per sampling step: measured 7.9e-3 vs 3.9e-4 (plain 0.045)
    assert per_step * 2 < single < plain


def test_gradients_work_inside_inference_mode_and_are_deterministic(eps, data):
    z0, cond, uncond = data
    schedule = nt.DDIMSchedule(5)
    lat = nt.ddim_invert(eps, schedule, z0, cond)
    ref = nt.null_text_optimize(eps, schedule, lat, cond, uncond, inner_steps=3)
    with torch.inference_mode():
        zi, ci, ui = z0.clone(), cond.clone(), uncond.clone()
        assert zi.is_inference()
        lat_i = nt.ddim_invert(eps, schedule, zi, ci)
        got = nt.null_text_optimize(eps, schedule, lat_i, ci, ui, inner_steps=3)
        glob = nt.null_text_optimize_global(eps, schedule, lat_i, ci, ui, epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert not torch.equal(glob, uncond)
    again = nt.null_text_optimize(eps, schedule, nt.ddim_invert(eps, schedule, z0, cond), cond, uncond,
                                  inner_steps=3)
    assert all(torch.equal(a, b) for a, b in zip(ref, again))


def test_inference_weights_give_a_clear_error(data):
    z0, cond, uncond = data
    schedule = nt.DDIMSchedule(3)
    with torch.inference_mode():
        frozen = TinyEps()  # parameters created in inference mode, as a host may leave them
        f = lambda x, t, c: frozen(x, t, c.expand(x.shape[0], -1, -1))  # noqa: E731
        lat = nt.ddim_invert(f, schedule, z0, cond)
        with pytest.raises(RuntimeError, match="inference tensors"):
            nt.null_text_optimize(f, schedule, lat, cond, uncond, inner_steps=1)
        thaw(frozen)  # the remedy the error names
        assert len(nt.null_text_optimize(f, schedule, lat, cond, uncond, inner_steps=1)) == 3


def test_callback_can_cancel_and_inputs_are_checked(eps, data, inverted):
    z0, cond, uncond = data
    schedule, lat = inverted

    def cancel(i, n, z):
        if i == 2:
            raise InterruptedError("cancelled")
    with pytest.raises(InterruptedError):
        nt.null_text_optimize(eps, schedule, lat, cond, uncond, inner_steps=1, callback=cancel)
    with pytest.raises(ValueError, match="whole"):
        nt.null_text_optimize(eps, schedule, lat[1:], cond, uncond)
    with pytest.raises(ValueError, match="one image at a time"):
        nt.null_text_optimize(eps, schedule, [z.expand(2, -1, -1, -1) for z in lat], cond, uncond)
    with pytest.raises(ValueError, match="same number of steps"):
        nt.ddim_sample_cfg(eps, schedule, lat[-1], cond, [uncond] * 5, 7.5)


def test_sdedit_with_inversion_keeps_the_image(eps, data, inverted):
    z0, cond, uncond = data
    schedule, lat = inverted
    nulls = nt.null_text_optimize(eps, schedule, lat, cond, uncond, inner_steps=5)
    assert nt.sdedit_start_step(schedule, 1.0) == 0 and nt.sdedit_start_step(schedule, 0.5) == 10
    full = nt.sdedit(eps, schedule, z0, cond, nulls, 1.0, start_latent=lat[-1])
    assert torch.equal(full, nt.ddim_sample_cfg(eps, schedule, lat[-1], cond, nulls, 7.5))
    g = torch.Generator().manual_seed(5)
    plain = nt.sdedit(eps, schedule, z0, cond, uncond, 0.5, generator=g)
    inverted_start = nt.sdedit(eps, schedule, z0, cond, nulls, 0.5, start_latent=lat[10])
    assert mse(inverted_start, z0) * 100 < mse(plain, z0)  # measured 2.2e-4 vs 0.79
    g = torch.Generator().manual_seed(5)
    assert torch.equal(plain, nt.sdedit(eps, schedule, z0, cond, uncond, 0.5, generator=g))


# ------------------------------------------------------------------------------------------ tokens
def test_tokenize_with_the_bundled_clip_bpe():
    p = p2p.tokenize("a photo of a cat")
    ids = p.ids()
    assert len(ids) == 77 and ids[0] == p2p.SOT and ids[6] == p2p.EOT and ids[-1] == p2p.EOT
    assert p.positions("cat") == [5] and p.positions("a") == [1, 4] and p.positions(1) == [2]
    with pytest.raises(ValueError, match="not in the prompt"):
        p.positions("dog")
    with pytest.raises(ValueError, match="at most 75"):
        p2p.tokenize("cat " * 80).ids()


def tp(*words):
    """A prompt whose word i has the token ids given (ints or tuples)."""
    toks = [w if isinstance(w, tuple) else (w,) for w in words]
    return p2p.TokenizedPrompt.from_tokens(["_".join(map(str, t)) for t in toks], toks)


def test_replace_mapper():
    m = p2p.replace_mapper(tp(10, 11, 12), tp(10, 13, 12), max_len=8)
    assert torch.equal(m, torch.eye(8))  # equal token counts: token to token
    m = p2p.replace_mapper(tp(10, 11, 12), tp(10, (13, 14), 12), max_len=8)
    # word 1 (position 2) → positions 2, 3 at 1/2 each; then everything shifts by one
    assert m[2, 2] == m[2, 3] == 0.5 and m[3, 4] == 1 and m[4, 5] == 1 and m[0, 0] == 1
    assert torch.allclose(m[:7].sum(1), torch.ones(7))  # attention mass preserved
    with pytest.raises(ValueError, match="same number of words"):
        p2p.replace_mapper(tp(10, 11), tp(10, 11, 12))


def test_refine_mapper():
    index, alpha = p2p.refine_mapper(tp(10, 11), tp(10, 20, 11), max_len=8)
    # target: [SOT, 10, 20, 11, EOT, pad…]; source: [SOT, 10, 11, EOT, pad…]
    assert alpha.tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
    assert index[[0, 1, 3, 4]].tolist() == [0, 1, 2, 3] and index[5:].tolist() == [4, 5, 6]
    assert p2p.align([1, 2, 3], [1, 9, 2, 3]) == [0, -1, 1, 2]


def test_token_scale():
    s = p2p.token_scale(tp(10, 11, 12), {1: 2.0, "12": 0.5}, max_len=8)
    assert s.tolist() == [1, 1, 2, 0.5, 1, 1, 1, 1]


# ------------------------------------------------------------------------------------------ control
def probs(b, h=2, n_q=16, n_k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n_q, n_k, generator=g).softmax(-1)


def test_controller_edits_only_the_edit_rows_of_cond_chunks():
    mapper = p2p.replace_mapper(tp(10, 11, 12), tp(10, (13, 14), 12), max_len=8)
    c = p2p.AttentionControl(mapper=mapper, cross_replace_steps=0.5, self_replace_steps=0.25)
    a = probs(4)  # [uncond src, uncond edit, cond src, cond edit]
    c.begin_step(0, 10, cond_or_uncond=[1, 0])
    out = c(a, True, "x")
    assert torch.equal(out[:3], a[:3])
    assert torch.allclose(out[3], torch.einsum("hqs,st->hqt", a[2], mapper))
    assert torch.allclose(out[3, ..., 2], a[2, ..., 2] / 2) and torch.allclose(out[3, ..., 4], a[2, ..., 3])
    s = c(a, False, "x")
    assert torch.equal(s[3], a[2]) and torch.equal(s[:3], a[:3])
    c.begin_step(3, 10, cond_or_uncond=[1, 0])  # past the self window (0.25·10), inside cross (5)
    assert torch.equal(c(a, False, "x"), a) and not torch.equal(c(a, True, "x"), a)
    c.begin_step(5, 10, cond_or_uncond=[1, 0])
    assert torch.equal(c(a, True, "x"), a)
    c.edit_uncond = True
    c.begin_step(0, 10, cond_or_uncond=[1, 0])
    assert torch.equal(c(a, False, "x")[1], a[0])
    c2 = p2p.AttentionControl(self_replace_steps=1.0, self_max_tokens=8)
    c2.begin_step(0, 10)
    assert torch.equal(c2(a, False, "x"), a)  # 16 queries > self_max_tokens
    with pytest.raises(ValueError, match="not a multiple"):
        c2(probs(3), False, "x")
    with pytest.raises(ValueError, match="max_len=9"):
        c.begin_step(0, 10)
        c(probs(2, n_k=9), True, "x")


def test_refine_and_reweight():
    index, alpha = p2p.refine_mapper(tp(10, 11), tp(10, 20, 11), max_len=8)
    scale = p2p.token_scale(tp(10, 20, 11), {"11": 3.0}, max_len=8)
    c = p2p.AttentionControl(refine=(index, alpha), scale=scale, cross_replace_steps=1.0)
    a = probs(2)
    c.begin_step(0, 4)
    out = c(a, True, "x")
    assert torch.equal(out[0], a[0])
    assert torch.allclose(out[1, ..., 2], a[1, ..., 2])        # the added word keeps its own map
    assert torch.allclose(out[1, ..., 3], 3 * a[0, ..., 2])    # "11" moved from 2 to 3 and ×3
    assert torch.allclose(out[1, ..., 1], a[0, ..., 1])
    rw = p2p.prompt_to_prompt(tp(10, 11), [tp(10, 11)], "reweight", reweight={"11": 0.0},
                              cross_replace_steps=1.0, max_len=8)
    rw.begin_step(0, 4)
    out = rw(a, True, "x")
    assert torch.equal(out[1, ..., 2], torch.zeros_like(out[1, ..., 2]))
    assert torch.allclose(out[1, ..., 1], a[0, ..., 1])
    with pytest.raises(ValueError, match="must equal"):
        p2p.prompt_to_prompt(tp(10, 11), [tp(10, 12)], "reweight", max_len=8)


def test_per_word_cross_attention_windows():
    # the reference's cross_replace_steps={"default_": 1.0, word: 0.5}: the swapped word "13" (position 2)
    # takes the source's map for the first half of the steps only, then its own; other tokens all along
    src, edit = tp(10, 11, 12), tp(10, 13, 12)
    c = p2p.prompt_to_prompt(src, [edit], "replace", cross_replace_steps={"default_": 1.0, "13": 0.5},
                             self_replace_steps=0.0, max_len=8)
    a = probs(2)
    c.begin_step(1, 10)
    early = c(a, True, "x")
    c.begin_step(7, 10)
    late = c(a, True, "x")
    assert torch.equal(early[0], a[0]) and torch.equal(late[0], a[0])
    assert torch.allclose(early[1], a[0])                        # all tokens: the source's maps
    assert torch.equal(late[1, ..., 2], a[1, ..., 2])             # the word's own map once its window ends
    keep = [i for i in range(8) if i != 2]
    assert torch.allclose(late[1][..., keep], a[0][..., keep])    # the others still the source's
    # a word with a window while the default is off: only it is injected, and only inside its window
    c = p2p.prompt_to_prompt(src, [edit], "replace", cross_replace_steps={"default_": 0.0, "13": (0.2, 0.4)},
                             max_len=8)
    c.begin_step(0, 10)
    assert not c.wants(True, 16) and torch.equal(c(a, True, "x"), a)
    c.begin_step(3, 10)
    out = c(a, True, "x")
    assert c.wants(True, 16) and torch.allclose(out[1, ..., 2], a[0, ..., 2])
    assert torch.equal(out[1][..., keep], a[1][..., keep])
    with pytest.raises(ValueError, match="not words of the edit prompt"):
        p2p.prompt_to_prompt(src, [edit], "replace", cross_replace_steps={"99": 0.5}, max_len=8)


def test_local_blend_keeps_the_source_outside_the_word_region():
    # the word (position 1) attends to the left half of a 4x4 grid in the source, top half in the edit
    lb = p2p.LocalBlend([[1], [1]], threshold=0.3, start=0.0)
    c = p2p.AttentionControl(cross_replace_steps=0.0, self_replace_steps=0.0, local_blend=lb)
    a = torch.full((2, 1, 16, 8), 1 / 8)
    left = torch.zeros(4, 4)
    left[:, :1] = 1
    top = torch.zeros(4, 4)
    top[:1] = 1
    a[0, 0, :, 1] = left.flatten()
    a[1, 0, :, 1] = top.flatten()
    x = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    c.reset()
    c.begin_step(0, 10, cond_or_uncond=[0], latent_shape=(8, 8))
    assert c.wants(True, 16) and not c.wants(False, 16)
    c(a, True, "x")
    y = c.end_step(x)
    assert torch.equal(y[0], x[0])
    mask = lb.mask[0, 0]
    # max-pooled 3×3 on the 4×4 grid then resized ×2: left two and top two 8-px bands (thr 0.3)
    expect = torch.zeros(8, 8)
    expect[:, :4] = 1
    expect[:4] = 1
    assert torch.equal(mask, expect) and torch.equal(y[1, 0], expect)


# ------------------------------------------------------------------------------------------ hooks
def contexts(ids_src, ids_edit):
    g = torch.Generator().manual_seed(7)
    table = torch.randn(64, D, generator=g) * 0.5
    return table[torch.tensor(ids_src)][None], table[torch.tensor(ids_edit)][None]


def test_token_swap_with_full_injection_keeps_unswapped_maps(net, eps):
    src, edit = tp(10, 11, 12), tp(10, 13, 12)
    ids = lambda p: [i % 64 for i in p.ids(L)]  # noqa: E731
    c_src, c_edit = contexts(ids(src), ids(edit))
    ctrl = p2p.prompt_to_prompt(src, [edit], "replace", cross_replace_steps=1.0, self_replace_steps=1.0,
                                max_len=L)
    seen = []

    def record(attn, is_cross, place, cond_or_uncond=None):
        out = ctrl(attn, is_cross, place)
        seen.append((is_cross, place, out))
        return out

    schedule = nt.DDIMSchedule(4)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).expand(2, -1, -1, -1)
    null = torch.zeros(1, L, D)
    before = nt.ddim_sample_cfg(eps, schedule, z[:1], c_src, null, 7.5)
    with p2p.apply_attention_control(net, record):
        out = nt.ddim_sample_cfg(eps, schedule, z, torch.cat([c_src, c_edit]), null, 7.5, controller=ctrl)
    assert len(seen) == 4 * 2 and {p for _, p, _ in seen} == {"attn1", "attn2"}
    for is_cross, _, a in seen:  # a: [uncond src, uncond edit, cond src, cond edit]
        if is_cross:
            keep = [t for t in range(L) if t != 2]
            assert torch.equal(a[3][..., keep], a[2][..., keep])   # unswapped tokens: identical
            assert torch.equal(a[3][..., 2], a[2][..., 2])          # swapped token: the source's map
        else:
            assert torch.equal(a[3], a[2])
    assert torch.allclose(out[:1], before, atol=1e-5)  # the source row is not disturbed
    assert not torch.allclose(out[1], out[0], atol=1e-3)  # the swapped word's values still act
    # hooks removed: plain forward again, and without injection the maps differ
    assert "forward" not in net.attn2.__dict__
    seen.clear()
    free = p2p.AttentionControl(cross_replace_steps=0.0, self_replace_steps=0.0)
    with p2p.apply_attention_control(net, lambda a, c, p: seen.append(a) or free(a, c, p)):
        nt.ddim_sample_cfg(eps, schedule, z, torch.cat([c_src, c_edit]), null, 1.0, controller=free)
    assert not torch.allclose(seen[1][1], seen[1][0], atol=1e-4)  # attn2, [src, edit]


def test_comfy_style_replace_patch_matches_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(4, n, 2 * 8, generator=g) for n in (16, 8, 8))
    opts = {"n_heads": 2, "block": ("input", 1), "cond_or_uncond": [1, 0]}
    free = p2p.AttentionControl(cross_replace_steps=0.0, self_replace_steps=0.0)
    free.begin_step(0, 10)
    ref = F.scaled_dot_product_attention(*(t.view(4, -1, 2, 8).transpose(1, 2) for t in (q, k, v)))
    ref = ref.transpose(1, 2).reshape(4, 16, 16)
    assert torch.allclose(p2p.attention_patch(free, True)(q, k, v, opts), ref, atol=1e-5)
    full = p2p.AttentionControl(cross_replace_steps=1.0)
    full.begin_step(0, 10)
    out = p2p.attention_patch(full, True)(q, k, v, opts)
    assert torch.allclose(out[:3], ref[:3], atol=1e-5)
    base = (q[2].view(16, 2, 8).transpose(0, 1) @ k[2].view(8, 2, 8).permute(1, 2, 0) / 8 ** 0.5).softmax(-1)
    expect = (base @ v[3].view(8, 2, 8).transpose(0, 1)).transpose(0, 1).reshape(16, 16)
    assert torch.allclose(out[3], expect, atol=1e-5)  # the cond edit row: source maps, its own values
    assert ("middle", 0) in p2p.comfy_block_keys() and ("output", 11) in p2p.comfy_block_keys()


def test_apply_attention_control_needs_attention_modules():
    with pytest.raises(ValueError, match="no attention modules"):
        p2p.apply_attention_control(nn.Linear(2, 2), lambda a, c, p: a)


# ------------------------------------------------------------------------------------------ pixel DDPM
def test_pixel_ddim_inversion_is_a_deterministic_start(ddpm):
    from blended_diffusion.models import Guide, blended_diffusion, generators
    assert ddpm.num_steps == 10
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    src = torch.stack([xx, yy, xx * yy])[None] * 0.8
    k = 3  # = skip_timesteps 7
    x_k = ddim_invert_pixel(ddpm, src, k)
    assert x_k.shape == src.shape
    mask = torch.ones(1, 1, 256, 256)
    run = lambda start: blended_diffusion(ddpm, src, mask, Guide(), k, generators(0, 0, 1), ddim=True,  # noqa: E731
                                          blend=False, enforce_background=False, x_start=start)
    inverted, noised = mse(run(x_k), src), mse(run(None), src)
    # the tiny random UNet is no denoiser, so the reconstruction is not exact: measured 0.012 from
    # the inverted start versus 0.40 from q_sample (and 0.037 vs 0.66 with k = 4)
    assert inverted * 10 < noised
    with pytest.raises(ValueError, match="1..10"):
        ddim_invert_pixel(ddpm, src, 11)


def test_pixel_inversion_inverts_ddim_sampling_exactly_for_a_fixed_eps(ddpm):
    """With an eps that ignores x, inverting and sampling (the engine's ddim_step) are exact inverses."""
    from blended_diffusion.models.blended import ddim_step
    from blended_diffusion.models.ddpm import DDPM
    e = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))

    class FixedEps:
        schedule, num_steps, device = ddpm.schedule, ddpm.num_steps, torch.device("cpu")
        pred_xstart = DDPM.pred_xstart

        def eps_and_var(self, x, i, y=None):
            return e * (1 + 0.1 * i), None  # depends on the step, not on x

    model = FixedEps()
    x0 = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    x = ddim_invert_pixel(model, x0, 10)
    for i in reversed(range(10)):
        x = ddim_step(model, x, i, model.eps_and_var(x, i)[0], None)
    assert torch.allclose(x, x0, atol=1e-3)  # float32 rounding through 1/sqrt(ᾱ) ≈ 160


def test_pixel_x_start_feeds_edit(ckpt_dir, image_and_mask):
    from blended_diffusion.models import Guide, edit, load_ddpm
    ddpm = load_ddpm(str(ckpt_dir / "64x64_classes.pt"), respacing="10")
    image, mask = image_and_mask
    x_start = pixel_x_start(ddpm, image, mask, 7, batch_size=2, class_label=3)
    assert x_start.shape == (2, 3, 64, 64)
    kw = dict(skip_timesteps=7, batch_size=2, ddim=True, blend=False, enforce_background=False, class_label=3)
    inverted = edit(ddpm, image, mask, Guide(), x_start=x_start, **kw)
    noised = edit(ddpm, image, mask, Guide(), **kw)
    inside = mask.bool()[:, None].expand(2, 3, -1, -1)
    err = lambda r: (r - image)[inside].pow(2).mean().item()  # noqa: E731
    assert torch.equal(inverted[0], inverted[1])  # deterministic start, no noise with DDIM
    assert err(inverted) * 10 < err(noised)        # measured 4.2e-4 vs 0.025 (0..1 pixels)
    with pytest.raises(ValueError, match="class_label"):
        pixel_x_start(ddpm, image, mask, 7)
