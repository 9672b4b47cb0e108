"""Crash-safe file writes and safetensors helpers.

Every file the project writes goes to a temporary name in the same directory, is
fsynced, then renamed over the target; the directory is fsynced afterwards so the
rename itself is durable. Readers therefore see either the old file or the new one.
Only safetensors and JSON are ever read back: nothing is unpickled.

Output directories (:func:`atomic_dir`) never replace something the project did not
write: an existing target is replaced only if it looks like an earlier output of the
same kind, else :class:`~metarlhf.errors.ConfigError`. What is written gets the usual
permissions (``0o666``/``0o777`` minus the process umask), not the private ones of
``mkstemp``/``mkdtemp``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metarlhf.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The first of ``path`` and its parents that exists and is not a directory, or None."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if os.path.lexists(p) and not p.is_dir()), None)


def temp_target_name(name: str) -> str:
    """The file an atomic write's temp file ``.<name>.<random>.tmp`` stands for (left by an
    interrupted write); any other name is returned as it is."""
    if name.startswith(".") and name.endswith(".tmp"):
        return name[1:].removesuffix(".tmp").rpartition(".")[0]
    return name


def check_tensors(tensors: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: str | os.PathLike,
                  hint: str) -> None:
    """ModelError unless every name of ``shapes`` is in ``tensors`` with that shape (a
    checkpoint ``path`` read back for resuming; ``hint`` says what a mismatch suggests)."""
    for key, shape in shapes.items():
        if key not in tensors or tuple(tensors[key].shape) != tuple(shape):
            why = "lacks" if key not in tensors else f"holds another shape {tuple(tensors[key].shape)} of"
            raise ModelError(f"checkpoint {path} {why} {key} (expected {tuple(shape)}): {hint}")


def _make_parent(path: Path) -> None:
    """Create ``path``'s parent directories, each made durable in its own parent (fsync), so
    that a power loss cannot drop a new directory and the file renamed into it; a
    ConfigError if a component is a file."""
    missing = [d for d in [path.parent, *path.parent.parents] if not os.path.lexists(d)]
    try:
        for d in reversed(missing):  # outermost first
            d.mkdir(exist_ok=True)
            fsync_dir(d.parent)
        if not path.parent.is_dir():
            raise NotADirectoryError(path.parent)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = file_in_the_way(path.parent) or path.parent
        raise ConfigError(f"cannot write {str(path)!r}: {str(blocker)!r} is a file, not a directory") from e


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames inside it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"cannot write the file {str(path)!r}: a directory of that name exists")
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except IsADirectoryError as e:  # a directory appeared there meanwhile
            raise ConfigError(f"cannot write the file {str(path)!r}: a directory of that name exists") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a dict of tensors as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    return load_file(str(path), device=device)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_results_out(out: str | os.PathLike, keys: tuple[str, ...], what: str,
                      extra_json: dict[Path, tuple[str, ...]] | None = None) -> None:
    """Raise :class:`ConfigError` unless an evaluation may write its results JSON ``out``,
    the plot ``out`` with suffix ``.png``, and the JSON files ``extra_json``.

    Each file that exists must be an earlier output of the same command: a results JSON an
    object with all of its ``keys``, the plot a PNG. So ``--out`` naming a data file, a source
    file or anything else the command did not write is refused before any work, not
    overwritten at the end.
    """
    out = Path(out)
    if out.suffix.lower() == ".png":
        raise ConfigError(f"out {str(out)!r}: the results JSON cannot end in .png (the plot goes next to it "
                          "with that suffix)")

    def is_json_with(need: tuple[str, ...]) -> Callable[[Path], bool]:
        def ok(path: Path) -> bool:
            try:
                obj = json.loads(path.read_bytes())
            except (OSError, ValueError):
                return False
            return isinstance(obj, dict) and all(k in obj for k in need)
        return ok

    def is_png(path: Path) -> bool:
        with open(path, "rb") as f:
            return f.read(len(PNG_MAGIC)) == PNG_MAGIC

    checks = {out: (is_json_with(keys), "JSON"), out.with_suffix(".png"): (is_png, "PNG")}
    checks.update({Path(p): (is_json_with(k), "JSON") for p, k in (extra_json or {}).items()})
    for path, (ok, kind) in checks.items():
        if not os.path.lexists(path):
            continue
        if path.is_symlink() or not path.is_file():
            why = "it is not a regular file"
        elif not ok(path):
            why = f"it is not a {kind} file of that kind"
        else:
            continue
        raise ConfigError(f"refusing to replace {str(path)!r}: {why}, not {what}; choose another --out "
                          "or remove it first")


def _check_replaceable(target: Path, replaceable: Callable[[Path], bool] | None, new: set[str] | None,
                       what: str) -> None:
    """Raise ConfigError unless ``target`` is missing or may be replaced (see :func:`atomic_dir`)."""
    if target.is_symlink() or (os.path.lexists(target) and not target.is_dir()):
        kind = "a symbolic link" if target.is_symlink() else "a file"
        raise ConfigError(f"refusing to replace {str(target)!r}: it is {kind}, not {what}")
    if not target.is_dir() or (replaceable is None and new is None):
        return  # the default test needs the new names: it runs again just before the swap
    try:
        ok = replaceable(target) if replaceable is not None else all(p.name in new for p in target.iterdir())
    except OSError as e:
        raise ConfigError(f"refusing to replace {str(target)!r}: cannot list it: {e}") from e
    if not ok:
        raise ConfigError(
            f"refusing to replace {str(target)!r}: it exists and is not {what} written by metarlhf "
            "(it holds other files); choose another path or remove it first"
        )


def check_output_dir(target: str | os.PathLike, replaceable: Callable[[Path], bool] | None = None,
                     what: str = "an output directory") -> None:
    """Raise :class:`ConfigError` now if :func:`atomic_dir` would refuse ``target``.

    Lets a command check its ``--out`` before a long run rather than after it.
    """
    target = Path(target)
    _check_replaceable(target, replaceable, None, what)
    if not os.path.lexists(target):
        blocker = file_in_the_way(target.parent)
        if blocker is not None:
            raise ConfigError(f"cannot write {str(target)!r}: {str(blocker)!r} is a file, not a directory")


def check_apart(out: str | os.PathLike, side: str | os.PathLike, what: str, flag: str) -> None:
    """Raise :class:`ConfigError` if directory ``side`` (a command's ``what``, set by ``flag``)
    and ``out`` are the same or one lies inside the other: writing one would clobber the other."""
    a, b = os.path.abspath(out), os.path.abspath(side)
    if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
        raise ConfigError(f"the {what} {str(side)!r} and the output {str(out)!r} must not be the same "
                          f"or inside one another; choose another {flag}")


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _recover_aside(target: Path) -> None:
    """Undo a replace interrupted between its two renames: put the old output back."""
    old = _aside(target)
    if old.is_dir() and not old.is_symlink() and not os.path.lexists(target):
        log.warning("%s is missing but %s is there (an interrupted replace): restoring it", target, old)
        os.replace(old, target)
        fsync_dir(target.parent)


@contextmanager
def atomic_dir(target: str | os.PathLike, replaceable: Callable[[Path], bool] | None = None,
               what: str = "an output directory") -> Iterator[Path]:
    """Build a directory under a temp name, then rename it into place.

    Yields the temp directory. On success its files are fsynced and the directory is
    renamed to ``target``. On any error the temp directory is removed, so no
    half-written output is ever left behind.

    An existing ``target`` directory is replaced only if ``replaceable(target)`` says so;
    by default, only if every entry in it is also among the top-level names just
    written (an earlier output of the same kind; an empty directory too). Files,
    symbolic links and other directories raise :class:`ConfigError` and are left as
    they are. The old directory is moved aside to ``.<name>.old`` during the swap; one
    left there by a crash is restored if ``target`` is missing.
    """
    target = Path(target)
    _make_parent(target)
    _recover_aside(target)
    _check_replaceable(target, replaceable, None, what)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        new = {p.name for p in tmp.iterdir()}
        if os.path.lexists(target):
            # Replace an earlier output: move it aside first, then swap, then remove it.
            _check_replaceable(target, replaceable, new, what)
            old = _aside(target)
            if os.path.lexists(old):  # left by a crash after a completed swap
                _check_replaceable(old, replaceable, new, what)
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
