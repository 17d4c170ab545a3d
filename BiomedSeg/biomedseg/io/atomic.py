"""Outputs are never half-written and never replace a file without leave, and say why when they fail.

Every writer fills a temporary sibling with a name of its own (so two writers never share one)
and the same ending (so format-by-name libraries pick the right format), then puts it in
place in one step: ``os.replace`` when replacing is allowed, a hard link otherwise, which fails
if the name exists -- even when someone else created it while the model ran. ``check_target``
runs the same checks before any work, so a bad path costs nothing. Operating-system errors
become one sentence naming the path and what to do (``InputError``: exit 2).
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import InputError


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for double in (".nii.gz", ".seg.nrrd", ".labels.json", ".labels.csv"):
        if name.endswith(double):
            return path.name[-len(double):]
    return path.suffix


def os_error(path: Path, exc: OSError) -> InputError:
    """A sentence for what the operating system said about writing ``path``."""
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        return InputError(f"Cannot write '{path}': permission denied.", hint="Choose a folder you can write to.")
    if code == errno.EROFS:
        return InputError(f"Cannot write '{path}': the disk is read-only.", hint="Choose another folder.")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return InputError(f"Cannot write '{path}': the disk is full.", hint="Free some space or write elsewhere.")
    if code == errno.EISDIR:
        return InputError(f"Cannot write '{path}': it is a folder.", hint="Give a file name.")
    if code in (errno.ENOENT, errno.ENOTDIR):
        return InputError(f"Cannot write '{path}': its folder does not exist.", hint="Create it or choose another.")
    return InputError(f"Cannot write '{path}': {exc.strerror or exc}.", hint="Choose another place to write.")


def check_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work, a target that would fail or would replace a file without ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"Cannot write '{path}': it is a folder.", hint="Give a file name.")
    if os.path.lexists(path) and not overwrite:  # a link counts, even one that points nowhere
        what = " (a symbolic link)" if path.is_symlink() else ""
        raise InputError(f"'{path}' already exists{what}.", hint="Choose another name or pass --overwrite.")
    folder = path.parent
    while not folder.exists():  # the nearest folder that exists must let us create the rest
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"Cannot write '{path}': '{folder}' is a file, not a folder.", hint="Choose another path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"Cannot write '{path}': '{folder}' is not writable.", hint="Choose a folder you can write to.")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool = False) -> Path:
    """``write(tmp)`` fills a unique temporary sibling of ``path``; then it takes ``path``'s place in one
    step. Without ``overwrite`` an existing ``path`` is never replaced. Nothing is left on failure."""
    return atomic_write_all([(path, write)], overwrite)[0]


def _new_file_mode(path: Path, overwrite: bool) -> int:
    """What the file's permissions would be had it been opened plainly: the umask's, or the replaced file's."""
    if overwrite and path.exists():
        return stat.S_IMODE(path.stat().st_mode)
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_all(items: list, overwrite: bool = False) -> list[Path]:
    """Several files that belong together (a labelmap and its label tables): every one is written to its
    temporary name first, and only then are they all put in place, so a full disk leaves none of them."""
    paths = [check_target(path, overwrite) for path, _ in items]
    temps: list[Path] = []
    placed: list[Path] = []
    try:
        for path, (_, write) in zip(paths, items):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial" + _suffix(path))
            os.fchmod(fd, _new_file_mode(path, overwrite))
            os.close(fd)
            temps.append(Path(name))
            write(temps[-1])
        for path, tmp in zip(paths, temps):
            if overwrite:
                os.replace(tmp, path)
            else:
                _place_new(tmp, path)
                placed.append(path)
    except OSError as exc:
        _remove(placed)
        raise os_error(paths[len(temps) - 1] if temps else paths[0], exc) from None
    except BaseException:
        _remove(placed)
        raise
    finally:
        _remove(temps)  # gone already when placed; never hide the first error behind a failed clean-up
    return paths


def _remove(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except OSError:
            pass


def _place_new(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` only if ``path`` does not exist (no window where another file is replaced)."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise InputError(f"'{path}' appeared while this ran (another program wrote it); it was not replaced.",
                         hint="Choose another name or pass --overwrite.") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
    try:  # a file system without hard links: claim the name first, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise InputError(f"'{path}' appeared while this ran (another program wrote it); it was not replaced.",
                         hint="Choose another name or pass --overwrite.") from None
    os.replace(tmp, path)
