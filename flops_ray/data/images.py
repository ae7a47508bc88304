"""Image decoding: encoded bytes (PNG, JPEG, any format PIL reads) to checked PIL images and model arrays.

Arrays are ``(C, H, W)`` float32 scaled to ``[-1, 1]``, the convention of :func:`flops_ray.data.arrays.digits`
and of timm's ViT weights (mean = std = 0.5).
"""

from __future__ import annotations

import io

import numpy as np


class ImageDecodeError(ValueError):
    """An image that does not decode or holds non-finite pixels; the message names its file (and row)."""


def load_image(data: bytes):
    """Fully decoded PIL image of ``data``: a truncated file fails here, not half-way through training.

    Raises:
        ImageDecodeError: empty, unreadable or truncated bytes, or a float image with NaN or infinite pixels.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("empty image (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"not an image format PIL reads ({len(data)} bytes)") from exc
    except Exception as exc:  # PIL's decoders raise OSError, ValueError, SyntaxError, EOFError, struct.error...
        raise ImageDecodeError(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc
    # Only float images ("F") can hold NaN or inf; converted to 8 bits they would read as -1 and +1.
    if im.mode == "F":
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(im))))
        if bad:
            raise ImageDecodeError(f"{bad} of {im.width * im.height} pixels are NaN or infinite")
    return im


def decode_image(data: bytes, img_size: int, in_chans: int) -> np.ndarray:
    """Encoded image bytes -> ``(C, H, W)`` float32 in ``[-1, 1]``, resized to ``img_size`` square.

    Raises:
        ImageDecodeError: the bytes do not decode, or the image holds NaN or infinite pixels.
    """
    from PIL import Image

    with load_image(data) as im:
        im = im.convert("L" if in_chans == 1 else "RGB")
        if im.size != (img_size, img_size):
            im = im.resize((img_size, img_size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return arr[None] if in_chans == 1 else arr.transpose(2, 0, 1)
