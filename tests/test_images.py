"""Users' photos (oneref.data.images): orientation, modes, transparency, size limits, broken files.

Every image is built here; references are computed independently (numpy rotations, hand-written
16-bit PNGs, closed-form composites).
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from oneref.data import images
from oneref.data.images import (
    DEFAULT_BACKGROUND,
    ImageError,
    Photo,
    load_image,
    load_photo,
)

# What a viewer shows for each EXIF orientation, as numpy operations on the stored (H, W, C) array.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),  # "rotate 90 CW"
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def noise(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()


def smooth(h: int, w: int) -> np.ndarray:
    """A gradient: survives JPEG compression closely, unlike noise."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def with_orientation(arr: np.ndarray, path: Path, orientation: int, **kw) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(Image.fromarray(arr), path, exif=exif, **kw)


def png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit PNG (grayscale (H, W) or RGB (H, W, 3)) written by hand: Pillow cannot write RGB16."""
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def pixels(source, **kw) -> np.ndarray:
    img = load_image(source, **kw)
    assert img.mode == "RGB"
    return np.asarray(img)


# -- orientation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_upright_pixels(tmp_path, orientation):
    stored = noise(5, 7)
    photo = load_photo(with_orientation(stored, tmp_path / "o.png", orientation))
    expected = UPRIGHT[orientation](stored)
    np.testing.assert_array_equal(np.asarray(photo.image), expected)
    assert photo.original_size == (expected.shape[1], expected.shape[0])


def test_rotate_90_png_exact_and_jpeg_close(tmp_path):
    stored = smooth(500, 300)  # 300 wide, 500 high, tag 6: shown 500 wide, 300 high
    png = load_photo(with_orientation(stored, tmp_path / "r.png", 6))
    assert png.image.size == png.original_size == (500, 300)
    np.testing.assert_array_equal(np.asarray(png.image), np.rot90(stored, -1))

    jpg = load_photo(with_orientation(stored, tmp_path / "r.jpg", 6, quality=95))
    assert jpg.image.size == (500, 300)
    diff = np.abs(np.asarray(jpg.image).astype(int) - np.rot90(stored, -1))
    assert diff.mean() < 2 and diff.max() < 24
    # the official reader ignores the tag; so does exif_orientation=False
    assert load_image(tmp_path / "r.png", exif_orientation=False).size == (300, 500)


def test_lazily_opened_pil_image_is_rotated_too(tmp_path):
    stored = noise(4, 6)
    path = with_orientation(stored, tmp_path / "o.png", 8)
    with Image.open(path) as img:
        np.testing.assert_array_equal(pixels(img), np.rot90(stored, 1))


def test_plain_rgb_photo_equals_the_official_reader(tmp_path):
    path = save(Image.fromarray(smooth(40, 60)), tmp_path / "p.jpg", quality=90)
    with Image.open(path) as img:
        official = np.asarray(img.convert("RGB"))
    photo = load_photo(path)
    np.testing.assert_array_equal(np.asarray(photo.image), official)
    assert not photo.downscaled and photo.scale == (1.0, 1.0)


# -- modes ------------------------------------------------------------------------------------------
def test_grayscale_modes(tmp_path):
    grey = noise(6, 5, 1)
    for mode_img in (Image.fromarray(grey), Image.fromarray(grey).convert("1")):
        out = pixels(mode_img)
        expected = np.asarray(mode_img.convert("L"))
        np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, -1))


def test_16_bit_grayscale_is_rescaled_by_its_bit_depth(tmp_path):
    values = np.array([[0, 257, 32767, 32768, 65535]], dtype=np.uint16)
    expected = np.array([0, 1, 127, 128, 255], dtype=np.uint8)
    path = png16(tmp_path / "g16.png", values)
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")
    np.testing.assert_array_equal(pixels(path)[0, :, 0], expected)
    np.testing.assert_array_equal(pixels(values)[0, :, 1], expected)  # the same rule for arrays
    # mode I holding 16-bit values (what older Pillow gives 16-bit files)
    np.testing.assert_array_equal(pixels(Image.fromarray(values.astype(np.int32)))[0, :, 2], expected)


def test_16_bit_rgb_png_keeps_its_range(tmp_path):
    arr = np.zeros((2, 3, 3), np.uint16)
    arr[0] = 65535
    arr[1] = 32768
    out = pixels(png16(tmp_path / "c16.png", arr))
    assert (out[0] == 255).all() and (out[1] == 128).all()


def test_mode_i_out_of_16_bit_range_is_refused():
    img = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    with pytest.raises(ImageError, match=r"0\.\.70000"):
        load_image(img, name="deep.tif")


def test_float_images(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    expected = np.array([0, 128, 255], np.uint8)  # rint(127.5) = 128 (round half to even)
    np.testing.assert_array_equal(pixels(Image.fromarray(values))[0, :, 0], expected)  # mode F
    np.testing.assert_array_equal(pixels(values.astype(np.float64))[0, :, 0], expected)
    with pytest.raises(ImageError, match=r"\[0, 1\].*divide by 255"):
        load_image(Image.fromarray(values * 255), name="f.tif")


def test_palette_without_and_with_transparency():
    pal = Image.new("P", (3, 1))
    pal.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0] + [0] * 759)
    pal.putdata([0, 1, 2])
    np.testing.assert_array_equal(pixels(pal)[0], [[10, 20, 30], [200, 0, 0], [0, 200, 0]])
    pal.info["transparency"] = 1  # entry 1 is transparent
    np.testing.assert_array_equal(pixels(pal)[0], [[10, 20, 30], DEFAULT_BACKGROUND, [0, 200, 0]])
    np.testing.assert_array_equal(pixels(pal, background=None)[0, 1], [200, 0, 0])  # official: dropped


def test_alpha_is_composited_on_the_background(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = (200, 40, 0)
    rgba[0, :, 3] = (0, 255, 128)
    bg = np.array(DEFAULT_BACKGROUND, float)
    half = np.array([200, 40, 0]) * 128 / 255 + bg * (1 - 128 / 255)
    for source in (Image.fromarray(rgba), rgba, save(Image.fromarray(rgba), tmp_path / "a.png")):
        out = pixels(source).astype(int)
        np.testing.assert_array_equal(out[0, 0], DEFAULT_BACKGROUND)
        np.testing.assert_array_equal(out[0, 1], [200, 40, 0])
        assert np.abs(out[0, 2] - half).max() <= 1
    assert pixels(rgba, background="white")[0, 0].tolist() == [255, 255, 255]
    assert pixels(rgba, background=(1, 2, 3))[0, 0].tolist() == [1, 2, 3]
    assert pixels(rgba, background=None)[0, 0].tolist() == [200, 40, 0]  # the hidden colour


@pytest.mark.parametrize("mode", ["LA", "PA", "RGBa", "La"])
def test_other_alpha_modes(mode):
    # pixel 0: opaque grey 90, pixel 1: fully transparent
    data = {
        "LA": [90, 255, 90, 0],
        "PA": [0, 255, 0, 0],
        "RGBa": [90, 90, 90, 255, 0, 0, 0, 0],
        "La": [90, 255, 0, 0],
    }[mode]
    img = Image.frombytes(mode, (2, 1), bytes(data))
    if mode == "PA":
        img.putpalette([90, 90, 90] * 256)
    out = pixels(img)
    assert out[0, 1].tolist() == list(DEFAULT_BACKGROUND)
    assert np.abs(out[0, 0].astype(int) - 90).max() <= 1


def test_cmyk(tmp_path):
    rgb = Image.new("RGB", (16, 8), (200, 30, 60))
    cmyk = rgb.convert("CMYK")
    assert pixels(cmyk)[0, 0].tolist() == [200, 30, 60]
    path = save(cmyk, tmp_path / "c.jpg", quality=95)
    with Image.open(path) as img:
        assert img.mode == "CMYK" and "adobe" in img.info  # Adobe (inverted) CMYK, undone by Pillow
    assert np.abs(pixels(path)[4, 8].astype(int) - [200, 30, 60]).max() <= 4


# -- arrays -----------------------------------------------------------------------------------------
def test_arrays_accepted():
    rgb = noise(4, 5)
    np.testing.assert_array_equal(pixels(rgb), rgb)
    np.testing.assert_array_equal(pixels(rgb[..., 0]), np.repeat(rgb[..., :1], 3, -1))
    np.testing.assert_array_equal(pixels(rgb[..., :1]), np.repeat(rgb[..., :1], 3, -1))
    np.testing.assert_array_equal(pixels(rgb.astype(np.uint16) * 257), rgb)  # 16-bit, exact
    np.testing.assert_array_equal(pixels(rgb / 255.0), rgb)
    np.testing.assert_array_equal(pixels((rgb / 255.0).astype(np.float16)), rgb)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((3, 40, 50), np.uint8), r"channels-first: pass arr.transpose\(1, 2, 0\)"),
        (np.zeros((4, 4, 5), np.uint8), r"shape \(H, W\).*got \(4, 4, 5\)"),
        (np.zeros(10, np.uint8), r"got \(10,\)"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4, 4, 3), np.int64), "dtype int64.*astype"),
        (np.zeros((4, 4), bool), "dtype bool"),
        (np.full((2, 2), 1.5), r"\[0, 1\], got 1\.5\.\.1\.5"),
        (np.full((2, 2), -0.1), r"\[0, 1\], got -0\.1"),
        (np.array([[np.nan, 0.0]]), "NaN"),
    ],
)
def test_bad_arrays_are_refused(array, match):
    with pytest.raises(ImageError, match=match) as err:
        load_image(array, name="query 3")
    assert "query 3" in str(err.value)


def test_other_sources_and_settings_are_refused():
    with pytest.raises(TypeError, match="expected a path, a PIL image or a numpy array, got list"):
        load_image([[0, 1]])
    with pytest.raises(ValueError, match="background"):
        load_image(noise(2, 2), background=(0, 0, 300))
    with pytest.raises(ValueError, match="unknown colour"):
        load_image(noise(2, 2), background="not-a-colour")
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        load_image(noise(2, 2), max_pixels=0)


def test_unsupported_mode_is_refused():
    lab = Image.new("LAB", (2, 2))
    with pytest.raises(ImageError, match="mode 'LAB' is not supported"):
        load_image(lab, name="lab.tif")


# -- size limits ------------------------------------------------------------------------------------
def test_large_image_is_downscaled_once_with_a_message(tmp_path, caplog):
    stored = smooth(300, 200)  # 200 wide, 300 high; tag 6 -> 300 x 200 upright
    path = with_orientation(stored, tmp_path / "big.png", 6)
    with caplog.at_level(logging.INFO, logger="oneref.data.images"):
        photo = load_photo(path, max_pixels=6000)
    assert photo.original_size == (300, 200) and photo.downscaled
    w, h = photo.image.size
    assert w * h <= 6000 and abs(w / h - 1.5) < 0.05
    messages = [r.getMessage() for r in caplog.records if r.name == "oneref.data.images"]
    assert len(messages) == 1 and "max_pixels" in messages[0] and "big.png" in messages[0]
    # the content is the upright image, downscaled
    reference = Image.fromarray(np.rot90(stored, -1)).resize((w, h), Image.Resampling.BILINEAR)
    assert np.abs(np.asarray(photo.image).astype(int) - np.asarray(reference)).max() <= 1
    # predictions map back to the pixels the user sees
    np.testing.assert_allclose(photo.box_to_original([0, 0, w, h]), [0, 0, 300, 200])
    mask = np.zeros((h, w), bool)
    mask[:, : w // 2] = True
    full = photo.mask_to_original(mask)
    assert full.shape == (200, 300) and abs(full.mean() - 0.5) < 0.05


def test_large_jpeg_is_decoded_with_draft(tmp_path, monkeypatch):
    path = save(Image.fromarray(smooth(480, 640)), tmp_path / "big.jpg", quality=90)
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    photo = load_photo(path, max_pixels=100 * 75)
    assert calls == [((100, 75), (160, 120))]  # decoded at 1/4 scale, then resized exactly
    assert photo.image.size == (100, 75) and photo.original_size == (640, 480)
    full = np.asarray(Image.fromarray(smooth(480, 640)).resize((100, 75), Image.Resampling.BILINEAR))
    assert np.abs(np.asarray(photo.image).astype(int) - full).mean() < 3


def test_hard_limit_refuses_before_decoding(tmp_path):
    path = save(Image.fromarray(smooth(100, 100)), tmp_path / "huge.png")
    with pytest.raises(ImageError, match=r"huge\.png: 100x100 = 10,000 pixels is over hard_max_pixels"):
        load_image(path, hard_max_pixels=9999)
    assert load_image(path, hard_max_pixels=None, max_pixels=None).size == (100, 100)


def test_pillow_decompression_bomb_guard(tmp_path, monkeypatch, recwarn):
    path = save(Image.fromarray(smooth(100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # warns above 4,000, refuses above 8,000
    with pytest.raises(ImageError, match=r"bomb\.png: .*PIL\.Image\.MAX_IMAGE_PIXELS"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 9000)  # only Pillow's warning: ours replaces it
    assert load_image(path).size == (100, 100)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# -- broken input -----------------------------------------------------------------------------------
def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    data = io.BytesIO()
    Image.fromarray(noise(300, 400)).save(data, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: cannot decode the image, the file is truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_an_error(tmp_path):
    data = io.BytesIO()
    Image.fromarray(noise(100, 100)).save(data, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data.getvalue()[:3000])
    with pytest.raises(ImageError, match=r"cut\.png: cannot decode"):
        load_image(path)


def test_not_an_image_missing_and_directory(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not pixels")
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image file Pillow can read"):
        load_image(text)
    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(32))
    with pytest.raises(ImageError, match="pillow-heif"):
        load_image(heic)
    with pytest.raises(FileNotFoundError, match=r"image not found: .*missing\.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory, not an image file"):
        load_image(tmp_path)


def test_loaded_image_is_detached_from_its_file_and_the_callers_object(tmp_path):
    path = save(Image.fromarray(noise(4, 4)), tmp_path / "x.png")
    photo = load_photo(path)
    path.unlink()  # the file is closed and the pixels are in memory
    assert np.asarray(photo.image).shape == (4, 4, 3)
    mine = Image.fromarray(noise(4, 4))
    assert load_image(mine) is not mine


def test_mask_to_original_checks_the_shape():
    photo = Photo(image=Image.new("RGB", (4, 3)), original_size=(8, 6), name="p.jpg")
    with pytest.raises(ValueError, match=r"p\.jpg: mask is \(4, 3\)"):
        photo.mask_to_original(np.zeros((4, 3), bool))
    up = photo.mask_to_original(np.eye(3, 4, dtype=bool))
    assert up.shape == (6, 8) and up[0, 0] and up[1, 1] and not up[0, 2]


def test_a_process_that_allows_truncated_files_is_warned(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library might
    monkeypatch.setattr(images, "_warned_truncated", False)
    with caplog.at_level(logging.WARNING, logger="oneref.data.images"):
        load_image(noise(2, 2))
        load_image(noise(2, 2))
    assert caplog.text.count("LOAD_TRUNCATED_IMAGES is True") == 1  # once per process


def test_multi_frame_gif_gives_its_first_frame_and_str_paths_work(tmp_path):
    frames = [Image.new("RGB", (4, 3), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out = pixels(str(path))
    assert out.shape == (3, 4, 3) and (out == [255, 0, 0]).all()
