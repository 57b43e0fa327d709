"""Smoke run of tests/benchmark_nulltext.py with the tiny models (no timing is asserted). The run needs
ComfyUI: it skips unless ``COMFYUI_PATH`` names a checkout importable by this interpreter."""
import math
import os
from pathlib import Path

import pytest

import benchmark_nulltext as bn  # tests/ is on sys.path (conftest.py)

COMFY = os.environ.get("COMFYUI_PATH", "")
needs_comfy = pytest.mark.skipif(not COMFY or not (Path(COMFY) / "comfy" / "model_base.py").is_file(),
                                 reason="set COMFYUI_PATH to a ComfyUI checkout to run the NULL-text benchmark")


def test_without_comfyui_it_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(SystemExit, match="--comfyui DIR or set COMFYUI_PATH"):
        bn.comfyui_dir(None)
    with pytest.raises(SystemExit, match="not a ComfyUI checkout"):
        bn.comfyui_dir(str(tmp_path))


def test_bad_arguments():
    for argv in (["--size", "100"], ["--steps", "1"], ["--config", "sd14"], ["--device", "cpu", "--clock", "cpu",
                                                                             "--inner-steps", "0"]):
        with pytest.raises(SystemExit):
            bn.parse_args(argv)
    a = bn.parse_args(["--device", "cpu"])
    assert (a.size, a.steps, a.clock, a.inner_steps, a.methods) == (256, 5, "cpu", 10, ["null-text"])
    with pytest.raises(SystemExit, match="use one of"):
        bn.parse_args(["--method", "null-text,npi"])
    a = bn.parse_args(["--device", "cpu", "--config", "tinyxl", "--method", "direct, null-text global",
                       "--method", "negative-prompt", "--method", "direct"])
    assert a.methods == ["direct", "null-text global", "negative-prompt"] and a.size == 64


@needs_comfy
def test_tiny_run(tmp_path):
    """The script as it is run, in its own process (ComfyUI's models and allocations stay out of this one)."""
    import json
    import subprocess
    import sys
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(Path(bn.__file__)), "--comfyui", COMFY, "--config", "tiny",
                           "--device", "cpu", "--steps", "4", "--inner-steps", "2", "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clock: process CPU time" in proc.stdout and "computed from the per-step figures" in proc.stdout
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [r["count"] for r in rows] == [4, 4, sum(res["adam_steps_per_step"]), 4, 4, 2]  # SDEdit t0 0.6: 2 of 4
    assert all(math.isfinite(r["per_step"]) and r["per_step"] > 0 for r in rows)
    assert len(res["adam_steps_per_step"]) == 4 and all(1 <= k <= 2 for k in res["adam_steps_per_step"])
    # UNet batches: inversion 1, optimisation 1, reconstruction CFG 2, prompt-to-prompt 2 images x CFG, SDEdit 2
    assert [r["unet_batch"] for r in rows] == [[1], [1], [1], [2], [4], [2]]
    assert rows[1]["calls"] == 2 * 4 + sum(res["adam_steps_per_step"])
    est = res["estimate"]
    assert est["inversion_no_early_stop_s"] >= est["inversion_s"] * 0.99 > 0 and est["edit_s"] > 0
    again = bn.main(["--from-json", str(out)])  # a saved run printed again (no ComfyUI needed)
    assert again["estimate"] == pytest.approx(est) and again["rows"] == rows


@needs_comfy
def test_tinyxl_every_method(tmp_path, capsys):
    """The SDXL-shaped path (tests/tiny_models.py's tiny SDXL: two text encoders, y) with every method in one
    process; then two saved files merged into one table."""
    import json
    import subprocess
    import sys
    out = tmp_path / "xl.json"
    proc = subprocess.run([sys.executable, str(Path(bn.__file__)), "--comfyui", COMFY, "--config", "tinyxl",
                           "--device", "cpu", "--steps", "3", "--inner-steps", "2", "--threads", "1",
                           "--method", "null-text,null-text global", "--method", "negative-prompt,direct",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "methods compared" in proc.stdout and proc.stdout.count("computed from the per-step figures") == 4
    runs = json.loads(out.read_text())["runs"]
    assert [r["method"] for r in runs] == ["null-text", "null-text global", "negative-prompt", "direct"]
    rows = {r["method"]: {row["key"]: row for row in r["rows"]} for r in runs}
    batches = {m: {k: row["unet_batch"] for k, row in rs.items()} for m, rs in rows.items()}
    assert batches["null-text"] == dict(inversion=[1], method=[1], adam=[1], reconstruction=[2], edit=[4], sdedit=[2])
    assert batches["null-text global"] == batches["null-text"]
    # NPI: nothing optimised, its reconstruction is cond only; Direct: its pass (CFG) is the reconstruction
    assert batches["negative-prompt"] == dict(inversion=[1], reconstruction=[1], edit=[4], sdedit=[2])
    assert batches["direct"] == dict(inversion=[1], method=[2], edit=[4], sdedit=[2])
    assert rows["null-text global"]["method"]["calls"] == 3 * 3 * 2  # 2 passes x 3 steps x (2 calls + 1 with grad)
    assert rows["direct"]["method"]["calls"] == 3 and rows["negative-prompt"]["reconstruction"]["calls"] == 3
    est = {r["method"]: r["estimate"] for r in runs}
    for m in ("negative-prompt", "direct"):
        assert est[m]["inversion_no_early_stop_s"] == est[m]["inversion_s"] > 0
    for m in ("null-text", "null-text global"):  # 10 Adam steps (passes) cost more than the 2 run here
        assert est[m]["inversion_no_early_stop_s"] > est[m]["inversion_s"] > est["direct"]["inversion_s"]
    assert runs[2]["latent_mse"] > runs[3]["latent_mse"]  # Direct Inversion reconstructs exactly
    capsys.readouterr()
    merged = bn.main(["--from-json", str(out), "--from-json", str(out)])
    assert [r["method"] for r in merged["runs"]] == [r["method"] for r in runs] * 2
    for again, saved in zip(merged["runs"][:4], runs):
        assert again["estimate"] == pytest.approx(saved["estimate"]) and again["rows"] == saved["rows"]
    table = capsys.readouterr().out
    assert table.count("| tinyxl, 64² |") == 8


def test_probe_restores_the_pack():
    """The wrapped core functions and SDModel.eps are the pack's own again after a run."""
    import torch
    from blended_diffusion.models import nulltext as nt
    from blended_diffusion.host import sd as host_sd
    before = {n: getattr(nt, n) for n in bn.Probe.STAGED}, host_sd.SDModel.eps
    with pytest.raises(RuntimeError):
        with bn.Probe(nt, host_sd, torch.device("cpu")).installed():
            assert nt.ddim_invert is not before[0]["ddim_invert"] and host_sd.SDModel.eps is not before[1]
            raise RuntimeError("a failed run")
    assert {n: getattr(nt, n) for n in bn.Probe.STAGED} == before[0] and host_sd.SDModel.eps is before[1]
