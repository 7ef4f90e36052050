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


# DXGI_FORMAT values from dxgiformat.h, written out here rather than read from the format table under test.
DXGI = {"rgba8": 28, "rgba8_srgb": 29, "bgra8": 87, "bgra8_srgb": 91, "rgb10a2": 24, "rgba16": 11, "rgba16f": 10,
        "rgba32f": 2, "r8": 61, "rg8": 49, "r16": 56, "r16f": 54, "rg16f": 34, "r32f": 41, "rg32f": 16, "r32ui": 42}
D3D11_FIELDS = ("Width", "Height", "MipLevels", "ArraySize", "Format", "SampleCount", "SampleQuality", "Usage",
                "BindFlags", "CPUAccessFlags", "MiscFlags")


def d3d11_fields(blob: bytes) -> dict[str, int]:
    """D3D11_TEXTURE2D_DESC read by offset (11 little-endian UINTs, SampleDesc inlined), not by the parser."""
    assert len(blob) == 44
    return {name: int.from_bytes(blob[4 * i:4 * i + 4], "little") for i, name in enumerate(D3D11_FIELDS)}


def expected_d3d11(width, height, fmt, mips=1, layers=1, keyed_mutex=False) -> dict[str, int]:
    # BindFlags: SHADER_RESOURCE 0x8 | RENDER_TARGET 0x20. MiscFlags: SHARED_NTHANDLE 0x800 plus SHARED 0x2, or
    # SHARED_KEYEDMUTEX 0x100 instead (D3D11 refuses both together).
    return {"Width": width, "Height": height, "MipLevels": mips, "ArraySize": layers, "Format": DXGI[fmt],
            "SampleCount": 1, "SampleQuality": 0, "Usage": 0, "BindFlags": 0x28, "CPUAccessFlags": 0,
            "MiscFlags": 0x800 | (0x100 if keyed_mutex else 0x2)}


def test_every_format_has_its_dxgi_value():
    assert {name: f.dxgi for name, f in FORMATS.items()} == DXGI


@pytest.mark.parametrize("fmt", sorted(DXGI))
@pytest.mark.parametrize("mips, layers, keyed", [(1, 1, False), (5, 6, True), (3, 1, False), (1, 4, True)])
def test_d3d11_description_has_every_field(fmt, mips, layers, keyed):
    blob = d3d11_texture_desc(123, 45, fmt, mip_levels=mips, array_size=layers, keyed_mutex=keyed)
    assert d3d11_fields(blob) == expected_d3d11(123, 45, fmt, mips, layers, keyed)
    assert parse_d3d11_texture_desc(blob) == d3d11_fields(blob)


@pytest.mark.parametrize("keyed", [False, True])
def test_memfd_textures_carry_their_d3d11_description(session, keyed):
    with session.create_texture(77, 33, "bgra8", keyed_mutex=keyed) as t:
        assert d3d11_fields(t.descriptor.runtime_private) == expected_d3d11(77, 33, "bgra8", keyed_mutex=keyed)
        with session.open(t.handle) as other:  # and it reaches an importer unchanged
            assert other.descriptor.runtime_private == t.descriptor.runtime_private


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


def gpu_texture(**kw):
    """A texture in GPU memory (opaque_fd): no CPU layout, so only the dimension limits can refuse it."""
    base = dict(kind="texture2d", size=1 << 20, width=64, height=32, format="rgba8", memory="opaque_fd",
                backend="vulkan")
    base.update(kw)
    return Descriptor(**base)


@pytest.mark.parametrize("name, limit", [("width", 65536), ("height", 65536), ("mip_levels", 17),
                                         ("array_size", 2048)])
def test_each_dimension_limit_is_exact(name, limit):
    gpu_texture(**{name: limit}).validate()
    with pytest.raises(InvalidDescriptor, match=f"{name} must be 1..{limit}, not {limit + 1}"):
        gpu_texture(**{name: limit + 1}).validate()


def test_at_most_four_planes():
    pitch, size = texture_layout(64, 32, "rgba8")
    texture(planes=((0, pitch),) * 4).validate()
    with pytest.raises(InvalidDescriptor, match="at most 4 planes"):
        texture(planes=((0, pitch),) * 5).validate()


def test_unknown_wire_fields_are_named_in_the_refusal():
    wire = texture().to_wire()
    with pytest.raises(InvalidDescriptor, match="unknown descriptor fields: 'colour'"):
        Descriptor.from_wire({**wire, "colour": "red"})


@given(st.dictionaries(st.sampled_from(["kind", "size", "width", "height", "format", "planes", "memory", "bogus",
                                        "usage", "keyed_mutex", "driver_private"]),
                       st.one_of(st.integers(-10, 1 << 70), st.text(max_size=8), st.binary(max_size=8), st.none(),
                                 st.lists(st.integers(), max_size=3))))
def test_from_wire_never_raises_anything_but_invalid_descriptor(data):
    try:
        Descriptor.from_wire(data)
    except InvalidDescriptor:
        pass
