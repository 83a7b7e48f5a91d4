"""The restricted unpickler (metashot.data.pickles): every protocol's arrays and builtins load as written,
Python 2 pickles as latin1; any other global is refused by name before anything runs (each of these
pickles does run its code under the standard unpickler); damaged files are one line naming the file."""

from __future__ import annotations

import collections
import pickle
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from metashot.data.pickles import RefusedPickle, load_pickle
from metashot.errors import DataError
from tests.layouts.mini import py2_pickle


def _values() -> dict[str, object]:
    """What the datasets' pickles hold, and the other types the unpickler lets through."""
    return {
        "image_data": np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3),
        "labels": [0, 1, 64, 2**40, -3], "names": ["n01440764", "café"], "raw": b"\x00\xffPNG",
        "int32": np.array([[1, -2]], np.int32), "float": np.eye(2),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "strided": np.arange(9)[::2],
        "0-d": np.array(5), "bool": np.array([True, False]), "strings": np.array(["ab", "c"]),
        "record": np.zeros(2, [("a", "<i4"), ("b", "u1")]), "objects": np.array([b"\x89PNG", None], object),
        "scalars": (np.float32(1.5), np.int64(-7), np.uint8(255)), "plain": (None, True, 1.25, 2 - 1j),
        "containers": ({1, 2}, frozenset({3}), bytearray(b"ab"), collections.OrderedDict(a=1),
                       collections.defaultdict(list, {"k": [1]})),
        "class_dict": {"n01440764": [0, 1], "n01443537": list(range(600))},
    }


def _fortran(x: np.ndarray) -> bool:
    return x.flags.f_contiguous and not x.flags.c_contiguous


def _same(a: object, b: object) -> bool:
    """``a`` equals ``b``, arrays by dtype, shape, memory order and values, containers item by item."""
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and _fortran(a) == _fortran(b) and np.array_equal(a, b))
    if isinstance(a, np.generic):
        return type(a) is type(b) and a == b
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("protocol", range(6))
def test_every_protocol_loads_what_was_written(tmp_path: Path, protocol: int) -> None:
    values = _values()
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(values, protocol=protocol))
    loaded = load_pickle(path)
    assert _same(values, loaded) and loaded["names"][1] == "café"
    assert isinstance(loaded["containers"][4], collections.defaultdict)


def test_python_2_pickles_are_read_as_latin1(tmp_path: Path) -> None:
    data = {"data": np.array([[200, 7]], np.uint8), "labels": [64, 65], "name": "caf\xe9",
            "codes": np.array([b"\xe9", None], object), "label_specific": np.array([3, -1], np.int32)}
    written = py2_pickle(data)
    # they are Python 2's: its str are byte strings, which Python 3 reads only with an encoding
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(written)
    keys = {b"data", b"labels", b"name", b"codes", b"label_specific"}
    assert set(pickle.loads(written, encoding="bytes")) == keys
    (tmp_path / "py2.pickle").write_bytes(written)
    loaded = load_pickle(tmp_path / "py2.pickle")
    assert loaded["name"] == "café" and loaded["labels"] == [64, 65] and loaded["codes"][0] == "é"
    assert _same(loaded["data"], data["data"]) and _same(loaded["label_specific"], data["label_specific"])


@pytest.mark.parametrize(("written", "expected"), [
    # {'labels': [1, 2], 'name': 'caf\xe9'} at protocol 0, set([1, 2]) at protocol 2, as Python 2 writes them
    (b"(dp0\nS'labels'\np1\n(lp2\nI1\naI2\nasS'name'\np3\nS'caf\\xe9'\np4\ns.",
     {"labels": [1, 2], "name": "café"}),
    (b"\x80\x02c__builtin__\nset\nq\x01]q\x02(K\x01K\x02e\x85Rq\x03.", {1, 2}),
])
def test_python_2_text_pickles_and_builtin_names(tmp_path: Path, written: bytes, expected: object) -> None:
    (tmp_path / "p").write_bytes(written)
    assert load_pickle(tmp_path / "p") == expected


def _code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


def _args(*args: object) -> bytes:
    """The opcodes that push the tuple ``args`` (protocol 2, no globals for str, list, dict, None, bool)."""
    return pickle.dumps(args, protocol=2)[2:-1]


