"""The public surface: every public name is exported in texbridge.__all__, shows as `texbridge.X` where users see it
(tracebacks, reprs), and says what it is."""

from __future__ import annotations

import pickle
import re
import traceback
import types

import texbridge


def _is_class_or_function(obj: object) -> bool:
    return isinstance(obj, (type, types.FunctionType))


def test_every_public_attribute_is_in_all_and_every_name_in_all_exists():
    public = {n for n, v in vars(texbridge).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == set(texbridge.__all__)
    assert len(texbridge.__all__) == len(set(texbridge.__all__))
    assert "KeyedMutex" in texbridge.__all__


def test_exported_classes_and_functions_live_in_texbridge_and_have_docstrings():
    wrong_module, undocumented = [], []
    for name in texbridge.__all__:
        obj = getattr(texbridge, name)
        if not _is_class_or_function(obj):
            continue
        if obj.__module__ != "texbridge":
            wrong_module.append(f"{name}: {obj.__module__}")
        doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
        # a dataclass without a docstring gets its signature as __doc__: that does not say why it exists
        if not doc or not doc.strip() or doc.startswith(f"{name}("):
            undocumented.append(name)
    assert not wrong_module, f"__module__ is not 'texbridge': {wrong_module}"
    assert not undocumented, f"no docstring: {undocumented}"


def test_tracebacks_and_reprs_name_the_public_module():
    assert traceback.format_exception_only(texbridge.NotFound("no such name")) == ["texbridge.NotFound: no such name\n"]
    assert repr(texbridge.Session) == "<class 'texbridge.Session'>"
    assert repr(texbridge.KeyedMutex) == "<class 'texbridge.KeyedMutex'>"


def test_public_objects_still_pickle_by_their_public_name():
    err = pickle.loads(pickle.dumps(texbridge.NotFound("gone")))
    assert type(err) is texbridge.NotFound and str(err) == "gone"
    assert pickle.loads(pickle.dumps(texbridge.Usage(1))) is texbridge.Usage(1)


def test_docs_api_md_names_every_public_name_and_method():
    """docs/api.md is the short reference: every public name, and every public method or property of the classes
    users call, appears there (a new one fails here until it is documented)."""
    import inspect
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    missing = [n for n in texbridge.__all__ if f"`{n}" not in doc and f"{n}(" not in doc and f"`{n}`" not in doc]
    for cls in (texbridge.Session, texbridge.Resource, texbridge.Sender, texbridge.Receiver, texbridge.KeyedMutex,
                texbridge.Frame):
        for name, member in vars(cls).items():
            if name.startswith("_") or not (callable(member) or isinstance(member, property)):
                continue
            if name in ("export_fds", "gpu_acquired", "gpu_releasing", "backend_name"):
                continue  # the backend-facing side of Resource: docs/architecture.md, "Where to add"
            if not re.search(rf"\b{name}\b", doc):
                missing.append(f"{cls.__name__}.{name}")
    assert not missing, f"not in docs/api.md: {missing}"
