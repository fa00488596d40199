"""Network pickles as NVlabs/edm2 writes them, read as plain data without running their code.

EDM2 saves its networks with `pickle.dump`, and its classes are "persistent"
(torch_utils/persistence.py): each object pickles as a call of
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` holds the source of
the class's whole module (`module_src`), the class name and the object's state (its attribute
dict, with the constructor's `_init_args` and `_init_kwargs`). Unpickled the usual way, that
source is executed. Here it never is: `EDM2Unpickler.find_class` resolves only the globals
below, each to a dmstab function or class that builds plain data, and refuses every other one
by name (`RefusedGlobal`) before anything is called:

- `_reconstruct_persistent_obj` -> a `PickledObject` record (the class name, the constructor's
  arguments, the state); `module_src` is dropped unread;
- tensors as plain `pickle` writes them: a parameter is `torch._utils._rebuild_parameter` of
  `torch._utils._rebuild_tensor_v2` of `torch.storage._load_from_bytes(bytes)`, those bytes a
  `torch.save` file of the storage, which is read here with `torch.load(weights_only=True)`;
- `torch.nn.ModuleDict` (the UNet's encoder and decoder) -> a `PickledObject`;
- `collections.OrderedDict` (a module's parameters, buffers, submodules), `dnnlib.util.EasyDict`
  (the pickle's top level) -> a dict;
- NumPy arrays (the latent encoder's scale and bias): `_reconstruct` of `numpy.ndarray` with a
  `numpy.dtype`, or `_frombuffer` (pickle protocol 5), under NumPy 1's `numpy.core` or
  NumPy 2's `numpy._core` names; only arrays of numbers.

Those are exactly the globals of EDM2's snapshot pickles (`data = EasyDict(encoder, dataset_kwargs,
loss_fn, ema)`). A persistent id is refused too: `pickle` itself would need code to resolve it.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from dmstab.reading import RefusedGlobal, read_pickle


@dataclass
class PickledObject:
    """An object of a class the pickle names, as data: nothing of the class runs.

    `class_name`: the persistent class's name (`Precond`, `UNet`, `Block`, ...) or
    `torch.nn.ModuleDict`; `init_args`/`init_kwargs`: what its constructor was given;
    `state`: its attribute dict (for a torch module `_parameters`, `_buffers`, `_modules`, ...).
    """

    class_name: str
    init_args: tuple[Any, ...] = ()
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    def submodules(self) -> dict[str, PickledObject]:
        """The module's children by name, in the order they were created (torch `_modules`)."""
        children = self.state.get("_modules") or {}
        return {name: child for name, child in children.items() if child is not None}

    def named_tensors(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        """Parameters and persistent buffers under the dotted names torch's `state_dict` gives."""
        transient = self.state.get("_non_persistent_buffers_set") or set()
        for name, tensor in (self.state.get("_parameters") or {}).items():
            if tensor is not None:
                yield prefix + name, tensor
        for name, tensor in (self.state.get("_buffers") or {}).items():
            if tensor is not None and name not in transient:
                yield prefix + name, tensor
        for name, child in self.submodules().items():
            if isinstance(child, PickledObject):
                yield from child.named_tensors(f"{prefix}{name}.")


class _PickledModuleDict(PickledObject):
    """`torch.nn.ModuleDict` pickles as a new object (NEWOBJ) that BUILD gives its state."""

    def __new__(cls) -> _PickledModuleDict:  # NEWOBJ calls __new__ alone
        record = super().__new__(cls)
        PickledObject.__init__(record, "torch.nn.ModuleDict")
        return record

    def __init__(self) -> None:
        pass  # __new__ did it

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("a ModuleDict's state is not a dict")
        self.state = state


def _persistent_object(meta: object) -> PickledObject:
    """`_reconstruct_persistent_obj(meta)`, recorded: `meta["module_src"]` is never run."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("a persistent object's meta is not a class record")
    name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(name, str) or not isinstance(state, dict):
        raise pickle.UnpicklingError("a persistent object has no class name or state")
    args, kwargs = state.get("_init_args") or (), state.get("_init_kwargs") or {}
    if not isinstance(args, tuple | list) or not isinstance(kwargs, dict):
        raise pickle.UnpicklingError(f"{name}'s constructor arguments are not a tuple and dict")
    return PickledObject(name, tuple(args), dict(kwargs), state)


def _storage(data: object) -> torch.TypedStorage:
    """`torch.storage._load_from_bytes`: a storage `torch.save`d into bytes, read weights-only."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a stored tensor's data is not bytes")
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.TypedStorage):
        raise pickle.UnpicklingError("a stored tensor's bytes hold no storage")
    return storage


