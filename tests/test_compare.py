"""models/compare.py without a host: every inversion method on one latent of the tiny conditional network of
test_nulltext.py (as test_inversion.py's method table), its CSV and render.py's table image (the
CompareInversionMethods node runs the same on ComfyUI's models in test_nulltext_nodes.py)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blended_diffusion.models import compare as cmp
from blended_diffusion.models import inversion as ni
from blended_diffusion.models import nulltext as nt
from blended_diffusion.render import TABLE_ROW, TABLE_TOP, table, table_row_height
from test_nulltext import TinyEps, contexts, one_thread, tp  # noqa: F401  (one_thread: a fixture)

STEPS = 20  # test_inversion.py's METHOD_STEPS: the README's table


@pytest.fixture(scope="module")
def model():
    net = TinyEps()
    return SimpleNamespace(eps=lambda x, t, c: net(x, t, c.expand(x.shape[0], -1, -1)), device=torch.device("cpu"),
                           alphas_cumprod=nt.scaled_linear_alphas_cumprod(), family="tiny")


def decode(z):
    """A stand-in decoder: the first three channels as colours, 8× upsampled (LPIPS needs 32 px or more)."""
    return F.interpolate(torch.sigmoid(z[:, :3].float()), scale_factor=8, mode="nearest")


@pytest.fixture(scope="module")
def case():
    src = tp(10, 11, 12)
    c_src, _ = contexts([i % 64 for i in src.ids(8)], [i % 64 for i in src.ids(8)])
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    source = decode(z0) * 0.9 + 0.05  # the "photo": not exactly what the decoder draws from its latent
    return z0, c_src, torch.zeros_like(c_src), source


@pytest.fixture(scope="module")
def compared(model, case):
    z0, c, u, source = case
    seen = []
    rows, images = cmp.compare(model, z0, c, u, source=source, decode=decode, methods=list(ni.METHODS),
                               prompt="a cat", steps=STEPS, guidance=7.5, inner_steps=10, encode_seconds=0.5,
                               callback=lambda k, n, z: seen.append((k, n)))
    return rows, images, seen


def test_every_method_measured_against_the_vae_ceiling(compared, case):
    rows, images, seen = compared
    by = {r.method: r for r in rows}
    assert list(by) == ["vae", *ni.METHODS]
    assert len(images) == 2 + len(ni.METHODS) and all(x.shape == (1, 3, 64, 64) for x in images)
    source = case[3]
    assert torch.equal(images[0], source) and torch.equal(images[1], decode(case[0]))
    vae = by["vae"]
    assert vae.eps_calls == vae.eps_evaluations == 0 and vae.latent_mse == 0 and vae.psnr_vae_db == math.inf
    assert vae.seconds >= 0.5 and 0 < vae.lpips and math.isfinite(vae.psnr_db)
    # Direct Inversion: the encoded latent exactly, so the VAE's own image and scores
    d = by["direct"]
    assert d.latent_mse < 1e-10 and d.psnr_vae_db > 100
    assert d.psnr_db == pytest.approx(vae.psnr_db, abs=1e-3) and d.lpips == pytest.approx(vae.lpips, abs=1e-5)
    # the others: the bounds test_inversion.py measures, below the ceiling
    assert by["null-text"].latent_mse < 1e-3 and by["null-text global"].latent_mse < 2e-3
    assert by["negative-prompt"].latent_mse < 1.5e-3
    for m in ("null-text", "null-text global", "negative-prompt"):
        assert by[m].latent_mse > d.latent_mse and math.isfinite(by[m].psnr_vae_db), m
    # each row's scores are those of its image
    for r, img in zip(rows[1:], images[2:]):
        lp, ps = cmp.scores(source, img)
        assert (r.lpips, r.psnr_db) == pytest.approx((lp, ps), rel=1e-6)
        assert r.psnr_vae_db == pytest.approx(cmp.psnr_db(img, images[1]), rel=1e-6) or r.psnr_vae_db == math.inf
        assert r.seconds > 0
    # one callback per step of every inversion, counted across methods
    total = cmp.total_steps(list(ni.METHODS), STEPS, 10)
    assert seen == [(k, total) for k in range(1, total + 1)]


def test_counts_are_the_costs_of_the_readme_table(compared):
    """README "Inversion methods": N inversion calls + the method's pass (N = 20 steps, n = 10 Adam steps)."""
    by = {r.method: r for r in compared[0]}
    n = STEPS
    assert (by["negative-prompt"].eps_calls, by["negative-prompt"].eps_evaluations) == (2 * n, 2 * n)  # 40, 40
    assert (by["direct"].eps_calls, by["direct"].eps_evaluations) == (2 * n, 3 * n)  # 40, 60
    assert by["null-text global"].eps_calls == n + 3 * 10 * n + n == 640
    assert by["null-text global"].eps_evaluations == 660  # the reconstruction's CFG batch of 2
    nt_calls = by["null-text"].eps_calls
    assert 4 * n < nt_calls <= n + n * (10 + 2) + n and by["null-text"].eps_evaluations == nt_calls + n


