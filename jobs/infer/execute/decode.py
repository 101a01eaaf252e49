"""Decode untrusted image bytes into an RGB uint8 array, or a one-line reason why not.

``decode_image(data, max_pixels=..., max_aspect=...)`` returns an H x W x 3 uint8 array
(C-contiguous, writable) or raises :class:`DecodeError`. Every failure caused by the
input is a DecodeError, so a caller turns it into an error row and moves on; anything
else escaping is a bug.

Decisions:

* Accepted formats are JPEG (and MPO, the multi-picture JPEG that phones write), PNG,
  WebP, TIFF, BMP, GIF, AVIF (Pillow's own plugin, when Pillow is built with libavif) and
  HEIC/HEIF (iPhones' default; the ``pillow-heif`` plugin, when installed). Pillow is only
  allowed to probe with those plugins, which also keeps its rarer parsers away from hostile
  bytes. Other files get "unsupported format X" when their magic bytes are recognised (ICO,
  SVG, PDF, JPEG 2000, JPEG XL, PSD), else "not a recognised image"; an accepted format whose
  header its plugin cannot parse is "corrupt or truncated X header". Multi-frame files (TIFF
  pages, animated GIF/WebP/AVIF, HEIF collections) give their first (primary) image.
* Limits are checked from the header, before any pixel is decoded: ``max_pixels``
  (width * height) and ``max_aspect`` (long side / short side). Pillow's own global
  ``Image.MAX_IMAGE_PIXELS`` check still runs inside ``Image.open`` (it cannot be turned
  off per call without changing global state); its DecompressionBombError is reported the
  same way, so the effective limit is ``min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)``.
* Truncated files fail: Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay
  False, and decode_image refuses to run (RuntimeError) if some code turned it on,
  because truncated images would otherwise decode silently with grey fill.
* EXIF orientation is applied (``ImageOps.exif_transpose``). A broken EXIF block is
  ignored rather than failing the image: the pixels are still good. HEIF's own rotation and
  mirroring (``irot``/``imir``) are applied by libheif, which then reports orientation 1, so
  nothing is turned twice.
* Colour: 1-bit, L, P, CMYK, YCbCr, HSV, RGBX go through Pillow's ``convert("RGB")``
  (no ICC colour management). 16-bit (I;16*, I) keeps the top 8 bits of 0..65535.
  Float images (mode F) are rejected: they have no defined display range.
* Alpha (RGBA, LA, PA, P or L/RGB with a transparency key) is composited onto white,
  which is what a viewer shows; dropping alpha instead exposes whatever colour the
  encoder left under transparent pixels (often black), which is not what the image shows.
* Sized decode (:func:`decode_for_model`): a JPEG much larger than the model's input is
  decoded with libjpeg's DCT scaling (1/2, 1/4 or 1/8, Pillow's ``draft``) to the smallest
  scale still at least the size the model resizes it to, and the full (oriented) size comes
  back with it, so results are mapped back to full resolution. Limits are always checked on
  the full size.
* Device decode (``--decode device``): :func:`inspect_jpeg` runs the header checks only, and
  :func:`decode_jpegs_on_device` decodes on the model's device with torchvision's
  ``decode_jpeg`` and applies the EXIF orientation itself (as ``exif_transpose`` does; nvJPEG
  ignores it), so CPU and CUDA run the same code. A JPEG without an end marker after its scan
  (truncated) is left to Pillow, which fails it, as is any the device decoder refuses.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000  # below Pillow's 89.5 Mpx warning threshold
DEFAULT_MAX_ASPECT = 20.0


def _heif_plugin() -> bool:
    try:
        import pillow_heif
    except ImportError:  # an optional dependency: HEIC files are then "unsupported"
        return False
    pillow_heif.register_heif_opener()
    return True


# Image.open only loads the plugins it needs lazily when formats=None; with an explicit
# list (WEBP, TIFF are not in Pillow's preinit set) they must be registered first.
Image.init()
HAVE_HEIF = _heif_plugin()
HAVE_AVIF = "AVIF" in Image.OPEN
# Pillow plugin names; the JPEG plugin also opens MPO (multi-picture JPEG) files.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF") + (("AVIF",) if HAVE_AVIF else ()) \
    + (("HEIF",) if HAVE_HEIF else ())
# What users call them, in reasons.
_FORMAT_NAMES = {"WEBP": "WebP", "HEIF": "HEIC/HEIF"}
ACCEPTED = ", ".join(_FORMAT_NAMES.get(f, f) for f in ALLOWED_FORMATS)
# Sniffed names of the accepted formats (a header their plugin refused is corrupt, not unsupported).
_SNIFFED_ACCEPTED = {"GIF": "GIF"} | ({"AVIF": "AVIF"} if HAVE_AVIF else {}) \
    | ({"HEIC": "HEIC", "HEIF": "HEIF"} if HAVE_HEIF else {})

# Magic bytes of formats we recognise but do not accept: gives a better reason than
# "not a recognised image" without running the parsers of those formats.
_KNOWN_MAGIC = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"%PDF", "PDF"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypavis", "AVIF"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftyphevc", "HEIC"),
    (4, b"ftyphevx", "HEIC"),
    (4, b"ftypheim", "HEIC"),
    (4, b"ftypheis", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypmsf1", "HEIF"),
)


class DecodeError(Exception):
    """The bytes are not a usable image. ``reason`` is one line; ``size`` is (w, h) if known;
    ``kind`` is the output's error kind: ``"limit"`` (over max_pixels/max_aspect) or ``"decode"``."""

    def __init__(self, reason: str, size: tuple[int, int] | None = None, *, kind: str = "decode"):
        reason = " ".join(str(reason).split())  # one line, whatever the parser's message held
        super().__init__(reason)
        self.reason = reason
        self.size = size
        self.kind = kind


