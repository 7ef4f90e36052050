"""The Resource interface: optional capabilities are declared on the base class (flag + method raising
NotImplementedError), so callers choose by flag instead of probing with hasattr."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from texbridge import NotHostVisible, Resource
from texbridge._errors import BackendError
from texbridge.backends import BACKENDS, get_backend

# The capability flag and the method it promises.
CAPABILITIES = {"host_visible": ("numpy",), "device_copy": ("copy_from_device", "copy_to_device")}


def _resource_classes() -> list[type[Resource]]:
    classes = []
    for name in BACKENDS:
        try:
            get_backend(name)
        except BackendError:
            continue
        module = importlib.import_module(f"texbridge.backends.{name}")
        classes += [c for c in vars(module).values()
                    if isinstance(c, type) and issubclass(c, Resource) and c is not Resource]
    return classes


@pytest.mark.parametrize("flag", sorted(CAPABILITIES))
def test_each_backend_flag_says_whether_it_implements_the_capability(flag):
    classes = _resource_classes()
    assert classes, "no backend loaded, not even memfd"
    for cls in classes:
        for method in CAPABILITIES[flag]:
            overridden = getattr(cls, method) is not getattr(Resource, method)
            assert getattr(cls, flag) == overridden, f"{cls.__name__}.{flag} disagrees with its {method}()"


def test_not_host_visible_is_a_not_implemented_error():
    assert issubclass(NotHostVisible, NotImplementedError) and issubclass(NotHostVisible, TypeError)


def test_memfd_declares_host_visible_and_no_device_copy(session):
    tex = session.create_texture(8, 4, "rgba8")
    try:
        assert tex.host_visible and not tex.device_copy
        assert tex.numpy().shape == (4, 8, 4)
        with pytest.raises(NotImplementedError, match="upload"):
            tex.copy_from_device(0)
        with pytest.raises(NotImplementedError, match="download"):
            tex.copy_to_device(0)
    finally:
        tex.close()


def test_gpu_memory_numpy_is_not_host_visible(session):
    try:
        get_backend("vulkan")
        tex = session.create_texture(8, 4, "rgba8", backend="vulkan")
    except BackendError as e:
        pytest.skip(f"no Vulkan device: {e}")
    try:
        assert not tex.host_visible
        with pytest.raises(NotHostVisible, match="download"):
            tex.numpy()
        with pytest.raises(NotImplementedError):
            np.asarray(tex)
    finally:
        tex.close()
