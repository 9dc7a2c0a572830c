"""Tests for visprompt.images: safe loading, mode conversion, fingerprints, preprocessing, augmentation.

Every test image is built here with Pillow; nothing is downloaded.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import struct
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageFile, PngImagePlugin

from visprompt.errors import ConfigError, ImageError
from visprompt.images import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentPolicy,
    ImagePreprocessor,
    augment,
    image_fingerprint,
    load_image,
)

# ------------------------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def refused(source, **kwargs) -> str:
    """Load `source`, expect an ImageError with a one-line message, and return the message."""
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
    return message


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Incompressible pixels, so that cutting the file in half cuts the pixel data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header (IHDR) claims width x height: a decompression bomb's shape."""
    data = bytearray(encode(Image.new("1", (8, 8)), "PNG"))
    assert data[12:16] == b"IHDR"  # 8-byte signature, 4-byte chunk length, then the chunk type
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over type + 13 data bytes
    return bytes(data)


def pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def close_to(actual, expected, tol: int = 0) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


# --------------------------------------------------------------------------------- sources agree


@pytest.fixture
def gradient_png(tmp_path: Path) -> tuple[Path, bytes]:
    x = np.arange(24, dtype=np.uint8)
    rgb = np.stack([np.tile(x * 10, (16, 1)), np.tile(x[:16, None] * 15, (1, 24)), np.full((16, 24), 77, np.uint8)], -1)
    data = encode(Image.fromarray(rgb), "PNG")
    path = tmp_path / "gradient.png"
    path.write_bytes(data)
    return path, data


def test_every_source_kind_gives_the_same_pixels(gradient_png):
    path, data = gradient_png
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    wrapped_url = "data:image/png;base64," + base64.encodebytes(data).decode()  # line-wrapped base64
    with Image.open(path) as lazy, open(path, "rb") as file:
        sources = [
            str(path),
            path,
            data,
            bytearray(data),
            memoryview(data),
            url,
            wrapped_url,
            lazy,
            io.BytesIO(data),
            file,
        ]
        images = [load_image(source) for source in sources]
        assert not file.closed  # the caller's file stays the caller's
    expected = image_fingerprint(images[0])
    for img in images:
        assert img.mode == "RGB" and img.size == (24, 16)
        assert image_fingerprint(img) == expected
    assert pixel(images[0], (3, 2)) == (30, 30, 77)


def test_result_is_loaded_and_independent_of_the_input(gradient_png):
    path, _ = gradient_png
    img = load_image(path)
    assert img.info == {} and img.readonly == 0
    img.putpixel((0, 0), (1, 2, 3))  # writable, fully in memory
    assert pixel(load_image(path)) != (1, 2, 3)


def test_no_file_handle_is_left_open(tmp_path, gradient_png):
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc/self/fd")
    path, _ = gradient_png
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(encode(noise((64, 64)), "PNG")[:2000])
    before = len(os.listdir(fd_dir))
    for _ in range(20):
        load_image(path)
        with pytest.raises(ImageError):
            load_image(truncated)
        with pytest.raises(ImageError):
            load_image(tmp_path)  # a directory
    assert len(os.listdir(fd_dir)) == before


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    assert pixel(load_image(data)) == (255, 0, 0)


# ----------------------------------------------------------------------------- EXIF and metadata


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # marker in the top-left corner of the stored pixels
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(encode(img, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    assert close_to(pixel(out, (16, 3)), (255, 0, 0), tol=40)  # the marker is now top-right
    assert close_to(pixel(out, (3, 3)), (128, 128, 128), tol=40)
    assert len(out.getexif()) == 0


def test_exif_gps_icc_and_text_metadata_are_dropped():
    img = Image.new("RGB", (16, 16), (20, 120, 220))
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "SecretCam"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 1.5)
    jpeg = encode(img, "JPEG", exif=exif, icc_profile=b"fake-icc-profile", comment=b"secret comment")
    with Image.open(io.BytesIO(jpeg)) as original:  # the input really carries all of it
        assert original.getexif().get_ifd(ExifTags.IFD.GPSInfo)
        assert {"exif", "icc_profile", "comment"} <= set(original.info)

    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "secret comment")
    png = encode(img, "PNG", pnginfo=text, exif=exif, icc_profile=b"fake-icc-profile")

    for data in (jpeg, png):
        out = load_image(data)
        assert out.info == {}
        assert len(out.getexif()) == 0 and not out.getexif().get_ifd(ExifTags.IFD.GPSInfo)
        for fmt in ("JPEG", "PNG"):
            resaved = encode(out, fmt)
            assert b"Exif" not in resaved and b"SecretCam" not in resaved
            assert b"fake-icc" not in resaved and b"secret" not in resaved
            with Image.open(io.BytesIO(resaved)) as again:
                assert len(again.getexif()) == 0
                assert not {"exif", "icc_profile", "comment", "Comment"} & set(again.info)


