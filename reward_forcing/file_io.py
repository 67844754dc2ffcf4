"""Files on disk, read and written safely: the package's one reader of weight files, one strict loader, one key
normaliser and one atomic writer.

* ``load_torch_file`` / ``load_safetensors_file``: read a weight file on the CPU; a truncated download, a Git LFS
  pointer or a saved error page ends in one line that names the file (``CorruptFileError``), never in a raw
  ``SafetensorError`` or unpickler message. ``torch.load`` always runs with ``weights_only=True``.
* ``normalize_key``: parameter names without the segments that wrappers insert (FSDP, activation checkpointing,
  ``torch.compile``, DDP), so state dicts of wrapped and plain modules compare equal.
* ``load_weights``: strict ``load_state_dict`` with a short summary instead of a line per mismatched key.
* ``temp_sibling`` + ``commit`` (files or folders), ``atomic_write`` (a file object) and ``atomic_save``
  (``torch.save``): a result appears under its final name only when complete; a crash leaves a hidden
  ``.<name>.tmp-XXXXXXXX`` that ``leftover_temps`` finds, and nothing half-written under the final name.

Standard library and torch only, so checkpoint layouts, training, the CLIs and scripts can all stand on it.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

__all__ = [
    "CorruptFileError", "load_torch_file", "load_safetensors_file", "normalize_key", "Mismatch", "load_weights",
    "temp_sibling", "commit", "atomic_write", "atomic_save", "leftover_temps",
]


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
class CorruptFileError(ValueError):
    """A file that exists but does not hold what its name says. The message is one line naming the file."""


_FIX = "re-download it (or save it again, if you wrote it)"


def _not_weights(path: Path) -> str | None:
    """Say what ``path`` is when its first bytes show it is no weight file at all (else None)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "is empty (0 bytes)"
    if head.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer, not the weights (run `git lfs pull` in its repository, or download the file)"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml")):
        return "is a web page or XML document (an error page saved by a failed download?)"
    return None


def _reason(err: BaseException) -> str:
    """The informative part of a loader's error, on one short line."""
    text = str(err)
    if "WeightsUnpickler error:" in text:  # torch wraps the real reason in a page of advice
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else type(err).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _weights_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a file that could hold weights; else the one-line error saying why not."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    problem = _not_weights(path)
    if problem:
        raise CorruptFileError(f"{path} {problem}; {_FIX}")
    return path


def load_torch_file(path: str | os.PathLike, *, mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, memory-mapped when the format allows.

    ``weights_only`` unpickles tensors and plain containers only, so a checkpoint cannot run code. Raises
    ``FileNotFoundError`` for a missing file and ``CorruptFileError`` (one line naming the file) for anything
    unreadable: truncated, corrupt, not a PyTorch file, or holding Python objects other than tensors.
    """
    path = _weights_file(path)
    with open(path, "rb") as f:
        zip_format = f.read(4) == b"PK\x03\x04"  # torch.save's format since 1.6; older files cannot be mmapped
    if zip_format and not zipfile.is_zipfile(path):
        raise CorruptFileError(f"{path} is not a valid PyTorch checkpoint (truncated or corrupt: the zip "
                               f"archive has no index at its end); {_FIX}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zip_format)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise CorruptFileError(
                f"{path} contains Python objects other than tensors ({found.group(1)}), which a weights-only load "
                f"refuses so that no code runs from a checkpoint; save only the state dicts, e.g. "
                f"torch.save(ckpt['generator'], 'generator.pt')") from None
        raise CorruptFileError(f"{path} is not a valid PyTorch checkpoint (truncated or corrupt: "
                               f"{_reason(err)}); {_FIX}") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (RuntimeError, OSError, EOFError, ValueError, IndexError, KeyError, zipfile.BadZipFile) as err:
        raise CorruptFileError(f"{path} is not a valid PyTorch checkpoint (truncated or corrupt: "
                               f"{_reason(err)}); {_FIX}") from None


def load_safetensors_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one ``.safetensors`` file on the CPU; ``CorruptFileError`` (naming the file) if unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _weights_file(path)
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise CorruptFileError(f"{path} is not a valid safetensors file (truncated or corrupt: {_reason(err)}); "
                               f"{_FIX}") from None


# --------------------------------------------------------------------------------------------------
# Key names
# --------------------------------------------------------------------------------------------------
# Segments that wrappers insert anywhere in a parameter name: FSDP1, activation checkpointing, torch.compile.
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
_DDP_PREFIX = "module"  # DistributedDataParallel / DataParallel wrap the whole model as ``.module``


def normalize_key(key: str, strip_prefix: str = "") -> str:
    """``key`` without wrapper segments, a leading DDP ``module.``, then one leading ``strip_prefix``.

    ``normalize_key("model._fsdp_wrapped_module.blocks.0.ffn.0.weight", "model.")`` -> ``"blocks.0.ffn.0.weight"``.
    ``strip_prefix`` is a checkpoint layout's own prefix (the reference wrapper stores the DiT as ``model``).
    """
    parts = [s for s in key.split(".") if s not in _WRAPPER_SEGMENTS]
    if len(parts) > 1 and parts[0] == _DDP_PREFIX:
        parts = parts[1:]
    key = ".".join(parts)
    if strip_prefix and key.startswith(strip_prefix):
        key = key[len(strip_prefix):]
    return key


# --------------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------------
@dataclass
class Mismatch:
    """What did not fit between a module and a state dict (given to ``load_weights``'s ``explain``)."""

    expected: Mapping[str, torch.Tensor]
    given: Mapping[str, torch.Tensor]
    missing: list[str]
    unexpected: list[str]
    shapes: list[str]


_SHOW = 5  # how many names of each kind an error message lists


def _first(names, n: int = _SHOW) -> str:
    names = sorted(names)
    shown = ", ".join(names[:n])
    return shown + (f", ... (+{len(names) - n} more)" if len(names) > n else "")


def load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
                 what: str = "model", source: str | os.PathLike | None = None, optional: Collection[str] = (),
                 explain: Callable[[Mismatch], str] | None = None):
    """Load ``state_dict`` into ``module``; on a mismatch raise one short RuntimeError that summarises it.

    Shapes are compared before calling ``load_state_dict`` (which would print a line per key, hundreds for a
    wrong-size checkpoint), and a wrong shape is an error even when ``strict=False``. Keys in ``optional`` may be
    missing. A module on the meta device is filled with ``assign=True`` (floating tensors cast to the dtype it
    declares, as ``load_state_dict`` does for a materialised module); weights it would miss are an error, since
    they would stay uninitialised. ``explain`` turns the mismatch into a "likely cause" line for the message.

    Returns the ``(missing_keys, unexpected_keys)`` named tuple of ``load_state_dict``.
    """
    expected = module.state_dict()
    given = dict(state_dict)
    missing = [k for k in expected if k not in given and k not in optional]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(given[k].shape)} vs module {tuple(expected[k].shape)}"
              for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    on_meta = any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))
    meta_left = on_meta and bool(missing)

    if shapes or (strict and (missing or unexpected)) or meta_left:
        src = f" from '{source}'" if source is not None else ""
        lines = [f"cannot load {what} weights{src}: {len(missing)} missing, {len(unexpected)} unexpected, "
                 f"{len(shapes)} with a wrong shape (the module expects {len(expected)} keys; the checkpoint has "
                 f"{len(given)})."]
        if missing:
            lines.append(f"  missing: {_first(missing)}")
        if unexpected:
            lines.append(f"  unexpected: {_first(unexpected)}")
        if shapes:
            lines.append("  shape mismatches: " + "; ".join(shapes[:_SHOW])
                         + (f"; ... (+{len(shapes) - _SHOW} more)" if len(shapes) > _SHOW else ""))
        if meta_left:
            lines.append("  the module is on the meta device, so missing weights would stay uninitialised.")
        if explain is not None:
            lines.append("  " + explain(Mismatch(expected, given, missing, unexpected, shapes)))
        raise RuntimeError("\n".join(lines))

    if on_meta:
        for k, t in expected.items():
            if k in given and given[k].is_floating_point() and given[k].dtype != t.dtype:
                given[k] = given[k].to(t.dtype)
    return module.load_state_dict(given, strict=strict and not optional, assign=on_meta)


