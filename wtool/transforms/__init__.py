"""Every transform, registered by importing its module: adding a transform means adding one file.

>>> from wtool.transforms import REGISTRY
>>> sorted(REGISTRY)[:2]
['cast', 'clip']
"""

import importlib
import pkgutil

from wtool.transforms.base import (
    REGISTRY,
    Context,
    Group,
    GroupPlan,
    GroupTransform,
    Skip,
    Transform,
    param,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "Context", "Group", "GroupPlan", "GroupTransform", "Skip", "Transform", "param"]
