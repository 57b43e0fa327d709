"""Image and mask files as real users have them (issue 11, points 5 and 8): every mode is read at its real
values by the command line (cli.load_image / cli.load_mask) and by the standalone runner's LoadImage, which
share models/imageio.py. Each file is written here and the loaded values are compared with the source's."""
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from blended_diffusion import cli
from blended_diffusion.models import imageio
from blended_diffusion.cli import runner

H, W = 24, 32
TOL = 1 / 255 + 1e-6


def ramp16(mean8: float = 142) -> np.ndarray:
    """A 16-bit gray ramp whose mean is ``mean8``/255 of full scale (values over most of the 16-bit range)."""
    yy, xx = np.mgrid[0:H, 0:W]
    r = (xx / (W - 1) * 0.6 + yy / (H - 1) * 0.4)  # 0..1
    r = r - r.mean() + mean8 / 255
    return np.clip(np.round(r * 65535), 0, 65535).astype(np.uint16)


def colours() -> np.ndarray:
    """An 8-bit RGB image of flat patches (lossy formats keep them)."""
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:12, :16], rgb[:12, 16:], rgb[12:, :16], rgb[12:, 16:] = (200, 30, 90), (10, 240, 60), (0, 0, 0), (255, 255, 255)
    return rgb


def png16(path, arr: np.ndarray):
    """A 16-bit-per-channel RGB or RGBA PNG, written by hand (Pillow has no 16-bit RGB mode to save)."""
    h, w, c = arr.shape
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def both_readers(path):
    """(CLI image [3, H, W], runner IMAGE as [3, H, W], runner MASK [H, W] or [64, 64])."""
    ours = cli.load_image(path)[0]
    loader = runner.StandaloneLoadImage()
    loader.input_dir = path.parent
    img, mask = loader.load_image(path.name)
    return ours, img[0].permute(2, 0, 1), mask[0]


def assert_gray(t: torch.Tensor, expect: np.ndarray, tol=1e-6):
    assert t.shape == (3, *expect.shape) and t.dtype == torch.float32
    for c in range(3):
        assert np.abs(t[c].numpy() - expect).max() <= tol


# --- point 5: modes ---------------------------------------------------------------------------------------
def test_16_bit_gray_png_keeps_its_values(tmp_path):
    """The reported file: a 16-bit gray PNG (Pillow's I;16) came out almost white (mean 254 for 142)."""
    a = ramp16(142)
    path = tmp_path / "gray16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode == "I;16"
    for t in both_readers(path)[:2]:
        assert abs(float(t.mean()) - 142 / 255) <= 1 / 255
        assert_gray(t, a / 65535)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_gray_byte_orders(tmp_path, mode):
    a = ramp16(90)
    im = Image.frombuffer(mode, (W, H), a.astype(">u2" if mode == "I;16B" else "<u2").tobytes(), "raw", mode, 0, 1)
    assert_gray(torch.from_numpy(imageio.rgb_array(im)).permute(2, 0, 1), a / 65535)
    if mode != "I;16L":  # Pillow writes I;16 and I;16B TIFFs (and reads them back in the same mode)
        im.save(tmp_path / "g.tif")
        assert Image.open(tmp_path / "g.tif").mode == mode
        assert_gray(cli.load_image(tmp_path / "g.tif")[0], a / 65535)


