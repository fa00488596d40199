"""Every file dmstab reads goes through here, so each way a read can fail is one user error.

The wording is fixed, whatever the file and whichever command reads it:

    <kind> not found: <path>
    <kind> <path> is empty (0 bytes)
    <kind> <path> refused: it holds pickled code (<global>), which weights-only loading never runs
    <kind> <path> is corrupt or truncated: not a readable <format> (<ExceptionType>)
    <path> is not a <kind> (<what is missing>)

Torch files load with `weights_only=True` and NumPy files with `allow_pickle=False`, so no
pickled code ever runs: the global a refused pickle names comes from torch's refusal or from
`pickletools`, which only lists a pickle's opcodes. A bare pickle (`read_pickle`) goes through
a restricted unpickler the caller gives, which names each global it refuses (`RefusedGlobal`).
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from dmstab.errors import DmstabError

# What a broken file raises somewhere inside torch, numpy, zipfile, pickle, json or PIL
# (PIL's UnidentifiedImageError is an OSError; a broken PNG chunk raises SyntaxError).
_BROKEN = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    OSError,
    ValueError,
    EOFError,
    RuntimeError,
    IndexError,
    KeyError,
    TypeError,
    AttributeError,
    SyntaxError,
    OverflowError,
    MemoryError,
)
# torch's weights-only refusal names the global: "Trying to load unsupported GLOBAL posix.system".
_TORCH_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")

NPZ = "a NumPy .npz archive"
TORCH = "a torch file"
TORCHSCRIPT = "a TorchScript archive"

Array = npt.NDArray[Any]
T = TypeVar("T")


def _article(kind: str) -> str:
    return "an" if kind[:1].lower() in "aeiou" else "a"


def not_a(path: Path, kind: str, missing: str) -> DmstabError:
    """The wrong-kind error: `<path> is not a <kind> (<missing>)`."""
    return DmstabError(f"{path} is not {_article(kind)} {kind} ({missing})")


def _refused(path: Path, kind: str, name: str) -> DmstabError:
    return DmstabError(
        f"{kind} {path} refused: it holds pickled code ({name}), "
        "which weights-only loading never runs"
    )


def require_file(path: Path, kind: str) -> Path:
    """`path` if it is a non-empty file; otherwise the not-found, folder or empty error."""
    if path.is_dir():
        raise DmstabError(f"{kind} {path} is a directory, not a file")
    if not path.is_file():
        raise DmstabError(f"{kind} not found: {path}")
    if path.stat().st_size == 0:
        raise DmstabError(f"{kind} {path} is empty (0 bytes)")
    return path


@contextmanager
def _reading(path: Path, kind: str, form: str) -> Iterator[None]:
    """Whatever a broken file makes the reader inside raise becomes one line naming `path`."""
    try:
        yield
    except DmstabError:
        raise
    except PermissionError as error:
        raise DmstabError(f"{kind} {path} cannot be read ({error.strerror})") from None
    except Image.DecompressionBombError:
        raise DmstabError(f"{kind} {path} refused: more pixels than PIL's safety limit") from None
    except _BROKEN as error:
        found = _TORCH_GLOBAL.search(str(error))
        if isinstance(error, pickle.UnpicklingError) and found:
            raise _refused(path, kind, found.group(1)) from None
        raise DmstabError(
            f"{kind} {path} is corrupt or truncated: not a readable {form} ({type(error).__name__})"
        ) from None


def _zip_holds(path: Path) -> str | None:
    """What a zip archive is by its member names (NPZ, TORCHSCRIPT, TORCH), None if unknown."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    if names and all(name.endswith(".npy") for name in names):
        return NPZ
    if any(name.endswith("constants.pkl") for name in names):
        return TORCHSCRIPT
    if any(name.endswith("data.pkl") for name in names):
        return TORCH
    return None


def _expect_zip(path: Path, kind: str, expected: str) -> None:
    holds = _zip_holds(path)
    if holds is not None and holds != expected:
        raise not_a(path, kind, f"it is {holds}, not {expected}")


