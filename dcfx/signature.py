"""Signature keys (`capture.Call.key`) in words: what a call's arguments were, and which of
them changed between two calls (for the runtime's and the packages' messages)."""

from __future__ import annotations

from typing import Any

from ._torch_private import pytree


class _Leaf:
    """A signature key's leaf, opaque to pytree (its tuples are not containers)."""

    def __init__(self, key: Any):
        self.key = key


def changed_arguments(a: tuple, b: tuple) -> list[str]:
    """The arguments (as `describe_signature` names them) whose values differ between two
    signature keys of the same structure; [] when the structure itself differs."""
    (spec_a, leaves_a, _), (spec_b, leaves_b, _) = a, b
    if spec_a != spec_b or len(leaves_a) != len(leaves_b):
        return []
    names = _leaf_names(spec_a, leaves_a)
    return [name for name, x, y in zip(names, leaves_a, leaves_b) if x != y]


def _leaf_names(spec: pytree.TreeSpec, leaves: tuple) -> list[str]:
    tree = pytree.tree_unflatten([_Leaf(x) for x in leaves], spec)
    return [
        pytree.keystr(path).replace("['", ".").replace("']", "").lstrip(".")
        for path, _ in pytree.tree_flatten_with_path(tree)[0]
    ]


def describe_signature(key: tuple) -> str:
    """A signature key (`Call.key`) in words: each tensor argument's dtype, shape and device,
    and the non-tensor arguments that are set, e.g.
    "sample float32[2, 4, 8, 8] cpu, timestep int64[1] cpu, encoder_hidden_states ...".
    """
    spec, leaves, autocast = key
    parts = []
    for name, leaf in zip(_leaf_names(spec, leaves), leaves):
        kind, *rest = leaf
        if kind == "T":
            shape, dtype, device = rest
            parts.append(f"{name} {str(dtype).removeprefix('torch.')}{list(shape)} {device}")
        elif rest[-1] is not None:
            parts.append(f"{name}={rest[-1]!r}")
    if autocast:
        parts.append(f"autocast {autocast}")
    return ", ".join(parts)
