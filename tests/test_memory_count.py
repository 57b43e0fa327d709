"""tests/memory_sdxl.py's counters against real tensors: what the meta device counts is what real CPU tensors hold.

Always: on small torch modules, (1) the storages autograd saves for backward, counted with saved_tensors_hooks on
meta tensors, equal those found by walking the real autograd graph (``_saved_*`` of every node, storages by data
pointer); (2) ``LiveBytes``' running count, at every module boundary of a forward (without and with autograd),
equals the bytes of the distinct storages then alive in the real run (every tensor the garbage collector knows
plus the graph's saved tensors, by data pointer), and so does the meta run's.
With ``COMFYUI_PATH``: ComfyUI's own SDXL classes (tests/tiny_models.py's tiny SDXL UNet config) on meta and on
real CPU tensors give the same weights, UNet-call peaks, NULL-text step and prompt-to-prompt counts, and the
counts scale with the batch as they must."""
import copy
import gc
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import memory_sdxl as ms  # tests/ is on sys.path (conftest.py)


class Block(torch.nn.Module):
    """Conv, group norm, SiLU, attention over the pixels with a cross-attention to a context, GELU MLP, layer
    norm: the kinds of layers of a UNet."""

    def __init__(self, c=32, ctx=24):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, c, 3, padding=1)
        self.norm = torch.nn.GroupNorm(8, c)
        self.q = torch.nn.Linear(c, c, bias=False)
        self.k = torch.nn.Linear(ctx, c, bias=False)
        self.v = torch.nn.Linear(ctx, c, bias=False)
        self.ln = torch.nn.LayerNorm(c)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(c, 4 * c), torch.nn.GELU(), torch.nn.Linear(4 * c, c))
        self.out = torch.nn.Conv2d(c, 4, 1)

    def forward(self, x, context):
        h = F.silu(self.norm(self.conv(x)))
        b, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)
        q, k, v = (m.view(b, -1, 2, c // 2).transpose(1, 2) for m in (self.q(t), self.k(context), self.v(context)))
        # one attention kernel on both devices (F.scaled_dot_product_attention picks by device: the CPU's flash
        # kernel for real tensors, the math one, with its attention matrix, for meta ones)
        a = ms.cpu_flash_sdpa(q, k, v).transpose(1, 2).reshape(b, -1, c)
        t = self.ln(t + a)
        t = t + self.mlp(t)
        return self.out(t.transpose(1, 2).reshape(b, c, hh, ww))


def _net(device="cpu"):
    torch.manual_seed(0)
    net = torch.nn.ModuleList([Block(), Block()])
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device) if device != "meta" else copy.deepcopy(net).to("meta")


def _run(net, x, ctx):
    for blk in net:
        x = x + blk(x, ctx)
    return x


def _inputs(device):
    return torch.randn(2, 4, 12, 12, device=device) if device != "meta" else torch.empty(2, 4, 12, 12, device="meta"), \
        (torch.randn(2, 7, 24) if device != "meta" else torch.empty(2, 7, 24, device="meta")).requires_grad_(True)


def _saved_storages(root, exclude: set[int]) -> dict[int, int]:
    """{data pointer: bytes} of the distinct storages the autograd graph under ``root`` saved, less ``exclude``."""
    seen, stack, out = set(), [root], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                val = getattr(node, name)
                for t in val if isinstance(val, (tuple, list)) else [val]:
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in exclude:
                        out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(n for n, _ in node.next_functions)
    return out


def _graph_saved(root, exclude: set[int]) -> int:
    """Bytes of the distinct storages the autograd graph under ``root`` saved (by data pointer), less ``exclude``."""
    return sum(_saved_storages(root, exclude).values())


def test_saved_for_backward_on_meta_is_what_real_autograd_keeps():
    real, meta = _net(), _net("meta")
    x, ctx = _inputs("cpu")
    weights = {p.untyped_storage().data_ptr() for p in real.parameters()}
    with ms.SavedBytes(exclude=list(real.parameters())) as sb_real:
        y = _run(real, x, ctx).square().mean()
    from_graph = _graph_saved(y.grad_fn, weights | {x.untyped_storage().data_ptr()})
    xm, cm = _inputs("meta")
    with ms.SavedBytes(exclude=list(meta.parameters())) as sb_meta:
        _run(meta, xm, cm).square().mean()
    assert from_graph > 0
    assert sb_real.saved == from_graph  # the hooks see what the graph holds
    assert sb_meta.saved == sb_real.saved  # and meta tensors save the same storages
    # the weights are saved too (the input's gradient needs them), counted apart: they are the model's own memory
    assert sb_meta.saved_excluded == sb_real.saved_excluded > 0


def _alive(before: set[int], roots=()) -> int:
    """Bytes of the distinct storages alive now (every tensor the garbage collector tracks, plus those saved in
    the autograd graphs of ``roots``) that did not exist in ``before``. With the collector paused since
    ``before``, every tensor made since is in its youngest generation."""
    out = {}
    for o in gc.get_objects(generation=0):
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            p = o.untyped_storage().data_ptr()
            if p and p not in before:
                out[p] = o.untyped_storage().nbytes()
    for r in roots:
        out.update(_saved_storages(r, before))
    return sum(out.values())


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_live_bytes_at_every_module_boundary_are_the_real_storages(grad):
    gc.collect()
    real, meta = _net(), _net("meta")
    x, ctx = _inputs("cpu")
    xm, cm = _inputs("meta")
    outputs = []

    def sampler(counter, store, real_run, before):
        def hook(mod, inp, out):
            outputs.append(out)  # keeps the outputs alive, the same in both runs
            fn = out.grad_fn
            store.append((counter.current, _alive(before, [fn] if fn is not None else []) if real_run else None))
        return hook

    results = {}
    for name, net, args in (("real", real, (x, ctx)), ("meta", meta, (xm, cm))):
        outputs.clear()
        store = []
        gc.collect()
        before = {o.untyped_storage().data_ptr() for o in gc.get_objects() if isinstance(o, torch.Tensor)
                  and o.device.type == "cpu"}
        gc.disable()  # new objects stay in generation 0 (a cheap scan)
        try:
            with ms.LiveBytes() as lb:
                hooks = [m.register_forward_hook(sampler(lb, store, name == "real", before))
                         for m in net.modules() if not list(m.children())]
                try:
                    with torch.set_grad_enabled(grad):
                        _run(net, *args)
                finally:
                    for h in hooks:
                        h.remove()
        finally:
            gc.enable()
        results[name] = store
    real_counts = [c for c, _ in results["real"]]
    real_alive = [a for _, a in results["real"]]
    meta_counts = [c for c, _ in results["meta"]]
    assert len(real_counts) == 2 * 10 and min(real_alive) > 0
    assert real_counts == real_alive  # the counter = what is really alive, at every boundary
    assert meta_counts == real_counts  # and meta tensors count the same


def test_live_bytes_peak_and_release():
    with ms.LiveBytes() as lb:
        a = torch.empty(1000, device="meta")           # 4000 bytes
        b = a.view(10, 100)                             # a view: no new storage
        c = torch.empty(500, dtype=torch.float16, device="meta")  # 1000 bytes
        assert lb.current == 5000 and lb.peak == 5000
        del a
        assert lb.current == 5000                       # b keeps the storage
        del b
        assert lb.current == 1000
        d = c.float()                                   # 2000 bytes
        assert lb.peak == 5000 and lb.current == 3000
        del c, d
    assert lb.current == 0 and lb.created == 7000


# ---------------------------------------------------------------- ComfyUI's SDXL classes
COMFY = os.environ.get("COMFYUI_PATH", "")
needs_comfy = pytest.mark.skipif(not COMFY or not (Path(COMFY) / "comfy" / "model_base.py").is_file(),
                                 reason="set COMFYUI_PATH to a ComfyUI checkout to count ComfyUI's SDXL")


@pytest.fixture(scope="module")
def tiny_xl():
    from comfy_env import load_comfyui
    load_comfyui("the SDXL memory counts")
    import tiny_models
    cfg = dict(tiny_models.TINY_SDXL_UNET, num_head_channels=tiny_models.HEAD_CHANNELS)
    real = ms.sdxl_unet_meta(torch.float32, cfg, device="cpu")
    meta = ms.sdxl_unet_meta(torch.float32, cfg, device="meta")
    return real, meta


@needs_comfy
def test_tiny_sdxl_counts_on_meta_equal_real(tiny_xl):
    real, meta = tiny_xl
    assert ms.module_bytes(meta.diffusion_model) == ms.module_bytes(real.diffusion_model) > 0
    k = ms.cpu_flash_sdpa  # runs on both devices
    r, m = ms.count_unet_call(real, 2, 8, kernel=k), ms.count_unet_call(meta, 2, 8, kernel=k)
    assert m["peak"] == r["peak"] > 0 and m["left"] == r["left"] == 0
    r, m = ms.count_nulltext_step(real, 8, kernel=k), ms.count_nulltext_step(meta, 8, kernel=k)
    assert m["saved"] == r["saved"] > 0 and r["after_forward"] >= r["saved"]  # saved storages live after forward
    # one storage differs: the CPU gives the 0-d loss of mse_loss a 1 KiB storage, meta 4 bytes
    assert 0 <= r["peak"] - m["peak"] <= 1020 and 0 <= r["after_forward"] - m["after_forward"] <= 1020
    r, m = ms.count_p2p_step(real, 8, kernel=k), ms.count_p2p_step(meta, 8, kernel=k)
    assert m["peak"] == r["peak"] and m["kept"] == r["kept"] > 0 and m["blend_layers"] == r["blend_layers"] >= 1


@needs_comfy
def test_tiny_sdxl_counts_are_consistent(tiny_xl):
    _, meta = tiny_xl
    calls = {b: ms.count_unet_call(meta, b, 16)["peak"] for b in (1, 2, 4)}
    # activations grow with the batch, at most linearly (a batch holds b rows of every activation)
    assert calls[1] < calls[2] <= 2 * calls[1] and calls[2] < calls[4] <= 2 * calls[2]
    step = ms.count_nulltext_step(meta, 16)
    assert step["saved"] > calls[1] and step["peak"] >= step["saved"]  # autograd keeps far more than a call
    p2p = ms.count_p2p_step(meta, 16)
    assert p2p["peak"] > calls[4]  # the patch's explicit probabilities come on top of the plain batch of 4
    est = ms.comfy_estimate(meta, [4, 4, 16, 16])
    assert est == pytest.approx(4 * ms.comfy_estimate(meta, [1, 4, 16, 16]))


@needs_comfy
def test_nulltext_reserves_room_for_the_backward(monkeypatch, tmp_path):
    """Before NULL-text's Adam steps the UNet is loaded again with ``memory_required`` = the bytes its backward
    keeps (ComfyUI then offloads other models from a GPU first: its ``free_memory`` of ``memory_required`` plus
    its reserve; on the CPU, where this runs, ComfyUI frees nothing), for the optimising methods only."""
    from comfy_env import load_comfyui
    load_comfyui("the NULL-text memory reservation")
    import comfy.model_management as mm
    import tiny_models
    from blended_diffusion.host import sd as host_sd
    with torch.inference_mode():
        model, clip, vae = tiny_models.tiny_sdxl()
    sd = host_sd.SDModel(model, grad=True)
    z = torch.zeros(1, 4, 128, 128)
    assert sd.grad_memory(z) == 421_000 * 128 * 128 * 4 // 2  # the tiny model computes in float32 (4 bytes)
    assert sd.grad_memory(z[..., :64, :64]) == sd.grad_memory(z) // 4
    asked = []
    real_load = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, memory_required=0, **kw:
                        asked.append((models, memory_required)) or real_load(models, memory_required=memory_required,
                                                                             **kw))
    image = torch.rand(1, 64, 64, 3)
    host_sd.invert_image(sd, clip, vae, image, "a cat", steps=2, inner_steps=1)
    need = sd.grad_memory(torch.zeros(1, 4, 8, 8))
    assert [m for m, r in asked if r == need] == [[sd.patcher]] and need > 0
    assert any(m.model is sd.patcher for m in mm.current_loaded_models)  # still loaded after the call
    asked.clear()
    host_sd.invert_image(sd, clip, vae, image, "a cat", steps=2, method="direct")  # nothing optimised
    assert asked and all(r != need for _, r in asked)  # the VAE and the text encoders ask for their own
    # the method comparison asks too, once, when one of its methods optimises
    from blended_diffusion.nodes import NODE_CLASS_MAPPINGS
    import folder_paths
    compare = NODE_CLASS_MAPPINGS["CompareInversionMethods"]()
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))  # its table and CSV, whichever services
    monkeypatch.setenv("BLENDED_DIFFUSION_OUTPUT", str(tmp_path))         # the host adapter uses here
    for methods, reserved in (("direct, null-text", 1), ("direct, negative-prompt", 0)):
        asked.clear()
        with torch.inference_mode():
            compare.compare(model, clip, vae, image, "a cat", methods=methods, steps=2, inner_steps=1,
                            filename_prefix="compare")
        assert len([r for _, r in asked if r == need]) == reserved, (methods, asked)


@needs_comfy
def test_the_memory_host_sd_asks_for_is_the_count(tiny_xl):
    """host/sd.py's GRAD_BYTES_PER_PIXEL are this count (SDXL base and SD1.5 at 512², both linear in the pixels:
    within 2 % at another size)."""
    from blended_diffusion.host.sd import GRAD_BYTES_PER_PIXEL
    assert ms.grad_bytes_per_pixel(ms.sdxl_unet_meta(), 64) == pytest.approx(GRAD_BYTES_PER_PIXEL["SDXL"], rel=0.02)
    assert ms.grad_bytes_per_pixel(ms.sd15_unet_meta(), 64) == pytest.approx(GRAD_BYTES_PER_PIXEL["SD15"], rel=0.002)