def _call(module: str, name: str, *args: object) -> bytes:
    """A protocol 2 pickle that calls ``module.name(*args)`` (GLOBAL, REDUCE)."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + _args(*args) + b"R."


def _stack_call(module: str, name: str, *args: object) -> bytes:
    """The protocol 4 form: the global named by two strings on the stack (STACK_GLOBAL)."""
    names = b"".join(b"\x8c" + bytes([len(s)]) + s.encode() for s in (module, name))
    return b"\x80\x04" + names + b"\x93" + _args(*args) + b"R."


def _inst(module: str, name: str, arg: str) -> bytes:
    """The protocol 0 form: INST builds ``module.name(arg)``."""
    return b"(S" + repr(arg).encode() + b"\ni" + f"{module}\n{name}\n".encode() + b"."


def _npy(marker: Path) -> str:
    """A .npy of an object array whose pickle runs code: what numpy.load(path, None, True) unpickles."""
    path = marker.with_name("runs-code.npy")
    np.save(path, np.array([_RunsCode(marker)], object), allow_pickle=True)
    return str(path)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (_code(self.marker),)


# the global each pickle calls, and the pickle (of the marker file it writes when unpickled)
ATTACKS: dict[str, tuple[str, Callable[[Path], bytes]]] = {
    "os.system": ("os.system", lambda m: _call("os", "system", f"touch {m}")),
    "posix.system": ("posix.system", lambda m: _call("posix", "system", f"touch {m}")),  # os.system's pickle
    "builtins.exec": ("builtins.exec", lambda m: _call("builtins", "exec", _code(m))),
    "builtins.eval": ("builtins.eval", lambda m: _call("builtins", "eval", _code(m))),
    "__builtin__.eval": ("__builtin__.eval", lambda m: _call("__builtin__", "eval", _code(m))),  # Python 2's
    "STACK_GLOBAL": ("builtins.exec", lambda m: _stack_call("builtins", "exec", _code(m))),
    "INST": ("os.system", lambda m: _inst("os", "system", f"touch {m}")),
    "subprocess.Popen": ("subprocess.Popen", lambda m: _call("subprocess", "Popen", ["touch", str(m)])),
    "numpy.load": ("numpy.load", lambda m: _call("numpy", "load", _npy(m), None, True)),
    "numpy.testing": ("numpy.testing._private.utils.runstring",
                      lambda m: _call("numpy.testing._private.utils", "runstring", _code(m), {})),
    "dotted name": ("numpy.ndarray.__class__", lambda m: _stack_call("numpy", "ndarray.__class__", "x")),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_pickle_that_calls_anything_else_is_refused_by_name(tmp_path: Path, attack: str) -> None:
    name, make = ATTACKS[attack]
    control = tmp_path / "control"
    result = pickle.loads(make(control))  # the standard unpickler runs it
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert control.exists() == (attack != "dotted name")
    path, marker = tmp_path / "a.pkl", tmp_path / "marker"
    path.write_bytes(make(marker))
    with pytest.raises(RefusedPickle) as e:
        load_pickle(path)
    assert isinstance(e.value, DataError)
    assert str(e.value) == (f"{path}: refused to load: the pickle calls {name}, and metashot unpickles only "
                            "numpy arrays and plain builtins (a pickle can run any code)")
    assert not marker.exists()


HTML = "an HTML page, not a pickle (a failed Google Drive download?); download the file again"
CORRUPT = "truncated or corrupt pickle"


PERSISTENT = (f"{CORRUPT} (UnpicklingError: A load persistent id instruction was encountered, but no "
              "persistent_load function was specified.)")


@pytest.mark.parametrize(("content", "message"), [
    pytest.param(b"\n  <!DOCTYPE html><html>", HTML, id="html"),
    pytest.param(pickle.dumps(_values(), protocol=4)[:2000],
                 f"{CORRUPT} (UnpicklingError: pickle data was truncated)", id="truncated"),
    pytest.param(b"", f"{CORRUPT} (EOFError: Ran out of input)", id="empty"),
    pytest.param(b"\x80\x02K\x01", f"{CORRUPT} (EOFError: Ran out of input)", id="no stop"),
    pytest.param(b"Pid\n.", PERSISTENT, id="persistent id"),
    pytest.param(b"PK\x03\x04 a zip\n.", PERSISTENT, id="a zip"),  # P is PERSID; its message has a line break
])
def test_damaged_files_are_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "a.pkl").write_bytes(content)
    with pytest.raises(DataError) as e:
        load_pickle(tmp_path / "a.pkl")
    assert str(e.value) == f"{tmp_path / 'a.pkl'}: {message}"
    with pytest.raises(DataError) as e:
        load_pickle(tmp_path / "missing.pkl")
    assert str(e.value) == f"{tmp_path / 'missing.pkl'}: not found"