# ---------------------------------------------------------------------------------------- modes


def palette_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (4, 4), 5)
    img.putpalette([0, 0, 0] * 5 + [10, 200, 30] + [0, 0, 0] * 250)
    if transparent:
        img.info["transparency"] = 5
    return img


def grey16(mode: str, value: int) -> Image.Image:
    dtype = {"I;16": "<u2", "I;16B": ">u2"}[mode]
    return Image.frombytes(mode, (4, 4), np.full((4, 4), value, dtype=dtype).tobytes())


MODE_CASES = {
    # name: (image factory, format to round-trip through or None for the PIL image itself, expected, tolerance)
    "1": (lambda: Image.new("1", (4, 4), 1), "PNG", (255, 255, 255), 0),
    "L": (lambda: Image.new("L", (4, 4), 77), "PNG", (77, 77, 77), 0),
    "LA-transparent": (lambda: Image.new("LA", (4, 4), (0, 0)), "PNG", (255, 255, 255), 0),
    "LA-opaque": (lambda: Image.new("LA", (4, 4), (100, 255)), "PNG", (100, 100, 100), 0),
    "RGBA-transparent": (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG", (255, 255, 255), 0),
    "RGBA-opaque": (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 255)), "PNG", (255, 0, 0), 0),
    "RGBA-half": (lambda: Image.new("RGBA", (4, 4), (0, 0, 255, 128)), "PNG", (127, 127, 255), 1),
    "P": (lambda: palette_image(False), "PNG", (10, 200, 30), 0),
    "P-transparent": (lambda: palette_image(True), "PNG", (255, 255, 255), 0),
    "P-transparent-gif": (lambda: palette_image(True), "GIF", (255, 255, 255), 0),
    "I;16-max": (lambda: grey16("I;16", 65535), "PNG", (255, 255, 255), 0),
    "I;16-mid": (lambda: grey16("I;16", 128 * 257), "PNG", (128, 128, 128), 0),
    "I;16-low": (lambda: grey16("I;16", 1000), None, (4, 4, 4), 0),  # scaled, so not clipped to 255
    "I;16B": (lambda: grey16("I;16B", 65535), None, (255, 255, 255), 0),
    "I": (lambda: Image.new("I", (4, 4), 65535), None, (255, 255, 255), 0),
    "F": (lambda: Image.new("F", (4, 4), 128.0), "TIFF", (128, 128, 128), 0),
    "F-over": (lambda: Image.new("F", (4, 4), 300.0), None, (255, 255, 255), 0),
    "CMYK-cyan": (lambda: Image.new("CMYK", (4, 4), (255, 0, 0, 0)), "JPEG", (0, 255, 255), 3),
    "CMYK-tiff": (lambda: Image.new("CMYK", (4, 4), (0, 255, 0, 0)), "TIFF", (255, 0, 255), 0),
    "YCbCr": (lambda: Image.new("RGB", (4, 4), (200, 50, 30)).convert("YCbCr"), None, (200, 50, 30), 3),
}


@pytest.mark.parametrize("name", list(MODE_CASES))
def test_every_mode_converts_to_rgb(name):
    factory, fmt, expected, tol = MODE_CASES[name]
    img = factory()
    source = encode(img, fmt) if fmt else img
    out = load_image(source)
    assert out.mode == "RGB" and out.size == img.size
    assert close_to(pixel(out, (1, 1)), expected, tol), (name, pixel(out, (1, 1)))


def test_16bit_png_is_opened_as_16bit_and_scaled():
    data = encode(grey16("I;16", 65535), "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I")  # Pillow keeps the 16 bits, so the scaling is exercised
    assert pixel(load_image(data)) == (255, 255, 255)


# ------------------------------------------------------------------------------------- refusals


def test_non_image_and_empty_inputs_are_refused(tmp_path):
    assert "not a supported image" in refused(b"this is plain text, not an image at all" * 10)
    assert "empty" in refused(b"")
    assert "empty" in refused(io.BytesIO())
    empty_file = tmp_path / "empty.png"
    empty_file.touch()
    assert "empty" in refused(empty_file)
    assert "unsupported image source" in refused(42)


