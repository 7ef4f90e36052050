"""Pixel layouts of NumPy arrays on the user's side, and the one set of rules converting them to and from a texture
format (Sender.send(pixel_format=...), Receiver(pixel_format=...)). Pure NumPy; docs/senders.md states the rules.

A layout names the array's channels in memory order and its depth: `rgb8`, `bgr8`, `rgba8`, `bgra8`, `gray8`
(uint8), `rgbf`, `rgbaf`, `grayf` (any float dtype in, float32 out; nominal range 0..1). `float32` is `rgbaf`.
Rules: 8-bit v <-> float v / 255 (unorm16: v / 65535, rgb10a2: v / 1023 and a / 3); to an integer format a float
is clipped to 0..1, scaled and rounded; to a float format it is kept as is; a missing alpha is opaque; gray fills
R, G and B. Colour never becomes gray (texbridge picks no luma weights), sRGB formats take the values as encoded
(no transfer function), and formats without a rule here (rg*, r32ui) take only their own layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import InvalidArgument
from ._formats import Format


@dataclass(frozen=True, slots=True)
class Layout:
    name: str
    order: str  # channels in memory order, from "rgba"; "l" = gray
    float: bool

    @property
    def channels(self) -> int:
        return len(self.order)


LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (Layout("rgb8", "rgb", False), Layout("bgr8", "bgr", False), Layout("rgba8", "rgba", False),
                Layout("bgra8", "bgra", False), Layout("gray8", "l", False), Layout("rgbf", "rgb", True),
                Layout("rgbaf", "rgba", True), Layout("grayf", "l", True))
}
ALIASES = {"float32": "rgbaf"}

# Texture formats the rules cover: channel order in memory ("l" = one channel, gray), and the integer scale (0 = float)
_FORMATS: dict[str, tuple[str, int]] = {
    "rgba8": ("rgba", 255), "bgra8": ("bgra", 255), "rgba8_srgb": ("rgba", 255), "bgra8_srgb": ("bgra", 255),
    "rgba16": ("rgba", 65535), "rgba16f": ("rgba", 0), "rgba32f": ("rgba", 0), "rgb10a2": ("rgba", 1023),
    "r8": ("l", 255), "r16": ("l", 65535), "r16f": ("l", 0), "r32f": ("l", 0),
}


def get_layout(name: Any) -> Layout:
    try:
        return LAYOUTS[ALIASES.get(name, name)]
    except (KeyError, TypeError):
        raise InvalidArgument(f"unknown pixel_format {name!r:.40}; known: {', '.join([*LAYOUTS, *ALIASES])}") from None


def suggest(array: Any) -> str:
    """For an array refused as not the sender's own layout: the pixel_format choices its shape allows ('' none)."""
    shape, kind = getattr(array, "shape", ()), getattr(getattr(array, "dtype", None), "kind", "")
    depth = "8" if kind == "u" else "f" if kind == "f" else ""
    if not depth or len(shape) not in (2, 3):
        return ""
    channels = 1 if len(shape) == 2 else shape[2]
    names = [n for n, lay in LAYOUTS.items() if lay.channels == channels and n.endswith(depth)
             and (depth == "f" or array.dtype == np.uint8)]
    return f"if it is another layout, name it: pixel_format={' or '.join(map(repr, names))}" if names else ""


def _rule(fmt: Format) -> tuple[str, int]:
    try:
        return _FORMATS[fmt.name]
    except KeyError:
        raise InvalidArgument(f"{fmt.name} frames have no pixel_format conversion: give or take them in the format's "
                              "own layout") from None


def _check_color(src_order: str, dst_order: str, where: str) -> None:
    if src_order != "l" and dst_order == "l":
        raise InvalidArgument(f"{where}: colour to a single channel needs luma weights; convert to gray yourself "
                              "(texbridge never picks them)")


def _channel(src: np.ndarray, order: str, c: str) -> np.ndarray | None:
    """The 2-D plane of channel c ('r', 'g', 'b', 'a') of src, gray for r/g/b of a gray source, None: no alpha."""
    if order == "l":
        return None if c == "a" else src[..., 0]
    k = order.find(c)
    return None if k < 0 else src[..., k]


