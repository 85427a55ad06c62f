"""Import verl 0.9.1's real distillation loss modules without verl's dependency tree (test-only).

``make setup`` installs verl with ``pip install --no-deps`` (requirements-nodeps.txt). Importing
``verl.trainer.distillation.{fsdp,megatron}.losses`` and ``verl.trainer.distillation.losses``
then stops at third-party packages that verl's import chain touches but that none of the code
under test runs: ``verl/__init__.py`` -> ``verl.protocol`` (ray, tensordict), the loss modules
-> ``verl.workers.config`` / ``verl.trainer.ppo.core_algos`` / ``verl.utils.*`` (omegaconf,
transformers, codetiming, orjson, datasets, pandas). This module puts a small stand-in for each
of those into ``sys.modules`` - only for packages that are NOT installed (a full verl
environment imports its real dependencies) - with exactly the names verl reads from it at import
time. The set was found by importing the three modules with each package absent (verl 0.9.1,
megatron-core 0.16.1); a stand-in name is a placeholder class that raises if anything
instantiates it, so a test that reaches one fails loudly instead of running fake code.

Everything else is real: verl's loss functions, ``verl.utils.ulysses``,
``verl.models.mcore.util`` (with the real megatron-core), ``verl.workers.config``.

    from _verl_standins import import_verl
    verl = import_verl()          # pytest.skip when verl is not installed; cached
    verl.fsdp.compute_forward_kl_topk(...); verl.megatron.compute_forward_kl_topk(...)
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from types import SimpleNamespace

VERL_VERSION = "0.9.1"

# module -> the names verl 0.9.1 reads from it while importing the distillation loss modules
# (the importing verl file in the comment).
STANDINS = {
    "ray": ("ObjectRef",),                                           # verl/protocol.py
    "tensordict": ("TensorDict", "set_lazy_legacy"),                 # verl/protocol.py
    "tensordict.tensorclass": ("NonTensorData", "NonTensorStack"),   # verl/utils/transferqueue_utils.py
    "omegaconf": ("DictConfig", "ListConfig", "MISSING", "OmegaConf"),   # verl/utils/config.py
    "transformers": ("AutoConfig", "AutoModel", "AutoModelForCausalLM",  # verl/utils/torch_functional.py
                     "AutoModelForImageTextToText", "AutoModelForSequenceClassification",
                     "AutoModelForTokenClassification", "AutoModelForVision2Seq",
                     "GenerationConfig", "MistralForSequenceClassification", "PreTrainedModel",
                     "PreTrainedTokenizer", "PretrainedConfig", "ProcessorMixin"),
    "transformers.modeling_outputs": ("CausalLMOutputWithPast",),   # verl/utils/model.py
    "codetiming": ("Timer",),                                        # verl/utils/profiler/performance.py
    "orjson": (),                                                    # verl/utils/tracking.py
    "datasets": ("Dataset",),                                        # verl/utils/dataset/rl_dataset.py
    "pandas": (),                                                    # verl/utils/dataset/rm_dataset.py
    "PIL": (),                                                       # verl/utils/dataset/rl_dataset.py
    "PIL.Image": ("Image",),                                         # (Image.Image in an annotation)
}

# The verl modules the tests use.
FSDP_LOSSES = "verl.trainer.distillation.fsdp.losses"
MEGATRON_LOSSES = "verl.trainer.distillation.megatron.losses"
LOSSES = "verl.trainer.distillation.losses"


class _StandIn:
    """A name verl imports but the tests never use."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__module__}.{type(self).__name__} is a test stand-in "
                           f"(tests/_verl_standins.py): the code under test must not use it")


class _LazyLegacy:  # tensordict.set_lazy_legacy(False).set() runs at `import verl.protocol`
    def set(self):
        return None


def _placeholder(module: str, name: str):
    if (module, name) == ("tensordict", "set_lazy_legacy"):
        return lambda *args, **kwargs: _LazyLegacy()
    if (module, name) == ("omegaconf", "MISSING"):
        return "???"
    return type(name, (_StandIn,), {"__module__": module})


def install_standins() -> list:
    """Put the stand-ins of the packages that are not installed into ``sys.modules``; return
    the module names added (undo with :func:`remove_standins`)."""
    added = []
    for module, names in STANDINS.items():
        top = module.split(".")[0]
        loaded = sys.modules.get(top)
        if loaded is not None and not getattr(loaded, "__verl_standin__", False):
            continue  # the real package, already imported
        if loaded is None and importlib.util.find_spec(top) is not None:
            continue  # installed: verl gets the real package
        mod = sys.modules.get(module)
        if mod is None:
            mod = types.ModuleType(module, f"test stand-in (tests/_verl_standins.py) for {module}")
            mod.__verl_standin__ = True
            mod.__path__ = []  # a package, so that its submodules import
            # find_spec(name) of a module in sys.modules reads __spec__ (torch._dynamo does)
            mod.__spec__ = importlib.machinery.ModuleSpec(module, None, is_package=True)
            sys.modules[module] = mod
            added.append(module)
            if "." in module:
                parent, _, child = module.rpartition(".")
                setattr(sys.modules[parent], child, mod)
        for name in names:
            if not hasattr(mod, name):
                setattr(mod, name, _placeholder(module, name))
    return added


def remove_standins(added) -> None:
    """Take the stand-ins out of ``sys.modules`` again. The verl modules imported meanwhile keep
    the references they bound; the rest of the process (torch._dynamo, hypothesis, other test
    files) no longer sees fake ``pandas`` / ``transformers`` / ... packages."""
    for module in added:
        if getattr(sys.modules.get(module), "__verl_standin__", False):
            del sys.modules[module]


_CACHE = []


def import_verl() -> SimpleNamespace:
    """verl's real distillation loss modules (``fsdp``, ``megatron``, ``losses``), plus
    ``ulysses``, ``config`` (``verl.workers.config``), ``version`` and ``standins`` (the
    packages stood in for). Cached: the imports take a few seconds.

    Skips the calling test when verl is not installed, or is another version whose imports fail
    with these stand-ins; with verl 0.9.1 installed, a failing import is a test failure. Without
    megatron-core, ``megatron`` is None and ``megatron_missing`` says why.
    """
    import pytest

    spec = importlib.util.find_spec("verl")
    if spec is None:
        pytest.skip("verl is not installed (make setup installs it: requirements-nodeps.txt)")
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("verl")
    except PackageNotFoundError:  # pragma: no cover - a source checkout on sys.path
        installed = "unknown"
    if _CACHE:
        return _CACHE[0]
    added = install_standins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # megatron-core: "Apex is not installed", ...
            fsdp = importlib.import_module(FSDP_LOSSES)
            losses = importlib.import_module(LOSSES)
            if importlib.util.find_spec("megatron") is None:
                mega, missing = None, "megatron-core is not installed"
            else:
                mega, missing = importlib.import_module(MEGATRON_LOSSES), None
            ulysses = importlib.import_module("verl.utils.ulysses")
            config = importlib.import_module("verl.workers.config")
    except Exception as err:
        if installed != VERL_VERSION:
            pytest.skip(f"the stand-ins are written for verl {VERL_VERSION}; verl {installed} "
                        f"does not import with them: {type(err).__name__}: {err}")
        raise
    finally:
        remove_standins(added)
    _CACHE.append(SimpleNamespace(fsdp=fsdp, megatron=mega, megatron_missing=missing,
                                  losses=losses, ulysses=ulysses, config=config,
                                  version=installed,
                                  standins=sorted({m.split(".")[0] for m in added})))
    return _CACHE[0]