def test_formats_outside_the_allow_list_are_refused():
    assert "not a supported image" in refused(encode(Image.new("RGB", (4, 4)), "TGA"))


def test_missing_file_and_directory_are_refused(tmp_path):
    assert "not found" in refused(tmp_path / "missing.png")
    assert "not found" in refused(str(tmp_path / "odd\nname.png"))  # still one line
    assert "directory" in refused(tmp_path)


def refused_within(source, seconds: float = 5.0) -> str:
    """`refused`, in a thread that must finish within `seconds` (a FIFO must not block the loader)."""
    import threading

    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(_refusal(source)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"loading {source!r} blocked"
    message, error = outcome[0]
    if error is not None:
        raise error
    return message


def _refusal(source) -> tuple[str | None, BaseException | None]:
    try:
        return refused(source), None
    except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
        return None, exc


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and device files")
def test_only_regular_files_are_read(tmp_path):
    import socket

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # nobody writes: opening it for reading without O_NONBLOCK would wait forever
    assert refused_within(fifo) == f"image path is a named pipe (FIFO), not a file: {str(fifo)!r}"
    assert "character device" in refused_within("/dev/zero")  # endless
    assert "character device" in refused_within("/dev/null")
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        assert "a socket, not a file" in refused_within(sock_path)
    link = tmp_path / "link.png"
    link.symlink_to(fifo)  # a link is what it points to
    assert "named pipe" in refused_within(link)


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "HTTPS://example.com/cat.png"])
def test_remote_urls_are_not_fetched(url):
    assert "remote URLs are not fetched" in refused(url)


def test_other_url_schemes_are_refused():
    assert "unsupported URL scheme" in refused("ftp://example.com/cat.png")


def test_bad_data_urls_are_refused(gradient_png):
    _, data = gradient_png
    assert "invalid base64" in refused("data:image/png;base64,@@not*base64@@")
    assert "invalid base64" in refused("data:image/png;base64,abc")  # bad padding
    assert "invalid base64" in refused("data:image/png;base64,ümlaut")
    assert "data:image/...;base64" in refused("data:image/png," + base64.b64encode(data).decode())
    assert "media type" in refused("data:text/plain;base64," + base64.b64encode(data).decode())
    assert "empty" in refused("data:image/png;base64,")
    assert "not a supported image" in refused("data:image/png;base64," + base64.b64encode(b"nope" * 8).decode())


def test_text_mode_file_objects_are_refused(gradient_png):
    path, _ = gradient_png
    with open(path, encoding="latin-1") as text:
        assert "binary mode" in refused(text)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("pillow_allows_truncated", [False, True])
def test_truncated_files_are_refused(fmt, pillow_allows_truncated, monkeypatch):
    # Another library may have set Pillow's process-wide LOAD_TRUNCATED_IMAGES; the loader must not care.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", pillow_allows_truncated)
    data = encode(noise((64, 64)), fmt)
    assert "truncated or corrupt" in refused(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is pillow_allows_truncated  # restored afterwards
    assert load_image(data).size == (64, 64)


def test_decompression_bomb_is_refused_fast_without_decoding():
    bomb = png_declaring(30_000, 30_000)
    assert len(bomb) < 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape either
        start = time.perf_counter()
        message = refused(bomb)
        assert time.perf_counter() - start < 1.0
    assert "40.0 MP limit (max_pixels)" in message


def test_image_over_max_pixels_is_refused_from_its_header():
    # 48 MP: under Pillow's own limit, so this is the loader's check, made before pixel data is decoded.
    start = time.perf_counter()
    message = refused(png_declaring(8000, 6000))
    assert time.perf_counter() - start < 1.0
    assert message == "image is 8000x6000 = 48.0 MP, over the 40.0 MP limit (max_pixels)"
    assert DEFAULT_MAX_PIXELS == 40_000_000
    with Image.open(io.BytesIO(png_declaring(8000, 6000))) as lazy:  # a lazily opened PIL image too
        assert "over the 40.0 MP limit" in refused(lazy)


def test_pillow_bomb_warning_becomes_an_error():
    # 95 MP: between Pillow's MAX_IMAGE_PIXELS and twice that, where Pillow itself only warns.
    bomb = png_declaring(10_000, 9_500)
    assert Image.MAX_IMAGE_PIXELS < 95_000_000 < 2 * Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "max_pixels" in refused(bomb)
        assert "MAX_IMAGE_PIXELS" in refused(bomb, max_pixels=200_000_000)  # Pillow's limit applies on top
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_max_pixels_is_configurable():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert "100x100 = 10000 px, over the 9999 px limit" in refused(data, max_pixels=9_999)
    assert load_image(data, max_pixels=10_000).size == (100, 100)
    assert "max_pixels" in refused(Image.new("RGB", (100, 100)), max_pixels=9_999)


def test_max_bytes_is_enforced_for_every_source(gradient_png):
    path, data = gradient_png
    limit = len(data) - 1
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for make_source in (lambda: data, lambda: memoryview(data), lambda: path, lambda: io.BytesIO(data), lambda: url):
        assert "max_bytes" in refused(make_source(), max_bytes=limit)
        assert load_image(make_source(), max_bytes=len(data)).size == (24, 16)


def test_concurrent_loads_restore_pillow_settings(gradient_png, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _, data = gradient_png
    truncated = encode(noise((64, 64)), "PNG")[:3000]
    filters_before = list(warnings.filters)

    def work(i: int) -> bool:
        if i % 2:
            return load_image(data).size == (24, 16)
        try:
            load_image(truncated)
        except ImageError:
            return True
        return False

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(40)))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    assert list(warnings.filters) == filters_before