# --------------------------------------------------------------------------------------------------
# Atomic writing
# --------------------------------------------------------------------------------------------------
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.tmp-[a-z0-9_]{8}(\.[A-Za-z0-9]+)?")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_sibling(path: str | os.PathLike, *, suffix: str = "", directory: bool = False) -> Path:
    """Create an empty hidden ``.<name>.tmp-XXXXXXXX<suffix>`` file (or folder) next to ``path`` and return it.

    Write the result there, then ``commit`` it. Same folder, so the final rename is atomic; created exclusively,
    so concurrent writers never share one; ordinary permissions (not the private 0600 of ``mkstemp``). ``suffix``
    keeps an extension that a tool reads (ffmpeg picks the mp4 muxer from ``.mp4``).
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if directory:
        tmp = tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix)
        os.chmod(tmp, 0o777 & ~_umask())
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def _fsync(path: Path) -> None:
    """Flush a file's data (errors such as a full disk surface here) or a folder's entries to disk."""
    if path.is_dir():
        try:  # not every platform / file system can fsync a folder; the rename is atomic all the same
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
        return
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move a finished ``tmp`` (from ``temp_sibling``) to ``path``, replacing what was there; return ``path``.

    The data is flushed to disk first, so a power cut leaves either the old or the new result. A folder that
    already exists at ``path`` is moved aside to ``.<name>.old-XXXXXXXX``, replaced, then deleted (put back if the
    replacement fails). The contents of a folder are the writer's to flush; this flushes the folder's entries.
    """
    tmp, path = Path(tmp), Path(path).expanduser()
    _fsync(tmp)
    if tmp.is_dir() and path.is_dir():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))  # a complete earlier version
        os.rmdir(old)  # only its unique name is needed
        path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            old.rename(path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync(path.parent)
    return path


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """``open(path, mode)`` that publishes the file only if the ``with`` block completes.

    >>> with atomic_write("ckpt/model.pt") as f:
    ...     torch.save(state, f)

    An exception (a full disk, Ctrl-C) deletes the temporary file and leaves any previous ``path`` untouched.
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write writes new files; mode must start with 'w', got {mode!r}")
    path = Path(path).expanduser()
    tmp = temp_sibling(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through ``atomic_write``: ``path`` holds the previous file (or nothing) until the
    new one is complete."""
    with atomic_write(path) as f:
        torch.save(obj, f)
    return Path(path).expanduser()


def leftover_temps(folder: str | os.PathLike) -> dict[Path, str]:
    """Temporary files and folders of ``temp_sibling`` in ``folder`` -> the name each was to be committed as.

    Anything listed was left by a writer that was killed (or is still running, in another process).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for p in folder.iterdir():
        m = _TEMP_NAME.fullmatch(p.name)
        if m:
            found[p] = m.group("target")
    return dict(sorted(found.items()))
