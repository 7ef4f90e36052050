import pytest
from hypothesis import given
from hypothesis import strategies as st

from texbridge import Descriptor, Handle, InvalidDescriptor
from texbridge._d3d11 import d3d11_texture_desc, parse_d3d11_texture_desc
from texbridge._descriptor import texture_layout
from texbridge._formats import FORMATS, format_by_dxgi, format_by_vk, get_format


@given(st.integers(min_value=1, max_value=(1 << 64) - 1))
def test_handle_printable_form_round_trips(value):
    h = Handle(value)
    text = str(h)
    assert text.startswith("tb:") and len(text) == 19
    assert Handle.parse(text) == h == Handle.parse(text.upper().replace("TB:", "tb:"))


@pytest.mark.parametrize("bad", ["", "tb:", "tb:123", "tb:zzzzzzzzzzzzzzzz", "xx:0123456789abcdef", "tb:0000000000000000"])
def test_bad_handle_text_is_refused(bad):
    with pytest.raises(ValueError):
        Handle.parse(bad)


def test_new_handles_are_random_and_distinct():
    hs = {Handle.new() for _ in range(10000)}
    assert len(hs) == 10000


def test_format_table_is_consistent():
    for name, f in FORMATS.items():
        assert get_format(name) is f
        assert format_by_vk(f.vk) is f or format_by_vk(f.vk).vk == f.vk
        assert format_by_dxgi(f.dxgi) is f
        assert f.numpy_dtype.itemsize * f.channels == f.bytes_per_pixel
    for required in ("rgba8", "bgra8", "rgba8_srgb", "bgra8_srgb", "rgb10a2", "rgba16f", "rgba32f", "r8", "rg8",
                     "r16f", "r32f"):
        assert required in FORMATS


def test_unknown_format():
    with pytest.raises(InvalidDescriptor, match="unknown format"):
        get_format("rgb9")


def texture(**kw):
    pitch, size = texture_layout(64, 32, "rgba8")
    base = dict(kind="texture2d", size=size, width=64, height=32, format="rgba8", planes=((0, pitch),))
    base.update(kw)
    return Descriptor(**base)


def test_valid_texture_round_trips_through_wire_form():
    d = texture(runtime_private=d3d11_texture_desc(64, 32, "rgba8")).validate()
    assert Descriptor.from_wire(d.to_wire()) == d
    assert parse_d3d11_texture_desc(d.runtime_private)["Format"] == 28


@pytest.mark.parametrize("changes, match", [
    (dict(width=0), "width"), (dict(height=-1), "height"), (dict(width=1 << 20), "width"),
    (dict(format="nope"), "unknown format"), (dict(size=0), "size"), (dict(size=1 << 62), "size"),
    (dict(planes=((0, 16),)), "row pitch"), (dict(planes=((1 << 50, 256),)), "offset"),
    (dict(size=100), "layout needs"), (dict(kind="volume"), "kind"), (dict(memory="nfs"), "memory"),
    (dict(driver_uuid=b"123"), "driver_uuid"), (dict(mip_levels=2), "one mip level"),
    (dict(width=True), "integer"), (dict(runtime_private=b"x" * 5000), "runtime_private"),
])
def test_invalid_descriptors_are_refused(changes, match):
    with pytest.raises(InvalidDescriptor, match=match):
        texture(**changes).validate()


@given(st.dictionaries(st.sampled_from(["kind", "size", "width", "height", "format", "planes", "memory", "bogus",
                                        "usage", "keyed_mutex", "driver_private"]),
                       st.one_of(st.integers(-10, 1 << 70), st.text(max_size=8), st.binary(max_size=8), st.none(),
                                 st.lists(st.integers(), max_size=3))))
def test_from_wire_never_raises_anything_but_invalid_descriptor(data):
    try:
        Descriptor.from_wire(data)
    except InvalidDescriptor:
        pass