def test_32_bit_integer_and_float_files(tmp_path, caplog):
    """'I' within 0..65535 is 16-bit data (how Pillow holds many 16-bit files): /65535; 'F' within 0..1 as is;
    values beyond those ranges are scaled from their own min..max, with a warning naming the file."""
    a = ramp16(100)
    Image.fromarray(a.astype(np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert_gray(cli.load_image(tmp_path / "i32.tif")[0], a / 65535)
    f = (a / 65535).astype(np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert_gray(cli.load_image(tmp_path / "f.tif")[0], f)
    assert "scaled" not in caplog.text
    for name, arr in (("big.tif", a.astype(np.int32) * 40 - 7000), ("hdr.tif", f * 1000 - 3)):
        Image.fromarray(arr).save(tmp_path / name)
        with caplog.at_level(logging.WARNING):
            got = cli.load_image(tmp_path / name)[0]
        span = (arr - arr.min()) / (arr.max() - arr.min())
        assert_gray(got, span, tol=1e-5)
        assert f"{tmp_path / name}" in caplog.text and "scaled from that range" in caplog.text


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_rgb_and_rgba_png(tmp_path, channels):
    """Pillow reads 16-bit colour PNGs as 8-bit RGB(A): right to within one 8-bit step."""
    g = np.random.default_rng(0)
    a = g.integers(0, 65536, (H, W, channels)).astype(np.uint16)
    path = png16(tmp_path / "rgb16.png", a)
    ours, node, mask = both_readers(path)
    for t in (ours, node):
        assert np.abs(t.permute(1, 2, 0).numpy() - a[..., :3] / 65535).max() <= TOL
    if channels == 4:
        assert np.abs((1 - mask).numpy() - a[..., 3] / 65535).max() <= TOL


def test_palette_with_and_without_transparency(tmp_path):
    rgb = colours()
    pal = Image.fromarray(rgb).quantize(4)
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    ours, node, mask = both_readers(tmp_path / "p.png")
    for t in (ours, node):
        assert np.array_equal((t.permute(1, 2, 0).numpy() * 255).round(), rgb)
    assert mask.shape == (64, 64) and not mask.any()  # no transparency: core's empty 64x64 mask
    white = int(np.asarray(pal)[-1, -1])  # the palette index of the white patch is transparent
    pal.save(tmp_path / "pt.png", transparency=white)
    pal.save(tmp_path / "pt.gif", transparency=white)
    for name in ("pt.png", "pt.gif"):
        ours, node, mask = both_readers(tmp_path / name)
        assert np.array_equal((ours.permute(1, 2, 0).numpy() * 255).round(), rgb), name
        white_area = (rgb == 255).all(-1)
        assert np.array_equal(mask.numpy() == 1, white_area) and np.array_equal(mask.numpy() == 0, ~white_area)
        assert np.array_equal(cli.load_mask(tmp_path / name, (H, W))[0].numpy() > 0, white_area)


def test_gray_alpha_cmyk_and_one_bit(tmp_path):
    rgb = colours()
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = np.full((H, W), 255, np.uint8)
    alpha[5:9, 3:20] = 0
    Image.fromarray(np.stack([gray, alpha], -1), "LA").save(tmp_path / "la.png")
    ours, node, mask = both_readers(tmp_path / "la.png")
    for t in (ours, node):
        assert_gray(t, gray / 255)
    assert np.array_equal(mask.numpy(), 1 - alpha / 255)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    for name, tol in (("c.tif", 1e-6), ("c.jpg", 3 / 255)):
        cmyk.save(tmp_path / name, **({"quality": 95} if name.endswith("jpg") else {}))
        assert Image.open(tmp_path / name).mode == "CMYK"
        for t in both_readers(tmp_path / name)[:2]:
            assert np.abs(t.permute(1, 2, 0).numpy() - rgb / 255).max() <= tol, name
    bits = (gray > 100)
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    for t in both_readers(tmp_path / "b.png")[:2]:
        assert_gray(t, bits.astype(np.float32))


def test_exif_orientation_is_applied(tmp_path):
    rgb = colours()
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90° clockwise to show
    Image.fromarray(rgb).save(tmp_path / "rot.png", exif=exif)
    Image.fromarray((rgb.max(-1) > 100).astype(np.uint8) * 255).save(tmp_path / "rotm.png", exif=exif)
    upright = np.rot90(rgb, k=-1)
    for t in both_readers(tmp_path / "rot.png")[:2]:
        assert np.array_equal((t.permute(1, 2, 0).numpy() * 255).round(), upright)
    m = cli.load_mask(tmp_path / "rotm.png", upright.shape[:2])[0].numpy() > 0
    assert np.array_equal(m, upright.max(-1) > 100)


def test_masks_in_every_mode(tmp_path):
    """Non-zero = masked (the official rule) whatever the mode; transparency = masked (ComfyUI's rule)."""
    m = np.zeros((H, W), bool)
    m[4:10, 6:20] = True
    files = {
        "i16.png": Image.fromarray(m.astype(np.uint16) * 3),       # 3/65535: dark, but non-zero
        "i16b.tif": Image.fromarray((m * 3).astype(">u2")),
        "i32.tif": Image.fromarray(m.astype(np.int32) * 70000),
        "f.tif": Image.fromarray(m.astype(np.float32) * 0.01),
        "one.png": Image.fromarray(m),
        "p.png": Image.fromarray(m.astype(np.uint8) * 200).convert("RGB").quantize(2),
        "la.png": Image.fromarray(np.stack([m.astype(np.uint8) * 9, np.full((H, W), 255, np.uint8)], -1), "LA"),
        "cmyk.tif": Image.fromarray(np.stack([m * 0, m * 250, m * 0], -1).astype(np.uint8)).convert("CMYK"),
    }
    for name, im in files.items():
        im.save(tmp_path / name)
        got = cli.load_mask(tmp_path / name, (H, W))[0].numpy() > 0
        assert np.array_equal(got, m), name


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(cli.CLIError, match="notes.png: not a readable image"):
        cli.load_image(bad)
    with pytest.raises(cli.CLIError, match="mask file not found"):
        cli.load_mask(tmp_path / "none.png", (H, W))
    premultiplied = Image.new("La", (W, H))  # a mode Pillow cannot convert to RGB
    with pytest.raises(imageio.ImageFileError, match="x.tif: La images cannot be read as RGB"):
        imageio.rgb_array(premultiplied, "x.tif")


# --- point 8: several frames --------------------------------------------------------------------------
def test_animations_and_multi_page_files_use_the_first_frame_with_a_warning(tmp_path, caplog):
    rgb = colours()
    frames = [Image.fromarray(np.roll(rgb, 8 * k, axis=1)) for k in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:2])
    for name, n in (("anim.gif", 3), ("pages.tif", 2)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ours, node, _ = both_readers(tmp_path / name)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2, warnings  # one per read: the command line and the runner's LoadImage
        assert all(str(tmp_path / name) in w and f"uses the first of {n} frames" in w for w in warnings)
        for t in (ours, node):
            assert np.array_equal((t.permute(1, 2, 0).numpy() * 255).round(), rgb), name
    Image.fromarray(rgb).save(tmp_path / "still.gif")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cli.load_image(tmp_path / "still.gif")
    assert "frames" not in caplog.text