def _tensor(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    hooks: object,
    metadata: object = None,
) -> Tensor:
    """`torch._utils._rebuild_tensor_v2`, for a plain tensor: a view of a storage."""
    if not isinstance(storage, torch.TypedStorage):
        raise pickle.UnpicklingError("a tensor is not built on a storage")
    if hooks or metadata:
        raise pickle.UnpicklingError("a tensor carries hooks or metadata")
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)):
        raise pickle.UnpicklingError("a tensor's offset, size or stride is malformed")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})  # type: ignore[no-untyped-call,no-any-return]


def _parameter(data: object, requires_grad: object, hooks: object) -> Tensor:
    """`torch._utils._rebuild_parameter`: the parameter's tensor (no autograd state wanted)."""
    if not isinstance(data, Tensor) or hooks:
        raise pickle.UnpicklingError("a parameter holds no plain tensor")
    return data


def _numeric(dtype: np.dtype[Any]) -> np.dtype[Any]:
    if dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"a NumPy array of {dtype}, not of numbers")
    return dtype


def _numpy_dtype(name: object, align: object = False, copy: object = True) -> np.dtype[Any]:
    """`numpy.dtype(name, align, copy)` for a number type; always a copy, which BUILD may set
    the byte order of without touching NumPy's shared dtype."""
    if not isinstance(name, str):
        raise pickle.UnpicklingError("a NumPy dtype is not named by a string")
    return _numeric(np.dtype(name, align=bool(align), copy=True))


class _NdarrayType:
    """Stands for `numpy.ndarray` where `_reconstruct` names the array type; builds nothing."""


def _numpy_reconstruct(subtype: object, shape: object, code: object) -> np.ndarray[Any, Any]:
    """`numpy.core.multiarray._reconstruct`: an empty ndarray that BUILD fills (its dtype given
    by the state, which `_numpy_dtype` built, so of numbers)."""
    if subtype is not _NdarrayType or not isinstance(code, bytes):
        raise pickle.UnpicklingError("a NumPy array of a subclass")
    return np.ndarray(shape=(0,), dtype=np.uint8)


def _numpy_frombuffer(
    buffer: object, dtype: object, shape: object, order: object
) -> np.ndarray[Any, Any]:
    """`numpy.core.numeric._frombuffer` (protocol 5): an array of numbers from its bytes."""
    if not isinstance(buffer, bytes | bytearray) or not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("a NumPy array's buffer or dtype is malformed")
    if not isinstance(shape, tuple) or not all(isinstance(size, int) for size in shape):
        raise pickle.UnpicklingError("a NumPy array's shape is malformed")
    array = np.frombuffer(buffer, dtype=_numeric(dtype))
    return array.reshape(shape, order="F" if order == "F" else "C").copy()


_NUMPY: dict[str, Callable[..., Any] | type] = {
    "multiarray._reconstruct": _numpy_reconstruct,
    "numeric._frombuffer": _numpy_frombuffer,
}

ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch.storage", "_load_from_bytes"): _storage,
    ("torch.nn.modules.container", "ModuleDict"): _PickledModuleDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _numpy_dtype,
    **{
        (f"{package}.{module}", name): build
        for package in ("numpy.core", "numpy._core")
        for qualified, build in _NUMPY.items()
        for module, name in [qualified.split(".")]
    },
}


class EDM2Unpickler(pickle.Unpickler):
    """Resolves only the globals of `ALLOWED`; any other is refused by name."""

    def find_class(self, module: str, name: str) -> Any:
        build = ALLOWED.get((module, name))
        if build is None:
            raise RefusedGlobal(f"{module}.{name}")
        return build

    def persistent_load(self, pid: object) -> Any:
        raise RefusedGlobal("persistent_load")


def read_edm2_pickle(path: Path, kind: str) -> Any:
    """The pickle at `path` as plain data: dicts, lists, tensors, arrays, `PickledObject`s."""

    def unpickler(stream: IO[bytes]) -> pickle.Unpickler:
        return EDM2Unpickler(stream)

    return read_pickle(path, kind, unpickler)
