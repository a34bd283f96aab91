"""Import Megatron-Bridge's training modules, with or without Transformer-Engine.

With Transformer-Engine (a NeMo / NGC container) this is a plain `import megatron.bridge`.

Without it (CPU machines, the test tier) two things stop the import, and only the import:

1. `megatron/bridge/__init__.py` and `megatron/bridge/models/__init__.py` import every model
   bridge, including Hugging Face modelling code that needs a given transformers release and TE
   (e.g. `peft/lora_layers.py` imports `transformer_engine.pytorch` unconditionally).  Those two
   package inits are replaced by lazy ones that import a re-exported name's submodule on first
   use (the table is read from the real `__init__.py`), so only what we use is imported;
2. a few modules import TE (or nvidia-resiliency-ext) at module level without using it on our
   path: a stub module is visible *only while* Bridge's modules are imported, after
   megatron.core and every megatron.core module this package uses are imported (they have
   recorded that TE is absent), and is removed afterwards.

`pretrain` itself still cannot run on CPU (Bridge asserts CUDA); see examples/bridge/.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import os
import sys
import types
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# What the adapter uses (CPU-importable).  `import_bridge()` imports these.
BRIDGE_MODULES = (
    "megatron.bridge.training.callbacks",
    "megatron.bridge.training.state",
    "megatron.bridge.training.config",
    "megatron.bridge.training.utils.omegaconf_utils",
    "megatron.bridge.training.utils.train_utils",
    "megatron.bridge.models.hybrid.hybrid_provider",
)
_LAZY_PACKAGES = ("megatron.bridge", "megatron.bridge.models", "megatron.bridge.recipes")
_STUBBED = ("transformer_engine", "transformer_engine.pytorch", "nvidia_resiliency_ext",
            "nvidia_resiliency_ext.inprocess")
_done = False


def has_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or TE's own RuntimeError/OSError without CUDA libraries
        return False
    return True


def import_bridge() -> None:
    """Make `megatron.bridge.training.{callbacks,config,state,...}` and the hybrid model provider
    importable; idempotent.  Raises ImportError when megatron-bridge is not installed."""
    global _done
    if _done:
        return
    spec = importlib.util.find_spec("megatron.bridge")
    if spec is None:
        raise ImportError("megatron-bridge is not installed: `make install-nemo` (or "
                          "pip install --no-deps megatron-bridge==0.6.2 plus the `bridge` extra)")
    if has_transformer_engine():
        import megatron.bridge  # noqa: F401  the real package, as in a NeMo container
    else:
        _preimport_megatron_core()
        with _stubs():
            for name in _LAZY_PACKAGES:
                _install_lazy_package(name, os.path.dirname(spec.origin))
            # Without TE, Bridge logs every optional TE symbol it cannot import, with a
            # traceback, at INFO on its own stream handler: keep that logger at WARNING.
            importlib.import_module("megatron.bridge.utils.import_utils")
            logging.getLogger("megatron.bridge.utils.import_utils").setLevel(logging.WARNING)
            importlib.import_module("megatron.bridge.models.conversion")  # the real init's order
            for module in BRIDGE_MODULES:
                importlib.import_module(module)
    _done = True


def _preimport_megatron_core() -> None:
    """Every megatron.core module this package builds on, imported before a TE stub exists."""
    import megatron.core  # noqa: F401

    import nemo_elastic.elastic.specs  # noqa: F401  (model, specs, mamba)
    import nemo_elastic.training.train  # noqa: F401  (loop, optimizer, DDP, schedules)
    import megatron.core.extensions.transformer_engine  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401


class _AnyModule(types.ModuleType):
    """Attribute chains resolve: capitalised names are empty classes, others sub-modules."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            value = type(name, (), {"__module__": self.__name__,
                                    "__init__": lambda self, *a, **k: None})
        else:
            value = _AnyModule(f"{self.__name__}.{name}")
            value.__path__ = []
        setattr(self, name, value)
        return value


@contextmanager
def _stubs():
    added = []
    for name in _STUBBED:
        if name not in sys.modules:
            module = _AnyModule(name)
            module.__path__, module.__version__ = [], "0.0.0+stub"
            sys.modules[name] = module
            added.append(name)
    try:
        yield
    finally:  # later imports (megatron.core's lazy ones included) see no TE again
        for name in list(sys.modules):
            if name.split(".")[0] in {n.split(".")[0] for n in added} and \
                    isinstance(sys.modules[name], _AnyModule):
                del sys.modules[name]


def _install_lazy_package(name: str, root: str) -> None:
    """`name` as a package whose re-exported names import their own submodule on first use
    (`root`: the megatron/bridge folder)."""
    if name in sys.modules:
        return
    path = os.path.join(root, *name.split(".")[2:])
    init = os.path.join(path, "__init__.py")
    with open(init, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    table = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                table[alias.asname or alias.name] = (node.module, alias.name)
    module = types.ModuleType(name)
    module.__path__, module.__file__, module.__package__ = [path], init, name
    module.__spec__ = importlib.util.spec_from_file_location(name, init,
                                                             submodule_search_locations=[path])

    def __getattr__(attr: str, _table=table, _module=module):
        if attr not in _table:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        source, original = _table[attr]
        value = getattr(importlib.import_module(source), original)
        setattr(_module, attr, value)
        return value

    module.__getattr__ = __getattr__
    sys.modules[name] = module
    if "." in name:
        parent_name, _, child = name.rpartition(".")
        setattr(sys.modules[parent_name], child, module)
