"""Dotted module names ("down_blocks.0.resnets.0.conv1") of a torch model: where a layer hangs, to read or replace it.

No torch import: it only calls the model's own get_submodule.
"""

from __future__ import annotations


def parent_and_attribute(root, name: str):
    """(the module holding ``name``, the attribute it has there): ``setattr(*parent_and_attribute(m, n), new)`` replaces
    the layer. An AttributeError where no module of that name's parent path exists."""
    parent_name, _, attribute = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attribute