def test_a_raising_callback_stops_the_comparison(model, case):
    z0, c, u, source = case
    calls = []

    class Stop(Exception):
        pass

    def cb(k, total, z):
        calls.append(k)
        if k == 2 * 4 + 1:  # the first step of the second method (4 steps, 2 × 4 each)
            raise Stop

    counted = cmp.Counted(model)
    with pytest.raises(Stop):
        cmp.compare(counted, z0, c, u, source=source, decode=decode, methods=["negative-prompt", "direct"], steps=4,
                    callback=cb)
    assert calls == list(range(1, 10)) and counted.calls == 8 + 1
    assert counted.family == "tiny" and counted.device == model.device  # the model's other attributes pass through


def test_csv_round_trip(compared):
    rows = compared[0]
    text = cmp.csv_text(rows)
    assert text.split("\n")[0] == "method,lpips,psnr_db,seconds,eps_calls,eps_evaluations,latent_mse,psnr_vae_db"
    assert text.split("\n")[1].endswith(",inf")  # the VAE row against itself
    back = cmp.read_csv(text)
    assert [r.method for r in back] == [r.method for r in rows]
    for a, b in zip(back, rows):
        assert (a.eps_calls, a.eps_evaluations) == (b.eps_calls, b.eps_evaluations)
        assert isinstance(a.eps_calls, int)
        for k in ("lpips", "psnr_db", "seconds", "latent_mse", "psnr_vae_db"):
            assert getattr(a, k) == pytest.approx(getattr(b, k), rel=1e-5, abs=1e-12), k
    assert cmp.csv_text(back) == text
    with pytest.raises(ValueError, match="header must be method,lpips"):
        cmp.read_csv("method,parameter,value,lpips,clip_distance\n")
    with pytest.raises(ValueError, match="line 2"):
        cmp.read_csv(text.split("\n")[0] + "\nvae,x,1,1,0,0,0,inf\n")


def test_parse_methods():
    assert cmp.parse_methods(cmp.DEFAULT_METHODS) == list(ni.METHODS)
    assert cmp.parse_methods(" Direct ,null-text   global,") == ["direct", "null-text global"]
    with pytest.raises(ValueError, match="'ddim' is not an inversion method.*null-text, null-text global, "
                                         "negative-prompt, direct"):
        cmp.parse_methods("direct, ddim")
    with pytest.raises(ValueError, match="'direct' is listed twice"):
        cmp.parse_methods("direct, negative-prompt, DIRECT")
    with pytest.raises(ValueError, match="methods is empty"):
        cmp.parse_methods(" , ")


def _row_bands_with_text(im, top, heights):
    """For each row band, whether it holds dark (text) pixels right of the thumbnails."""
    a = np.asarray(im.convert("L"))
    out, y = [], top
    for h in heights:
        out.append(bool((a[y:y + h, 90:] < 100).any()))
        y += h
    return out


def test_table_has_one_line_per_method(compared):
    rows, images, _ = compared
    for thumbs in (False, True):
        im = table(rows, "inversion methods", images[1:] if thumbs else None)
        rh = table_row_height(thumbs)
        assert im.size == (720, TABLE_TOP + TABLE_ROW + len(rows) * rh + 8)
        assert _row_bands_with_text(im, TABLE_TOP, [TABLE_ROW] + [rh] * len(rows)) == [True] * (len(rows) + 1)
    few = table(rows[:3], "two methods")
    assert few.size[1] == TABLE_TOP + TABLE_ROW + 3 * TABLE_ROW + 8
    # the best values are drawn in green: direct's LPIPS / latent MSE row has some, the VAE row none
    a = np.asarray(table(rows, "t"))
    green = (a[..., 1] > 100) & (a[..., 0] < 40) & (a[..., 2] < 40)
    band = [TABLE_TOP + TABLE_ROW + i * TABLE_ROW for i in range(len(rows))]
    assert not green[band[0]:band[0] + TABLE_ROW].any()
    assert green[band[-1]:band[-1] + TABLE_ROW].any()  # direct: the lowest latent MSE