def _put(dst: np.ndarray, plane: np.ndarray | None, src_scale: int, dst_scale: int) -> None:
    """dst = plane converted from scale src_scale to dst_scale (0 = float, nominal 0..1); None = opaque."""
    if plane is None:
        dst[...] = dst_scale or 1.0
    elif src_scale == dst_scale:
        dst[...] = plane
    elif dst_scale == 0:
        np.multiply(plane, 1.0 / src_scale, out=dst, casting="unsafe")
    else:
        f = plane.astype(np.float32)
        if src_scale:
            f *= dst_scale / src_scale
        else:
            np.nan_to_num(f, copy=False, nan=0.0)
            np.clip(f, 0.0, 1.0, out=f)
            f *= dst_scale
        np.rint(f, out=f)
        dst[...] = f


def _unpack_1010102(packed: np.ndarray) -> np.ndarray:
    v = packed[..., 0] if packed.ndim == 3 else packed
    return np.stack([v & 1023, (v >> 10) & 1023, (v >> 20) & 1023, (v >> 30) * 341], axis=-1)  # a: 0..3 -> 0..1023


def _pack_1010102(rgba: np.ndarray, out: np.ndarray) -> None:
    r, g, b, a = (rgba[..., k].astype(np.uint32) for k in range(4))
    out[..., 0] = r | (g << 10) | (b << 20) | ((a + 170) // 341 << 30)


def to_format(src: Any, layout_name: Any, fmt: Format, shape: tuple[int, ...], out: np.ndarray | None = None,
              where: str = "send") -> np.ndarray:
    """An array in `layout_name` converted into `fmt` of `shape` (H, W, C), written into `out` when given."""
    lay = get_layout(layout_name)
    order, scale = _rule(fmt)
    arr = np.asarray(src)
    h, w = shape[0], shape[1]
    want = (h, w) if lay.channels == 1 else (h, w, lay.channels)
    if arr.shape != want and not (lay.channels == 1 and arr.shape == (h, w, 1)):
        raise InvalidArgument(f"{where}: pixel_format {lay.name!r} takes arrays of shape {want} (height, width"
                              f"{', channels' if lay.channels > 1 else ''}), got {arr.shape}")
    if lay.float and arr.dtype.kind != "f" or not lay.float and arr.dtype != np.uint8:
        raise InvalidArgument(f"{where}: pixel_format {lay.name!r} takes {'float' if lay.float else 'uint8'} arrays, "
                              f"got {arr.dtype}")
    _check_color(lay.order, order, where)
    if arr.ndim == 2:
        arr = arr[..., None]
    dst = out if out is not None else np.empty(shape, fmt.numpy_dtype)
    src_scale = 0 if lay.float else 255
    if fmt.name == "rgb10a2":
        tmp = np.empty((h, w, 4), np.uint32)
        for k, c in enumerate("rgba"):
            _put(tmp[..., k], _channel(arr, lay.order, c), src_scale, 1023)
        _pack_1010102(tmp, dst)
        return dst
    for k, c in enumerate(order if order != "l" else "r"):
        _put(dst[..., k], _channel(arr, lay.order, c), src_scale, scale)
    return dst


def from_format(src: np.ndarray, fmt: Format, layout_name: Any, out: np.ndarray | None = None,
                where: str = "receive") -> np.ndarray:
    """Pixels of `fmt` (H, W, C) converted to `layout_name`: a new array, or written into `out` when it has the
    layout's shape and dtype (else a new one)."""
    lay = get_layout(layout_name)
    order, scale = _rule(fmt)
    _check_color(order, lay.order, where)
    if fmt.name == "rgb10a2":
        src = _unpack_1010102(src)
    h, w = src.shape[0], src.shape[1]
    shape = (h, w) if lay.channels == 1 else (h, w, lay.channels)
    dtype = np.dtype(np.float32 if lay.float else np.uint8)
    dst = out if out is not None and out.shape == shape and out.dtype == dtype else np.empty(shape, dtype)
    planes = dst[..., None] if lay.channels == 1 else dst
    for k, c in enumerate(lay.order if lay.order != "l" else "r"):
        _put(planes[..., k], _channel(src, order, c), scale, 0 if lay.float else 255)
    return dst
