"""Smoke run of tests/benchmark.py with the tiny configuration (no timing is asserted)."""
import math

import pytest

import benchmark  # tests/ is on sys.path (conftest.py)


THREADS_BEFORE = {}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import torch
    torch.set_num_threads(2)
    THREADS_BEFORE["n"] = torch.get_num_threads()
    return benchmark.main(["--config", "tiny", "--steps", "1", "--warmup", "1", "--views", "2",
                           "--threads", "1", "--clock", "cpu",
                           "--ckpt-dir", str(tmp_path_factory.mktemp("bench_ckpt")),
                           "--json", str(tmp_path_factory.mktemp("bench_out") / "out.json")])


def test_rows_and_columns(tiny_run):
    (res,) = tiny_run
    assert res["config"] == "tiny" and res["batch"] == 1 and res["views"] == 2
    assert [r["mode"] for r in res["rows"]] == list(benchmark.MODES)
    for r in res["rows"]:
        assert set(benchmark.COLUMNS) <= set(r)
    # the checkpoints were written in the real formats and read back through the loaders
    assert res["levers"][0]["seconds"] > 0


def test_numbers_finite_and_positive(tiny_run):
    (res,) = tiny_run
    rows = {r["mode"]: r for r in res["rows"]}
    for mode, r in rows.items():
        for col in ("s_step", "unet_fwd", "peak_mib", "x_bare", "x_reference"):
            assert math.isfinite(r[col]) and r[col] > 0, (mode, col, r[col])
    for mode in ("ours", "reference", "fast"):
        r = rows[mode]
        for col in ("clip_aug", "blend", "s_result"):
            assert math.isfinite(r[col]) and r[col] > 0, (mode, col, r[col])
        assert r["s_result"] == pytest.approx(r["s_step"] * benchmark.RESULT_STEPS / res["batch"])
    assert rows["ours"]["unet_bwd"] > 0 and rows["fast"]["unet_bwd"] == 0  # fast mode: no UNet backward
    assert rows["bare"]["x_bare"] == pytest.approx(1.0)
    assert rows["reference"]["x_reference"] == pytest.approx(1.0)
    assert rows["ours"]["x_bare"] == pytest.approx(rows["ours"]["s_step"] / rows["bare"]["s_step"])
    for lever in res["levers"]:
        assert math.isfinite(lever["seconds"]) and lever["seconds"] > 0, lever
    # every measurement ran warm-up + steps times
    assert all(len(v) == 2 for v in res["raw"].values()), {k: len(v) for k, v in res["raw"].items()}


def test_printed_table(tiny_run):
    (res,) = tiny_run
    text = benchmark.format_table(res)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| mode |"))
    for name in ("s/step", "UNet fwd", "UNet bwd", "CLIP+aug", "blend", "s/result", "peak MiB",
                 "x bare f+b", "x reference"):
        assert name in header
    body = [line for line in lines if line.startswith("| ") and line.split("|")[1].strip() in benchmark.MODES]
    assert len(body) == 4
    assert all(len(line.split("|")) == len(header.split("|")) for line in body)
    assert "guided step / bare UNet fwd+bwd =" in text


def test_bad_arguments():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--config", "huge"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--clock", "cpu", "--device", "cuda"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--view-chunks", "a,b"])
    assert benchmark.parse_args(["--config", "tiny,small", "--view-chunks", "1,4"]).view_chunks == (1, 4)



def test_threads_and_clock_restored(tiny_run):
    """--threads 1 / --clock cpu are for the run only: the rest of the session keeps its settings."""
    import torch
    assert torch.get_num_threads() == THREADS_BEFORE["n"] != 1
    assert benchmark._clock is benchmark.CLOCK["wall"]


def test_proposed_clip_changes_keep_the_embeddings(ckpt_dir):
    """The CLIP change the benchmark can patch on (views split over calls) computes the same embeddings
    and gradients as the engine's CLIP. Its other proposal, sequence-first transformers, is now what
    load_clip does (test_engine.test_clip_formats_agree checks it against a batch-first model)."""
    import torch
    from blended_diffusion.models import load_clip
    ref, split = (load_clip(str(ckpt_dir / "clip_sd.pt")) for _ in range(2))
    assert not ref.model.visual.transformer.resblocks[0].attn.batch_first
    assert benchmark.sequence_first(ref.model) == 0  # nothing left to switch
    benchmark.split_clip_calls(split, 1)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, c in (("ref", ref), ("split", split)):
        xx = x.clone().requires_grad_(True)
        e = c.encode_image(xx)
        (g,) = torch.autograd.grad(e[:, 0].sum(), xx)
        out[name] = (e.detach(), g, c.encode_text("a red ball"))
    for name in ("split",):
        for a, b in zip(out[name], out["ref"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_batch_first_lever_is_the_old_layout(ckpt_dir):
    """The lever row's batch-first copy computes what the sequence-first loader computes."""
    import copy

    import torch
    from blended_diffusion.models import ClipModel, load_clip
    clip = load_clip(str(ckpt_dir / "clip_sd.pt"))
    assert benchmark.clip_transformers(clip.model) and not any(
        tr.batch_first for tr in benchmark.clip_transformers(clip.model))
    old = copy.deepcopy(clip.model)
    assert benchmark.set_batch_first(old, True) == 2
    assert all(b.attn.batch_first for b in old.visual.transformer.resblocks)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ClipModel(old).encode_image(x), clip.encode_image(x), rtol=1e-4, atol=1e-5)
    assert benchmark.sequence_first(old) == 2 and benchmark.sequence_first(old) == 0


def test_keep_freed_memory_reuses_pages():
    """models/memory.py: with glibc's defaults a large freed tensor goes back to the kernel and a new one
    is faulted in page by page; with freed memory kept, the second tensor reuses the first one's pages."""
    import sys

    from pack import load_pack, refault_share
    load_pack()
    from blended_diffusion.models import memory
    if not sys.platform.startswith("linux") or not memory.available():
        pytest.skip("glibc only")
    try:
        assert memory.keep_freed_memory(False)
        assert refault_share() > 0.5
        assert memory.keep_freed_memory(True)
        assert refault_share(256) < 0.1
    finally:
        memory.keep_freed_memory(False)
