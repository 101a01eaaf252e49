"""decode_image on a corpus of good and hostile inputs, all generated here (small images)."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from jobs.infer.execute.decode import HAVE_AVIF, HAVE_HEIF, DecodeError, decode_image

W, H = 64, 48
needs_avif = pytest.mark.skipif(not HAVE_AVIF, reason="this Pillow is built without libavif")
needs_heif = pytest.mark.skipif(not HAVE_HEIF, reason="pillow-heif is not installed")


def gradient(w=W, h=H):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=2).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny but well-formed PNG whose header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def decode(data, **kw):
    kw.setdefault("max_pixels", 50_000_000)
    kw.setdefault("max_aspect", 20.0)
    return decode_image(data, **kw)


def assert_rgb(arr, h=H, w=W):
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8
    assert arr.shape == (h, w, 3)
    assert arr.flags.c_contiguous and arr.flags.writeable


# ---------------------------------------------------------------- good images

@pytest.mark.parametrize(
    "fmt,kw,tol",
    [
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("WEBP", {"quality": 90}, 12),
        ("JPEG", {"quality": 95}, 8),
    ],
)
def test_good_formats_decode_to_the_same_pixels(fmt, kw, tol):
    src = gradient()
    arr = decode(encode(Image.fromarray(src), fmt, **kw))
    assert_rgb(arr)
    err = np.abs(arr.astype(int) - src.astype(int)).mean()
    assert err <= tol, f"{fmt} mean abs error {err}"


@pytest.mark.parametrize("fmt", ["JPEG", pytest.param("AVIF", marks=needs_avif), pytest.param("HEIF", marks=needs_heif)])
def test_exif_orientation_is_applied(fmt):
    # Stored 64x32: left half red, right half blue. Orientation 6 = rotate 90 deg clockwise
    # to display, so the displayed image is 32 wide, 64 tall, red on top, blue below. (HEIF:
    # libheif turns it and reports orientation 1, so it must not be turned twice.)
    src = np.zeros((32, 64, 3), np.uint8)
    src[:, :32] = (255, 0, 0)
    src[:, 32:] = (0, 0, 255)
    im = Image.fromarray(src)
    exif = im.getexif()
    exif[0x0112] = 6
    arr = decode(encode(im, fmt, quality=95, exif=exif.tobytes()))
    assert_rgb(arr, h=64, w=32)
    top, bottom = arr[:24].reshape(-1, 3).mean(0), arr[40:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_grayscale_and_one_bit_become_rgb():
    grey = gradient()[..., 0]
    arr = decode(encode(Image.fromarray(grey, "L"), "PNG"))
    assert_rgb(arr)
    assert (arr[..., 0] == grey).all() and (arr[..., 1] == grey).all() and (arr[..., 2] == grey).all()

    bits = Image.fromarray(grey > 127).convert("1")
    arr = decode(encode(bits, "PNG"))
    assert_rgb(arr)
    assert set(np.unique(arr)) == {0, 255}
    assert ((arr[..., 0] == 255) == (grey > 127)).all()


def test_palette_becomes_rgb():
    src = gradient()
    pal = Image.fromarray(src).quantize(16)
    arr = decode(encode(pal, "PNG"))
    assert_rgb(arr)
    assert (arr == np.asarray(pal.convert("RGB"))).all()


def test_palette_with_transparency_composited_on_white():
    pal = Image.new("P", (W, H), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.paste(1, (0, 0, W // 2, H))  # left half index 1 (red), right half index 0
    data = encode(pal, "PNG", transparency=0)  # index 0 is transparent
    arr = decode(data)
    assert_rgb(arr)
    assert (arr[:, : W // 2] == (200, 10, 10)).all()
    assert (arr[:, W // 2 :] == 255).all()  # transparent -> white, not the black under it


def test_rgba_and_la_composited_on_white():
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0] = 100  # red channel under everything
    rgba[:, : W // 2, 3] = 255  # opaque left half
    rgba[:, W // 2 :, 3] = 0  # transparent right half
    arr = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert_rgb(arr)
    assert (arr[:, : W // 2] == (100, 0, 0)).all()
    assert (arr[:, W // 2 :] == 255).all()

    la = np.zeros((H, W, 2), np.uint8)
    la[..., 1] = 128  # half transparent black over white -> mid grey
    arr = decode(encode(Image.fromarray(la, "LA"), "PNG"))
    assert_rgb(arr)
    assert np.abs(arr.astype(int) - 127).max() <= 1


def test_cmyk_jpeg_and_tiff_become_rgb():
    src = gradient()
    cmyk = Image.fromarray(src).convert("CMYK")
    for fmt in ("JPEG", "TIFF"):
        arr = decode(encode(cmyk, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
        assert_rgb(arr)
        assert np.abs(arr.astype(int) - src.astype(int)).mean() < 10, fmt


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_keeps_the_top_byte(fmt):
    v = (np.arange(W * H, dtype=np.uint32).reshape(H, W) * 21).astype(np.uint16)
    im = Image.fromarray(v)
    assert im.mode == "I;16"
    arr = decode(encode(im, fmt))
    assert_rgb(arr)
    assert (arr[..., 0] == (v >> 8)).all()  # not clipped at 255 as convert("L") would


def test_first_frame_of_multipage_tiff():
    a, b = Image.new("RGB", (W, H), (255, 0, 0)), Image.new("RGB", (W, H), (0, 255, 0))
    buf = io.BytesIO()
    a.save(buf, "TIFF", save_all=True, append_images=[b])
    arr = decode(buf.getvalue())
    assert (arr == (255, 0, 0)).all()


# ------------------------------------------------------------------ bad input

def check_bad(data, expect, **kw):
    with pytest.raises(DecodeError) as ei:
        decode(data, **kw)
    reason = ei.value.reason
    assert reason and "\n" not in reason and len(reason) < 500
    assert expect in reason, reason
    return ei.value


def test_zero_bytes():
    check_bad(b"", "empty file")


def test_truncated_jpeg():
    data = encode(Image.fromarray(gradient(128, 96)), "JPEG", quality=90)
    check_bad(data[: len(data) // 2], "truncated")


def test_truncated_png():
    data = encode(Image.fromarray(gradient(128, 96)), "PNG")
    check_bad(data[: len(data) // 2], "truncated")


def test_text_with_image_extension():
    check_bad(b"this is not a picture, just a text file named cat.jpg\n" * 3, "not a recognised image")


def test_random_binary_is_not_an_image():
    check_bad(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(), "not a recognised image")


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: encode(Image.fromarray(gradient()), "ICO"), "ICO"),
        (lambda: b"8BPS\x00\x01" + bytes(40), "PSD"),
        (lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
        (lambda: b"%PDF-1.4\n%binary", "PDF"),
    ],
)
def test_unsupported_formats_are_named(make, name):
    # "Unsupported" = a format we do not accept even when Pillow could read it (ICO)
    # or could not (SVG, PDF, PSD): the reason names the format.
    check_bad(make(), f"unsupported format {name}")


def test_decompression_bomb_over_our_limit_is_rejected_from_the_header():
    data = png_claiming(10_000, 6_000)  # 60 Mpx claimed in a ~100-byte file
    assert len(data) < 200
    err = check_bad(data, "decompression bomb")
    assert "60000000 pixels" in err.reason
    assert err.size == (10_000, 6_000)


def test_decompression_bomb_over_pillows_global_limit():
    # 400 Mpx is past 2 x Image.MAX_IMAGE_PIXELS: Pillow refuses inside Image.open.
    check_bad(png_claiming(20_000, 20_000), "decompression bomb")


def test_pixel_limit_is_configurable():
    data = encode(Image.fromarray(gradient()), "PNG")
    check_bad(data, "decompression bomb", max_pixels=W * H - 1)
    assert_rgb(decode(data, max_pixels=W * H))


def test_extreme_aspect_ratio():
    data = encode(Image.new("RGB", (10_000, 1), (1, 2, 3)), "PNG")
    err = check_bad(data, "extreme aspect ratio")
    assert err.size == (10_000, 1)
    tall = encode(Image.new("L", (1, 10_000)), "PNG")
    check_bad(tall, "extreme aspect ratio")
    assert decode(data, max_aspect=10_000).shape == (1, 10_000, 3)


def test_float_images_are_rejected():
    f = Image.fromarray(np.random.default_rng(0).random((H, W), dtype=np.float32), "F")
    check_bad(encode(f, "TIFF"), "mode F")


def test_load_truncated_images_must_stay_off(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode(encode(Image.fromarray(gradient()), "PNG"))


# ---------------------------------------------------------------- GIF, AVIF, HEIC/HEIF

PHONE_FORMATS = ["GIF", pytest.param("AVIF", marks=needs_avif), pytest.param("HEIF", marks=needs_heif)]


def phone_file(fmt, arr=None, **kw):
    arr = gradient() if arr is None else arr
    if fmt != "GIF":
        kw.setdefault("quality", 90)
    return encode(Image.fromarray(arr), fmt, **kw)


@pytest.mark.parametrize("fmt,tol", [("GIF", 6), pytest.param("AVIF", 12, marks=needs_avif),
                                     pytest.param("HEIF", 12, marks=needs_heif)])
def test_phone_and_web_formats_decode_to_the_same_pixels(fmt, tol):
    src = gradient()
    arr = decode(phone_file(fmt, src))
    assert_rgb(arr)
    err = np.abs(arr.astype(int) - src.astype(int)).mean()
    assert err <= tol, f"{fmt} mean abs error {err}"


@pytest.mark.parametrize("fmt", ["GIF", pytest.param("AVIF", marks=needs_avif)])
def test_animations_give_their_first_frame(fmt):
    first = np.zeros((H, W, 3), np.uint8)
    first[:, :, 0] = 255
    second = np.zeros((H, W, 3), np.uint8)
    second[:, :, 2] = 255
    frames = [Image.fromarray(first), Image.fromarray(second)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100)
    arr = decode(buf.getvalue())
    assert_rgb(arr)
    assert arr[..., 0].mean() > 200 and arr[..., 2].mean() < 60


def test_gif_transparency_is_composited_on_white():
    im = Image.new("P", (W, H), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(0, (0, 0, W // 2, H))  # left half: palette 0, transparent
    arr = decode(encode(im, "GIF", transparency=0))
    assert_rgb(arr)
    assert (arr[:, : W // 2] == 255).all()  # transparent -> white
    assert (arr[:, W // 2 :] == (255, 0, 0)).all()


@pytest.mark.parametrize("fmt", PHONE_FORMATS)
@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_phone_formats(fmt, keep):
    data = phone_file(fmt, gradient(128, 96))
    err = check_bad(data[: max(16, int(len(data) * keep))], "truncated")
    assert err.kind == "decode"


@pytest.mark.parametrize("fmt", PHONE_FORMATS)
def test_phone_formats_with_garbage_after_the_magic(fmt):
    data = phone_file(fmt)
    head = 6 if fmt == "GIF" else 12  # GIF87a/GIF89a; ISO-BMFF size + ftyp + brand
    junk = np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8).tobytes()
    err = check_bad(data[:head] + junk, "")
    assert "unsupported" not in err.reason and "not a recognised" not in err.reason
    assert err.kind == "decode" or (err.kind == "limit" and fmt == "GIF")  # random GIF sizes are huge


def _claiming(data: bytes, box: bytes, width: int, height: int) -> bytes:
    """An ISO-BMFF image (AVIF/HEIF) whose every ``ispe`` box claims width x height."""
    out = bytearray(data)
    at = [i for i in range(len(out)) if out.startswith(box, i)]
    assert at, "no ispe box"
    for i in at:
        out[i + 8 : i + 16] = struct.pack(">II", width, height)
    return bytes(out)


def test_gif_bombs_are_refused_from_the_header():
    data = phone_file("GIF")
    # logical screen and image descriptor both claim the size
    lsd = data[:6] + struct.pack("<HH", 9_000, 6_000) + data[10:]
    i = lsd.index(b"\x2c")  # image descriptor: ',' left top width height
    claimed = lsd[: i + 5] + struct.pack("<HH", 9_000, 6_000) + lsd[i + 9 :]
    err = check_bad(claimed, "decompression bomb")
    assert err.kind == "limit" and err.size == (9_000, 6_000)
    huge = data[:6] + struct.pack("<HH", 60_000, 60_000) + data[10:]  # past Pillow's own limit
    assert check_bad(huge, "decompression bomb").kind == "limit"


@needs_avif
def test_avif_bomb_is_refused_from_the_header():
    err = check_bad(_claiming(phone_file("AVIF"), b"ispe", 9_000, 6_000), "decompression bomb")
    assert err.kind == "limit" and err.size == (9_000, 6_000)
    err = check_bad(_claiming(phone_file("AVIF"), b"ispe", 60_000, 60_000), "")
    assert err.kind in ("limit", "decode")


@needs_heif
def test_heif_that_lies_about_its_size_is_an_error_row():
    # libheif reports the cropped size (clap) and refuses pixels that do not match ispe
    err = check_bad(_claiming(phone_file("HEIF"), b"ispe", 30_000, 20_000), "")
    assert err.kind == "decode"


@pytest.mark.parametrize("fmt", PHONE_FORMATS)
def test_pixel_limit_holds_for_phone_formats(fmt):
    data = phone_file(fmt)
    err = check_bad(data, "decompression bomb", max_pixels=W * H - 1)
    assert err.kind == "limit" and err.size == (W, H)
    assert_rgb(decode(data, max_pixels=W * H))
