"""tasks/images/imageio.py: every mode converted as documented, bombs and broken files rejected."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from dataset_fixtures import image_bytes
from PIL import Image, ImageFile

from tasks.images.imageio import DEFAULT_MAX_PIXELS, ImageRejected, decode_rgb, image_size, load_rgb

ALL = ("JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP")


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A hand-made PNG (for modes Pillow cannot write, and headers that lie about the size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw_rows))
            + chunk(b"IEND", b""))


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def test_rgb_jpeg_is_decoded(tmp_path: Path) -> None:
    file = tmp_path / "a.jpg"
    file.write_bytes(image_bytes("JPEG", 3, (24, 48)))
    img = load_rgb(file, ("JPEG",))
    assert img.mode == "RGB" and img.size == (24, 48)


def test_decoder_is_restricted_to_the_dataset_formats(tmp_path: Path) -> None:
    file = tmp_path / "really_a_png.jpg"
    file.write_bytes(image_bytes("PNG", 3))
    with pytest.raises(ImageRejected, match="not an image of format JPEG"):
        load_rgb(file, ("JPEG",))
    assert load_rgb(file, ("JPEG", "PNG")).size == (24, 48)  # content decides, not the name


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
def test_truncated_file_is_rejected(tmp_path: Path, fmt: str, verify: bool) -> None:
    data = image_bytes(fmt, 5, (64, 128))
    file = tmp_path / "t.img"
    file.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageRejected, match=r"truncated|corrupt"):
        load_rgb(file, (fmt,), verify=verify)  # without verify(), the full decode still catches it
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_with_a_bad_checksum_is_rejected(tmp_path: Path) -> None:
    data = bytearray(image_bytes("PNG", 5, (64, 128)))
    idat = data.find(b"IDAT")
    data[idat + 20] ^= 0xFF  # inside the compressed pixels: only a CRC or the inflater notices
    file = tmp_path / "bad.png"
    file.write_bytes(bytes(data))
    with pytest.raises(ImageRejected):
        load_rgb(file, ("PNG",))


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "empty file"),
    (b"just some text, named .jpg\n", "not an image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 40, r"corrupt|not an image"),
])
def test_non_images_are_rejected_with_a_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    file = tmp_path / "x.jpg"
    file.write_bytes(content)
    with pytest.raises(ImageRejected, match=reason) as info:
        load_rgb(file, ("JPEG",))
    assert info.value.path == str(file) and info.value.reason


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected, match="file not found"):
        load_rgb(tmp_path / "absent.jpg", ("JPEG",))


def test_bomb_over_twice_the_limit_is_refused() -> None:
    side = 20_000  # 400 M pixels, > 2 x Pillow's limit: DecompressionBombError at open
    data = png(side, side, 1, 0, b"\x00")
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_rgb(data, ("PNG",))


def test_bomb_between_one_and_two_times_the_limit_is_refused() -> None:
    side = 10_000  # 100 M pixels: Pillow only warns; the warning is an error here
    assert DEFAULT_MAX_PIXELS < side * side < 2 * DEFAULT_MAX_PIXELS
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_rgb(png(side, side, 1, 0, b"\x00"), ("PNG",))


def test_bomb_refused_even_if_pillows_limit_was_lifted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageRejected, match="over the limit"):
        decode_rgb(png(10_000, 10_000, 1, 0, b"\x00"), ("PNG",))


def test_own_pixel_limit() -> None:
    data = encode(Image.new("RGB", (20, 20)))
    with pytest.raises(ImageRejected, match="400 pixels, over the limit of 100"):
        decode_rgb(data, ("PNG",), max_pixels=100)


def test_image_size_reads_the_header_alone() -> None:
    # A header claiming 10,000 x 10,000 over one byte of pixel data: the size comes back, nothing is decoded
    # (decoding would fail: the data is missing), and Pillow's bomb warning does not stop the caller's own check.
    assert image_size(png(10_000, 10_000, 1, 0, b"\x00"), ("PNG",)) == (10_000, 10_000)
    assert image_size(encode(Image.new("RGB", (20, 30)), "JPEG"), ("PNG", "JPEG")) == (20, 30)
    with pytest.raises(ImageRejected, match="decompression bomb"):  # over twice Pillow's limit: Pillow refuses
        image_size(png(20_000, 20_000, 1, 0, b"\x00"), ("PNG",))
    with pytest.raises(ImageRejected, match="row 3: not an image of format PNG"):
        image_size(b"GIF? no, just text", ("PNG",), name="row 3")
    with pytest.raises(ImageRejected, match="empty file"):
        image_size(b"", ("PNG",))


def test_mode_l_is_replicated() -> None:
    grey = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    out = pixels(decode_rgb(encode(Image.fromarray(grey)), ("PNG",)))
    assert (out == grey[..., None]).all()


def test_mode_1_is_0_or_255() -> None:
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    out = pixels(decode_rgb(encode(bits), ("PNG",)))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def test_mode_p_is_expanded_through_the_palette() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    out = pixels(decode_rgb(encode(img), ("PNG",)))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 50]


def test_mode_p_transparency_is_composited_on_black() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    out = pixels(decode_rgb(encode(img, transparency=1), ("PNG",)))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [0, 0, 0]


def test_mode_rgba_is_alpha_composited_on_black() -> None:
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [200, 100, 50, 0]]], dtype=np.uint8)
    out = pixels(decode_rgb(encode(Image.fromarray(rgba)), ("PNG",)))
    assert out[0, 0].tolist() == [200, 100, 50]
    assert np.abs(out[0, 1].astype(int) - np.array([100, 50, 25])).max() <= 1  # colour * 128 / 255
    assert out[0, 2].tolist() == [0, 0, 0]


def test_mode_la_is_alpha_composited_on_black() -> None:
    la = Image.merge("LA", (Image.new("L", (1, 1), 200), Image.new("L", (1, 1), 64)))
    out = pixels(decode_rgb(encode(la), ("PNG",)))
    assert np.abs(out[0, 0].astype(int) - 50).max() <= 1  # 200 * 64 / 255


def test_mode_cmyk_uses_pillows_conversion() -> None:
    cmyk = Image.new("CMYK", (2, 1), (255, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    img = Image.open(io.BytesIO(encode(cmyk, "JPEG", quality=100)))
    assert img.mode == "CMYK"  # the file really is CMYK
    out = pixels(decode_rgb(encode(cmyk, "JPEG", quality=100), ("JPEG",)))
    assert np.abs(out[0, 0].astype(int) - [0, 255, 255]).max() <= 3  # cyan
    assert np.abs(out[0, 1].astype(int) - [0, 0, 0]).max() <= 3  # black


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=">u2")
    data = png(4, 1, 16, 0, b"\x00" + values.tobytes())
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = pixels(decode_rgb(data, ("PNG",)))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]  # clipping would give [0, 255, 255, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16_bit_rgb_keeps_the_high_byte() -> None:
    rgb16 = np.array([[[0x8000, 0x4000, 0xFFFF]]], dtype=">u2")
    out = pixels(decode_rgb(png(1, 1, 16, 2, b"\x00" + rgb16.tobytes()), ("PNG",)))
    assert out[0, 0].tolist() == [128, 64, 255]


def test_32_bit_int_in_16_bit_range_is_scaled_as_16_bit() -> None:
    img = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert img.mode == "I"
    out = pixels(decode_rgb(encode(img, "TIFF"), ("TIFF",)))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_32_bit_int_beyond_16_bit_is_stretched() -> None:
    img = Image.fromarray(np.array([[-1000, 500_000, 1_000_000]], dtype=np.int32))
    out = pixels(decode_rgb(encode(img, "TIFF"), ("TIFF",)))
    assert out[0, :, 0].tolist() == [0, 128, 255]  # (v - min) * 255 / (max - min)


def test_float_in_unit_range_is_scaled() -> None:
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    out = pixels(decode_rgb(encode(img, "TIFF"), ("TIFF",)))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_float_with_nan_is_rejected() -> None:
    img = Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32))
    with pytest.raises(ImageRejected, match="NaN"):
        decode_rgb(encode(img, "TIFF"), ("TIFF",))


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_rgb(encode(img, "JPEG", exif=exif, quality=95), ("JPEG",))
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the left edge is now at the top


def test_returned_image_is_independent_of_the_file(tmp_path: Path) -> None:
    file = tmp_path / "a.png"
    file.write_bytes(image_bytes("PNG", 2))
    img = load_rgb(file, ("PNG",))
    file.unlink()
    assert img.copy().size == (24, 48) and np.asarray(img).shape == (48, 24, 3)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP", "TIFF"])
def test_other_formats_decode_to_rgb(fmt: str) -> None:
    data = image_bytes(fmt, 4)
    assert decode_rgb(data, ALL).mode == "RGB"