def _pickle_globals(stream: IO[bytes]) -> list[str]:
    """The globals a pickle would import, read from its opcodes; nothing is unpickled.

    GLOBAL names its global; protocol 4's STACK_GLOBAL takes the two strings pushed last,
    pushed as literals or fetched from the memo (pickletools' opcode table says which is which).
    """
    names: list[str] = []
    pushed: list[object] = []  # what each opcode pushed: a string, or None for anything else
    memo: dict[int, object] = {}
    try:
        for opcode, argument, _ in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(str(argument).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(pushed) >= 2:
                names.append(".".join(map(str, pushed[-2:])))
            if opcode.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif opcode.name.endswith("PUT") and isinstance(argument, int):
                memo[argument] = pushed[-1] if pushed else None
            elif opcode.name.endswith("GET") and isinstance(argument, int):
                pushed.append(memo.get(argument))
            elif isinstance(argument, str) and "GLOBAL" not in opcode.name:
                pushed.append(argument)
            elif len(opcode.stack_after) > len(opcode.stack_before):
                pushed.append(None)
    except _BROKEN:  # a truncated pickle: the globals before the break
        pass
    return names


def _code_name(names: list[str]) -> str:
    """The global to name: the first not NumPy's own (an object array's reconstructor)."""
    foreign = [name for name in names if not name.startswith("numpy")]
    return (foreign or names or ["an object array"])[0]


def _object_array_code(stream: IO[bytes]) -> str | None:
    """The code an .npy stream's pickled object array would run; None if it holds no objects."""
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    try:
        version = np.lib.format.read_magic(stream)
        reader = readers.get(version)
        if reader is None:
            return None
        dtype = reader(stream)[2]
    except _BROKEN:
        return None
    return _code_name(_pickle_globals(stream)) if dtype.hasobject else None


def _refuse_pickled_array(path: Path, kind: str, member: str | None) -> None:
    """Raise the pickled-code refusal if the .npy data (`member` of an .npz) holds objects."""
    try:
        if member is None:
            with path.open("rb") as stream:
                name = _object_array_code(stream)
        else:
            with zipfile.ZipFile(path) as archive, archive.open(member) as stream:
                name = _object_array_code(stream)
    except _BROKEN:
        return
    if name is not None:
        raise _refused(path, kind, name)


def _refuse_plain_pickle(path: Path, kind: str) -> None:
    """A bare pickle (protocol 2+) where arrays were expected: refused, naming its code."""
    with path.open("rb") as stream:
        if stream.read(1) != b"\x80":
            return
        stream.seek(0)
        names = _pickle_globals(stream)
    if names:
        raise _refused(path, kind, _code_name(names))


# --------------------------------------------------------------------------- torch


def read_torch(path: Path, kind: str, required: Sequence[str] = (), *, mmap: bool = False) -> Any:
    """A torch file loaded weights-only on the CPU; with `required`, a dict holding those keys.
    With `mmap` the tensors are mapped, not read: the whole file is checked at little cost."""
    require_file(path, kind)
    with _reading(path, kind, "torch file"), warnings.catch_warnings():
        _expect_zip(path, kind, TORCH)
        # A bare pickle torch would refuse by its first opcode (protocol 4's FRAME), not by its
        # code; the legacy torch format starts with a pickled magic number, which has no globals.
        _refuse_plain_pickle(path, kind)
        # torch warns about an unusual pickle protocol before refusing or loading it
        warnings.simplefilter("ignore")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if required:
        if not isinstance(state, dict):
            raise not_a(path, kind, f"it holds {type(state).__name__}, not a dictionary")
        missing = [key for key in required if key not in state]
        if missing:
            raise not_a(path, kind, f"no {', '.join(map(repr, missing))} entry")
    return state


def read_torchscript(path: Path, kind: str, device: torch.device) -> torch.jit.ScriptModule:
    """A TorchScript archive (its own restricted unpickler: no Python code is imported)."""
    require_file(path, kind)
    _expect_zip(path, kind, TORCHSCRIPT)
    with _reading(path, kind, "TorchScript archive"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, the file is not
        return torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call,no-any-return]


# --------------------------------------------------------------------------- bare pickles


class RefusedGlobal(pickle.UnpicklingError):
    """What a restricted unpickler raises for a global (or a persistent id) it does not load;
    `read_pickle` turns it into the pickled-code refusal naming `name`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unsupported GLOBAL {name}")


def read_pickle(path: Path, kind: str, unpickler: Callable[[IO[bytes]], pickle.Unpickler]) -> Any:
    """A bare pickle read by `unpickler`, a restricted unpickler that imports none of the
    pickle's own code: a global it refuses is the pickled-code refusal, a broken file the
    corrupt one."""
    require_file(path, kind)
    with _reading(path, kind, "pickle"), warnings.catch_warnings():
        holds = _zip_holds(path)
        if holds is not None:
            raise not_a(path, kind, f"it is {holds}, not a pickle")
        warnings.simplefilter("ignore")  # torch's TypedStorage deprecation, for stored tensors
        with path.open("rb") as stream:
            return unpickler(stream).load()


# --------------------------------------------------------------------------- numpy


def _resolve(
    path: Path, kind: str, files: list[str], required: Sequence[str | tuple[str, ...]]
) -> list[str]:
    """The stored name of each required array (a tuple: the first of those present)."""
    found, missing = [], []
    for wanted in required:
        choices = (wanted,) if isinstance(wanted, str) else wanted
        present = next((name for name in choices if name in files), None)
        if present is None:
            missing.append(" or ".join(map(repr, choices)))
        else:
            found.append(present)
    if missing:
        holds = ", ".join(files) or "no arrays"
        raise not_a(path, kind, f"no {', '.join(missing)} array; it holds {holds}")
    return found


def _open_npz(path: Path, kind: str, use: Callable[[np.lib.npyio.NpzFile], T]) -> T:
    require_file(path, kind)
    with _reading(path, kind, ".npz archive"):
        _expect_zip(path, kind, NPZ)
        _refuse_plain_pickle(path, kind)
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise not_a(path, kind, "it is a single .npy array, not an .npz archive")
        with archive:
            return use(archive)


def read_npz(
    path: Path,
    kind: str,
    required: Sequence[str | tuple[str, ...]] = (),
    optional: Sequence[str] = (),
) -> dict[str, Array]:
    """The `required` arrays (a tuple: whichever of those names is present) and those of
    `optional` that are present, by their stored names; no pickled object is ever loaded."""

    def load(archive: np.lib.npyio.NpzFile) -> dict[str, Array]:
        names = _resolve(path, kind, archive.files, required)
        names += [name for name in optional if name in archive.files and name not in names]
        arrays = {}
        for name in names:
            try:
                arrays[name] = archive[name]
            except ValueError:
                _refuse_pickled_array(path, kind, f"{name}.npy")
                raise
        return arrays

    return _open_npz(path, kind, load)


def npz_names(path: Path, kind: str) -> list[str]:
    """The array names an .npz holds, without reading the arrays."""
    return _open_npz(path, kind, lambda archive: list(archive.files))


def read_npy(path: Path, kind: str) -> Array:
    """One .npy array; a pickled object array is refused."""
    require_file(path, kind)
    with _reading(path, kind, ".npy array"):
        _refuse_plain_pickle(path, kind)
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError:
            _refuse_pickled_array(path, kind, None)
            raise
        if isinstance(array, np.lib.npyio.NpzFile):
            array.close()
            raise not_a(path, kind, "it is an .npz archive, not a single .npy array")
        return np.asarray(array)


# --------------------------------------------------------------------------- text and images


def read_text(path: Path, kind: str) -> str:
    """A UTF-8 text file."""
    require_file(path, kind)
    with _reading(path, kind, "UTF-8 text"):
        return path.read_bytes().decode("utf-8")


def read_json(path: Path, kind: str) -> Any:
    """A JSON file."""
    text = read_text(path, kind)
    with _reading(path, kind, "JSON file"):
        return json.loads(text)


def read_image(path: Path, kind: str = "image") -> Image.Image:
    """An image file decoded in full, as RGB."""
    require_file(path, kind)
    with _reading(path, kind, "image"), Image.open(path) as image:
        return image.convert("RGB")
