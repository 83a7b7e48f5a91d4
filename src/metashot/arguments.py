"""The keys and types of a config's ``method_args`` and ``task_args``, and the check of JSON values against
type hints that :class:`metashot.config.Config` uses for its own fields too.

A method's arguments are read from the signatures they are passed to (its ``build``, and its class's
``__init__`` where ``build`` passes them on), so a method's file is the one place that defines them. A
task source reads its arguments out of the ``task_args`` dict: their keys and types are declared here, one
:class:`~typing.TypedDict` per source in :data:`TASK_ARGS`.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

from metashot.errors import ConfigError

# Arguments build_method gives a method's build itself, not from method_args.
BUILD_ARGS = ("info", "backbone", "backbone_args")
JSON_KINDS = (bool, int, float, str, list, tuple, Sequence, dict)
ARRAYS = (list, tuple, Sequence)


class OmniglotArgs(TypedDict, total=False):
    """task_args of "omniglot" (:class:`metashot.data.omniglot.OmniglotSource`), with those of its
    sequence episodes (classes .. max_shift, :class:`metashot.data.sequences.SequenceTask`)."""

    split: str
    image_size: int
    rotations: bool
    val_characters: int
    classes: int
    instances: int
    labels: str
    max_rotation: float
    max_shift: float


SequenceArgs = OmniglotArgs  # "omniglot-sequences" (OmniglotSequenceSource) takes those of "omniglot"


class FolderArgs(TypedDict, total=False):
    """task_args of "folder" (:class:`metashot.data.folder.FolderSource`)."""

    image_size: int
    channels: int
    fractions: list[float]
    small_classes: str


class SinusoidArgs(TypedDict, total=False):
    """task_args of "sinusoid": none."""


class ImageSetArgs(TypedDict, total=False):
    """task_args of every natural-image benchmark (:class:`metashot.data.imageset.ImageSetSource`)."""

    layout: str
    image_size: int
    augment: str
    jitter: float
    normalize: bool
    workers: int
    pin_memory: bool | None
    duplicates: str


class TieredArgs(ImageSetArgs, total=False):
    """task_args of "tieredimagenet"."""

    channel_order: str


class CifarArgs(ImageSetArgs, total=False):
    """task_args of "cifar-fs" and "fc100"."""

    download: bool


class CubArgs(ImageSetArgs, total=False):
    """task_args of "cub"."""

    split: str
    crop: bool


TASK_ARGS: dict[str, type] = {
    "omniglot": OmniglotArgs,
    "folder": FolderArgs,
    "sinusoid": SinusoidArgs,
    "omniglot-sequences": SequenceArgs,
    "miniimagenet": ImageSetArgs,
    "tieredimagenet": TieredArgs,
    "cifar-fs": CifarArgs,
    "fc100": CifarArgs,
    "cub": CubArgs,
}


def _members(kind: Any) -> tuple[Any, ...]:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return typing.get_args(kind)
    return (kind,)


def matches(value: Any, kind: Any) -> bool:
    """Whether the JSON value ``value`` fits the type hint ``kind`` (a list for any sequence type, each
    item checked against the first type argument: ``list[int]``, ``tuple[int, ...]``, ``Sequence[str]``)."""
    if kind is Any:
        return True
    if len(_members(kind)) > 1:
        return any(matches(value, k) for k in _members(kind))
    if kind is type(None):
        return value is None
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float)
    origin = typing.get_origin(kind) or kind
    if origin in ARRAYS:
        item = typing.get_args(kind)[0] if typing.get_args(kind) else Any
        return isinstance(value, list | tuple) and all(matches(v, item) for v in value)
    return isinstance(value, origin)


def type_name(kind: Any) -> str:
    """``kind`` in words: "an integer or null"."""
    names = {int: "an integer", float: "a number", str: "a string", type(None): "null", dict: "a JSON object",
             bool: "true or false", list: "a list", tuple: "a list", Sequence: "a list"}
    words = [names.get(typing.get_origin(k) or k, str(k)) for k in _members(kind)]
    return " or ".join(dict.fromkeys(words))


def _takes_json(kind: Any) -> bool:
    return kind is Any or any(k is not type(None) and (typing.get_origin(k) or k) in JSON_KINDS
                              for k in _members(kind))


def _keywords(fn: Callable, skip: Sequence[str] = (), required: bool = True) -> tuple[dict[str, Any], bool]:
    """The keyword arguments of ``fn`` that take a JSON value, with their type hints (Any where they cannot
    be resolved), but ``skip`` and, unless ``required``, those without a default; and whether ``fn``
    takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # an annotation imported for type checkers only
        hints = {}
    keywords = {
        p.name: hints.get(p.name, Any) for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in (*skip, "self")
        and (required or p.default is not p.empty) and _takes_json(hints.get(p.name, Any))
    }
    return keywords, any(p.kind is p.VAR_KEYWORD for p in params)


def method_arg_types(method: str) -> dict[str, Any] | None:
    """The keys ``method_args`` may hold for ``method``, with their types: the arguments of the method's
    ``build``, and, where it passes on ``**kwargs``, of its class's ``__init__`` (and of a base class's
    where that one passes them on), but the model or encoder and the arguments ``build`` must give
    itself (those without a default). None, taking any keys, for a method not in
    :data:`metashot.methods.METHODS` or whose arguments end in an open ``**kwargs``."""
    from metashot.methods import METHODS

    if method not in METHODS:
        return None
    cls = METHODS[method]
    known, more = _keywords(cls.build, skip=BUILD_ARGS)
    for klass in cls.__mro__:
        if more and "__init__" in vars(klass):
            init, more = _keywords(vars(klass)["__init__"], required=False)
            known = init | known
    return None if more else known


def task_arg_types(task: str) -> dict[str, Any] | None:
    """The keys ``task_args`` may hold for ``task``, with their types; None, taking any keys, for a task
    source not in :data:`TASK_ARGS`."""
    return typing.get_type_hints(TASK_ARGS[task]) if task in TASK_ARGS else None


def check_args(field: str, owner: str, args: dict[str, Any], known: dict[str, Any] | None) -> None:
    """Raise :class:`ConfigError` for the first key of ``args`` (the config's ``field`` for ``owner``, a
    method or task) that is not ``known`` or whose value has the wrong type."""
    if known is None:
        return
    for key, value in args.items():
        if key not in known:
            raise ConfigError(f"{field}: unknown key {key!r} for {owner}; known: "
                              f"{', '.join(sorted(known)) or 'none'}")
        if not matches(value, known[key]):
            raise ConfigError(f"{field}: {key} of {owner} must be {type_name(known[key])}, "
                              f"got {json.dumps(value, default=repr)}")