def _sniff(data: bytes) -> str | None:
    for offset, magic, name in _KNOWN_MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    head = data[:512].lstrip()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096]):
        return "SVG"
    return None


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(b >= 32 or b in (9, 10, 13) for b in head)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: keep the top byte of 0..65535 (convert("L") would clip at 255).
        grey = np.asarray(im).astype(np.int64)
        grey = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        raise DecodeError("unsupported pixel mode F (32-bit float has no display range)", im.size)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    try:
        if has_alpha:
            return _composite_on_white(np.asarray(im.convert("RGBA")))
        if mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)
    except (ValueError, OSError) as e:
        raise DecodeError(f"cannot convert pixel mode {mode} to RGB: {e}", im.size) from e


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> np.ndarray:
    """Decode ``data`` to an H x W x 3 uint8 RGB array; raise DecodeError for bad input."""
    return _decode(data, max_pixels, max_aspect, None)[0]


def decode_for_model(
    data: bytes,
    model_input: tuple[int, int] | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Like :func:`decode_image`, for a model that resizes images to ``model_input`` =
    (min_size, max_size) (torchvision's GeneralizedRCNNTransform at inference).

    Returns ``(rgb, (width, height))``: the pixels, possibly DCT-downscaled (JPEG only), and
    the full image's oriented size. ``model_input=None`` decodes at full size.
    """
    return _decode(data, max_pixels, max_aspect, model_input)


def draft_request(size: tuple[int, int], model_input: tuple[int, int]) -> tuple[int, int] | None:
    """The (w, h) the model resizes a ``size`` = (w, h) image to (rounded up), when that is at
    most half of it in both sides (DCT scaling can then help); else None."""
    min_size, max_size = model_input
    w, h = size
    scale = min(min_size / min(w, h), max_size / max(w, h))
    want = (math.ceil(w * scale), math.ceil(h * scale))
    return want if 2 * want[0] <= w and 2 * want[1] <= h else None


def _open(data, max_pixels, max_aspect) -> tuple[Image.Image, tuple[int, int]]:
    """Image.open with our checks of everything the header says; the caller closes the image."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would decode "
            "silently; something in this process changed it"
        )
    if max_pixels <= 0 or max_aspect < 1:
        raise ValueError("max_pixels must be > 0 and max_aspect >= 1")
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's global warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb: {e}", kind="limit") from e
    except UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt in _SNIFFED_ACCEPTED:
            raise DecodeError(f"corrupt or truncated {fmt} header ({len(data)} bytes): its decoder cannot read it")
        if fmt:
            raise DecodeError(f"unsupported format {fmt} (accepted: {ACCEPTED})")
        kind = "text" if _looks_like_text(data) else "binary data"
        raise DecodeError(f"not a recognised image ({len(data)} bytes of {kind})")
    except Exception as e:  # noqa: BLE001  (any parser failure on hostile bytes)
        raise DecodeError(f"corrupt image header: {type(e).__name__}: {e}") from e

    try:
        width, height = im.size
        size = (width, height)
        if width <= 0 or height <= 0:
            raise DecodeError(f"image has no pixels ({width}x{height})", size)
        if width * height > max_pixels:
            raise DecodeError(
                f"decompression bomb: {width}x{height} = {width * height} pixels "
                f"exceeds the limit of {max_pixels}",
                size, kind="limit",
            )
        aspect = max(width, height) / min(width, height)
        if aspect > max_aspect:
            raise DecodeError(
                f"extreme aspect ratio {width}x{height} ({aspect:.1f}:1 > {max_aspect:g}:1)", size, kind="limit"
            )
    except BaseException:
        im.close()
        raise
    return im, size


def inspect_jpeg(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect: float = DEFAULT_MAX_ASPECT) -> tuple[int, int] | None:
    """The header checks of :func:`decode_image` without decoding pixels. Returns the full
    oriented (width, height) of a plain JPEG (8-bit grey or YCbCr, one picture, an end marker
    after its first scan) that a GPU decoder can take, None for any other accepted image;
    raises DecodeError like decode_image."""
    im, size = _open(data, max_pixels, max_aspect)
    with im:
        if im.format != "JPEG" or im.mode not in ("RGB", "L"):
            return None
        if not _has_eoi(data):  # truncated: nvJPEG would grey-fill it, Pillow gives the error
            return None
        try:
            turned = _orientation(im) in (5, 6, 7, 8)
        except Exception:  # noqa: BLE001  (broken EXIF: the CPU decoder knows what to do)
            return None
    return (size[1], size[0]) if turned else size


def _decode(data, max_pixels, max_aspect, model_input):
    im, size = _open(data, max_pixels, max_aspect)
    width, height = size
    with im:
        request = draft_request(size, model_input) if model_input and im.format in ("JPEG", "MPO") else None
        if request is not None:
            im.draft("RGB", request)  # DCT scaling: libjpeg decodes at 1/2, 1/4 or 1/8
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise DecodeError(f"decompression bomb: {e}", size, kind="limit") from e
        except Exception as e:  # noqa: BLE001
            raise DecodeError(f"corrupt or truncated {im.format} data: {type(e).__name__}: {e}", size) from e
        try:
            oriented = ImageOps.exif_transpose(im)
            turned = _orientation(im) in (5, 6, 7, 8)
        except Exception:  # noqa: BLE001  (broken EXIF: keep the stored orientation)
            oriented, turned = im, False
        try:
            rgb = _to_rgb(oriented)
        finally:
            if oriented is not im:
                oriented.close()
    rgb = np.array(rgb, dtype=np.uint8, order="C", copy=True)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DecodeError(f"decoded to unexpected shape {rgb.shape}", size)
    return rgb, ((height, width) if turned else size)


def _orientation(im: Image.Image) -> int:
    # The value ImageOps.exif_transpose acts on (others leave the image as stored, 1);
    # 5-8 swap width and height.
    value = im.getexif().get(0x0112, 1)
    return int(value) if value in (2, 3, 4, 5, 6, 7, 8) else 1


def _has_eoi(data: bytes) -> bool:
    """Whether an EOI marker (FFD9) follows the start of the first scan. Entropy-coded data
    cannot hold FFD9 (an FF in it is followed by 00 or a restart marker), so a file cut short
    has none there, while bytes after the EOI (padding, a phone's appended video) are allowed.
    The segments before the scan are walked by their lengths: an EXIF thumbnail has an EOI."""
    i, n = 2, len(data)  # after SOI
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False  # junk between segments: left to Pillow
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
        elif marker in (0xD8, 0xD9):
            return False
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
            if marker == 0xDA:  # SOS
                return data.find(b"\xff\xd9", i) >= 0
    return False


def orient_chw(img, orientation: int):
    """A 3 x H x W tensor turned as ``ImageOps.exif_transpose`` turns an image with EXIF
    ``orientation`` (1-8; any other value leaves it as stored), contiguous."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        img = img.flip(2)
    elif orientation == 3:  # ROTATE_180
        img = img.flip((1, 2))
    elif orientation == 4:  # FLIP_TOP_BOTTOM
        img = img.flip(1)
    elif orientation == 5:  # TRANSPOSE
        img = img.transpose(1, 2)
    elif orientation == 6:  # ROTATE_270 (clockwise)
        img = img.rot90(-1, (1, 2))
    elif orientation == 7:  # TRANSVERSE
        img = img.transpose(1, 2).flip((1, 2))
    elif orientation == 8:  # ROTATE_90 (counter-clockwise)
        img = img.rot90(1, (1, 2))
    return img.contiguous()


def _jpeg_orientation(data: bytes) -> int:
    with warnings.catch_warnings():  # the limits were checked by inspect_jpeg
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            return _orientation(im)


def decode_jpegs_on_device(datas: list[bytes], sizes: list[tuple[int, int]], device) -> list:
    """Decode JPEGs that :func:`inspect_jpeg` accepted with torchvision's ``decode_jpeg`` on
    ``device`` (nvJPEG on CUDA, batched; libjpeg-turbo on CPU) and turn them by their EXIF
    orientation there. ``sizes`` are their full oriented (h, w), from inspect_jpeg.

    Returns, per image, a 3 x H x W uint8 tensor on ``device``; for one that the device decoder
    refuses or decodes to another size, what the CPU path makes of it
    (:func:`decode_for_model` at full size): an H x W x 3 array, or its DecodeError.
    """
    if not datas:
        return []
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)

    def decode(x):
        with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec (see DESIGN.md)
            warnings.simplefilter("ignore", DeprecationWarning)
            # Orientation is ours (orient_chw): decode_jpeg applies it on CPU only, not with nvJPEG.
            return decode_jpeg(x, mode=ImageReadMode.RGB, apply_exif_orientation=False, device=device)

    if device.type == "cuda":
        # pytorch/vision#9606: decode_jpeg allocates its outputs on this stream but nvJPEG writes
        # them without waiting for work queued here, which may still read those recycled blocks:
        # drain it first. (Using the outputs here after the decode, torchvision orders itself.)
        torch.cuda.current_stream(device).synchronize()
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        decoded = decode(encoded)
    except Exception:  # noqa: BLE001  (one bad file fails the batched call: decode them one by one)
        decoded = []
        for e in encoded:
            try:
                decoded.append(decode(e))
            except Exception:  # noqa: BLE001
                decoded.append(None)
    out: list = []
    for data, (h, w), img in zip(datas, sizes, decoded):
        if img is not None:
            try:
                img = orient_chw(img, _jpeg_orientation(data))
            except Exception:  # noqa: BLE001  (inspect_jpeg read it: not expected; Pillow decides)
                img = None
        if img is not None and tuple(img.shape) == (3, h, w):
            out.append(img)
            continue
        try:  # what the CPU tasks would have made of it, reason included
            out.append(decode_for_model(data, None)[0])
        except DecodeError as e:
            out.append(e)
    return out