# ----------------------------------------------------------------------------------- fingerprint


def test_fingerprint_depends_on_pixels_mode_and_size_only():
    img = noise((12, 10), seed=1)
    key = image_fingerprint(img)
    assert len(key) == 64 and int(key, 16) >= 0
    assert image_fingerprint(load_image(encode(img, "PNG"))) == key
    assert image_fingerprint(load_image(encode(img, "BMP"))) == key
    changed = img.copy()
    changed.putpixel((0, 0), tuple(255 - v for v in img.getpixel((0, 0))))
    assert image_fingerprint(changed) != key
    grey = Image.new("L", (6, 2), 9)
    assert image_fingerprint(grey) != image_fingerprint(Image.new("L", (2, 6), 9))
    assert image_fingerprint(grey) != image_fingerprint(Image.new("RGB", (2, 2), (9, 9, 9)))


# ---------------------------------------------------------------------------------- preprocessor


def normalised(rgb, mean, std) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)


def test_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    assert CLIP_MEAN[0] == pytest.approx(0.48145466) and CLIP_STD[2] == pytest.approx(0.27577711)
    assert HALF_MEAN == HALF_STD == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("mode", ["squash", "pad", "crop"])
def test_preprocessor_shapes_and_values(mode):
    prep = ImagePreprocessor(image_size=(12, 20), mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_mode=mode)
    colour = (255, 0, 128)
    images = [Image.new("RGB", (40, 30), colour), Image.new("RGB", (7, 50), colour)]
    batch = prep(images)
    assert batch.shape == (2, 3, 12, 20) and batch.dtype == torch.float32
    single = prep(images[0])
    assert single.shape == (1, 3, 12, 20)
    centre = single[0, :, 6, 10]
    assert torch.allclose(centre, normalised(colour, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)


def test_squash_ignores_the_aspect_ratio():
    img = Image.new("RGB", (40, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 10))  # left half red
    out = ImagePreprocessor(16, HALF_MEAN, HALF_STD)(img)[0]
    assert out[0, 8, 2] > 0.9 and out[2, 8, 2] < -0.9  # left: red
    assert out[2, 8, 13] > 0.9 and out[0, 8, 13] < -0.9  # right: blue


def test_pad_letterboxes_on_the_mean_colour():
    prep = ImagePreprocessor(20, CLIP_MEAN, CLIP_STD, resize_mode="pad")
    out = prep(Image.new("RGB", (40, 20), (255, 0, 0)))[0]  # content becomes 20x10, rows 5..14
    band = torch.cat([out[:, :4], out[:, 16:]], dim=1)
    assert band.abs().max() < 0.02  # the mean colour normalises to ~0 (up to 1/255 rounding)
    inner = out[:, 7:13]
    assert torch.allclose(
        inner, normalised((255, 0, 0), CLIP_MEAN, CLIP_STD)[:, None, None].expand_as(inner), atol=1e-4
    )


def test_crop_keeps_the_centre():
    img = Image.new("RGB", (60, 20), (0, 255, 0))
    img.paste((255, 0, 0), (20, 0, 40, 20))  # the central square is red, the sides green
    out = ImagePreprocessor(10, HALF_MEAN, HALF_STD, resize_mode="crop")(img)[0]
    interior = out[:, :, 2:8]  # away from bicubic ringing at the band edges
    assert torch.allclose(interior[0], torch.ones_like(interior[0]), atol=0.05)
    assert torch.allclose(interior[1], -torch.ones_like(interior[1]), atol=0.05)


def test_preprocessor_converts_non_rgb_inputs():
    prep = ImagePreprocessor(4, HALF_MEAN, HALF_STD)
    out = prep([Image.new("RGBA", (8, 8), (0, 0, 0, 0)), Image.new("L", (8, 8), 0)])
    assert torch.allclose(out[0], torch.ones(3, 4, 4), atol=1e-5)  # transparent -> white
    assert torch.allclose(out[1], -torch.ones(3, 4, 4), atol=1e-5)


def test_preprocessor_config_round_trip():
    prep = ImagePreprocessor((224, 336), CLIP_MEAN, CLIP_STD, resize_mode="pad")
    values = json.loads(json.dumps(prep.to_dict()))
    assert values == {"image_size": [224, 336], "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "resize_mode": "pad"}
    again = ImagePreprocessor.from_dict(values)
    assert again == prep and again.size == (224, 336)
    square = ImagePreprocessor.from_dict({"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert square.size == (64, 64) and square.resize_mode == "squash" and square.mean == HALF_MEAN


@pytest.mark.parametrize(
    "values",
    [
        {"image_size": 0, "mean": HALF_MEAN, "std": HALF_STD},
        {"image_size": (10, 10, 3), "mean": HALF_MEAN, "std": HALF_STD},
        {"image_size": 10, "mean": (0.5, 0.5), "std": HALF_STD},
        {"image_size": 10, "mean": HALF_MEAN, "std": (0.5, 0.0, 0.5)},
        {"image_size": 10, "mean": HALF_MEAN, "std": HALF_STD, "resize_mode": "stretch"},
        {"image_size": 10, "mean": HALF_MEAN, "std": HALF_STD, "flip": True},
        {"image_size": 10, "mean": HALF_MEAN},
    ],
)
def test_preprocessor_rejects_bad_config(values):
    with pytest.raises(ConfigError) as info:
        ImagePreprocessor.from_dict(values)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------- augmentation


def test_augment_keeps_size_colours_and_sides():
    img = Image.new("RGB", (64, 48), (30, 200, 30))
    img.paste((200, 30, 30), (0, 0, 32, 48))  # left half red, right half green
    assert augment(img, random.Random(7)).tobytes() == augment(img, random.Random(7)).tobytes()
    for seed in range(10):
        out = augment(img, random.Random(seed), strength=1.0)
        assert out.size == img.size and out.mode == "RGB"
        r, g, b = pixel(out, (8, 24))
        assert r > g + 80 and r > b + 80  # still red, still on the left
        r, g, b = pixel(out, (56, 24))
        assert g > r + 80 and g > b + 80
    assert np.array_equal(np.asarray(augment(img, random.Random(0), strength=0)), np.asarray(img))
    with pytest.raises(ValueError):
        augment(img, random.Random(0), strength=1.5)


@pytest.mark.parametrize(
    "text, flip, colour",
    [
        ("What shape is in the middle? A circle.", True, True),
        ("Where is the square? Top left.", False, True),
        ("Is the cat on the right-hand side?", False, True),
        ("What color is the circle? Red.", True, False),
        ("The ball on the left is blue.", False, False),
        ("Describe the image. A bright room with a sofa.", True, True),
    ],
)
def test_augment_policy_reads_the_conversation(text, flip, colour):
    assert AugmentPolicy.for_text(text) == AugmentPolicy(flip=flip, colour=colour)


def test_augment_flips_and_recolours_only_where_the_text_allows():
    img = Image.new("RGB", (64, 48), (30, 200, 30))
    img.paste((200, 30, 30), (0, 0, 32, 48))  # left half red, right half green
    flipped = recoloured = 0
    for seed in range(20):
        both = augment(img, random.Random(seed), policy=AugmentPolicy(flip=True, colour=True))
        flip_only = augment(img, random.Random(seed), policy=AugmentPolicy(flip=True))
        colour_only = augment(img, random.Random(seed), policy=AugmentPolicy(colour=True))
        r, g, _ = pixel(flip_only, (8, 24))
        flipped += g > r  # green on the left
        recoloured += not np.array_equal(np.asarray(both), np.asarray(flip_only))
        r, g, _ = pixel(colour_only, (8, 24))
        assert r > g  # never flipped: red stays on the left
    assert 4 <= flipped <= 16  # about half the time
    assert recoloured >= 15  # the same draws, a colour change on top
