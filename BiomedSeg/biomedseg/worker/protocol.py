"""What crosses between the client (Slicer, CLI) and the worker process.

Control messages are single JSON lines (small, human-readable in logs). Voxel data
never goes through the pipe: the client allocates named shared-memory blocks for the
input volume and for the output masks, the worker maps them, and the client -- the only
owner -- unlinks them when the job ends, whatever way it ends.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import sys
import threading
from multiprocessing import shared_memory

import numpy as np

from ..results import jsonable  # noqa: F401  (re-exported: what crosses the pipe)

#: Bumped whenever a message changes meaning; client and worker must agree (``check_handshake``).
PROTOCOL_VERSION = 2
#: A control line larger than this is refused (voxels never travel as JSON).
MAX_MESSAGE_BYTES = 1 << 20
#: Shared-memory names: prefix + owner pid, so leftovers of a dead owner can be swept.
SHM_PREFIX = "bmseg"
_NAME_RE = re.compile(rf"{SHM_PREFIX}_(\d+)_[0-9a-f]+")  # always fullmatch: no trailing newline slips through
_TRACKER_LOCK = threading.Lock()
ALLOWED_DTYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64", "bool", "int64",
                  "uint64", "float16"}


class ProtocolError(ValueError):
    """A message that does not follow the protocol (answered with a bad_input error)."""


def encode(message: dict) -> bytes:
    data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return data + b"\n"


def decode(line: bytes | str) -> dict:
    if len(line) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(line)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"message is not valid JSON ({exc})") from None
    if not isinstance(message, dict):
        raise ProtocolError("message must be a JSON object")
    return message


# ---- handshake -------------------------------------------------------------------------

def _version_tuple(text) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.+-]", str(text or "0")))


def check_handshake(ready: dict, version: str, engine_root: str, python: str) -> str | None:
    """None when the worker that sent ``ready`` runs this client's engine (same protocol, version and
    folder), else a sentence that says which side is out of date, or which copy shadows which."""
    theirs = ready.get("protocol")
    their_version = ready.get("version", "unknown")
    where = ready.get("engine_root") or "an unknown location"
    if theirs == PROTOCOL_VERSION and their_version == version:
        if _same_folder(where, engine_root):
            return None
        return (f"The worker Python '{python}' imported the BiomedSeg engine from {where}, not from {engine_root} "
                "like this side: another copy (a checkout or an installed package) shadows this one there. "
                "Remove or update that copy, or start from a folder that holds none.")
    side = "worker" if _version_tuple(their_version) < _version_tuple(version) else "client"
    what = (f"The worker Python '{python}' runs BiomedSeg {their_version} (protocol {theirs or 1}) from {where}, "
            f"but this side is BiomedSeg {version} (protocol {PROTOCOL_VERSION}) from {engine_root}.")
    if side == "worker":
        todo = ("The worker is out of date: update BiomedSeg in that Python environment (or remove the old copy "
                "that shadows this one), or choose another worker Python.")
    else:
        todo = ("This side is older than the worker: update the BiomedSeg extension or checkout here (and restart "
                "Slicer), or choose a worker Python with this version.")
    return what + " " + todo


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


# ---- shared memory ---------------------------------------------------------------------

def new_block_name() -> str:
    return f"{SHM_PREFIX}_{os.getpid()}_{secrets.token_hex(6)}"


def create_block(nbytes: int) -> shared_memory.SharedMemory:
    """A new block owned by this process (unlink it with ``release``)."""
    return shared_memory.SharedMemory(name=new_block_name(), create=True, size=max(1, int(nbytes)))


def block_owner(name) -> int | None:
    """The pid a block name says created it, or None when it is not a BiomedSeg block name."""
    match = _NAME_RE.fullmatch(name.lstrip("/")) if isinstance(name, str) else None
    return int(match.group(1)) if match else None


def attach_block(name: str, owner_pid: int | None = None) -> shared_memory.SharedMemory:
    """Map a block someone else owns, without taking ownership; with ``owner_pid``, only that process's.

    Python < 3.13 registers attached blocks with this process's resource tracker, which
    would unlink them when this process exits; the owner must stay the only one to unlink.
    """
    owner = block_owner(name)
    if owner is None:
        raise ProtocolError(f"{str(name)[:80]!r} is not a BiomedSeg shared-memory block name")
    if owner_pid is not None and owner != owner_pid:
        raise ProtocolError(f"block '{name}' is not one of this client's (process {owner_pid})")
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    # Python 3.11/3.12 (cpython issue 82300): registering would also start a tracker
    # process here. Skip the registration for this one call.
    from multiprocessing import resource_tracker

    with _TRACKER_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = register


class BlockPool:
    """Client-owned blocks reused from job to job.

    Touching fresh shared pages costs several times the copy itself (page faults on both
    sides), so blocks go back to the pool after a job instead of being unlinked. Idle
    blocks beyond ``max_idle_bytes`` are unlinked, oldest first; their names are returned so
    the worker can be told to drop its mappings.
    """

    def __init__(self, max_idle_bytes: int | None = None):
        if max_idle_bytes is None:
            max_idle_bytes = int(float(os.environ.get("BIOMEDSEG_SHM_POOL_MB", "1024")) * 2**20)
        self.max_idle_bytes = max_idle_bytes
        self.idle: list[shared_memory.SharedMemory] = []
        self.in_use: dict[str, shared_memory.SharedMemory] = {}

    def acquire(self, nbytes: int) -> shared_memory.SharedMemory:
        nbytes = max(1, int(nbytes))
        fitting = [b for b in self.idle if nbytes <= b.size <= 2 * nbytes + (1 << 20)]
        if fitting:
            block = min(fitting, key=lambda b: b.size)
            self.idle.remove(block)
        else:
            block = create_block(nbytes)
        self.in_use[block.name] = block
        return block

    def give_back(self, block: shared_memory.SharedMemory) -> list[str]:
        self.in_use.pop(block.name, None)
        self.idle.append(block)
        removed = []
        while self.idle and sum(b.size for b in self.idle) > self.max_idle_bytes:
            oldest = self.idle.pop(0)
            removed.append(oldest.name)
            release(oldest)
        return removed

    def names(self) -> set[str]:
        return {b.name for b in self.idle} | set(self.in_use)

    def close(self) -> list[str]:
        names = sorted(self.names())
        for block in self.idle + list(self.in_use.values()):
            release(block)
        self.idle, self.in_use = [], {}
        return names


class AttachedBlocks:
    """Worker side: mappings of the client's blocks, kept while the client reuses them."""

    def __init__(self, limit: int = 16, owner_pid: int | None = None):
        self.limit = limit
        #: the client's pid: only its blocks are mapped (None: any BiomedSeg block, for tools and tests)
        self.owner_pid = owner_pid
        self.blocks: dict[str, shared_memory.SharedMemory] = {}

    def get(self, name: str) -> shared_memory.SharedMemory:
        block = self.blocks.pop(name, None)
        if block is None:
            block = attach_block(name, self.owner_pid)
        self.blocks[name] = block  # most recent last
        while len(self.blocks) > self.limit:
            release(self.blocks.pop(next(iter(self.blocks))), unlink=False)
        return block

    def forget(self, names) -> None:
        for name in names:
            block = self.blocks.pop(name, None)
            if block is not None:
                release(block, unlink=False)


def release(block: shared_memory.SharedMemory | None, unlink: bool = True) -> None:
    if block is None:
        return
    try:
        block.close()
    except BufferError:
        pass  # a numpy view is still alive; the mapping goes when it is collected
    if unlink:
        try:
            block.unlink()
        except FileNotFoundError:
            pass


def array_spec(block: shared_memory.SharedMemory, shape, dtype) -> dict:
    return {"shm": block.name, "shape": [int(s) for s in shape], "dtype": np.dtype(dtype).name}


def view(block: shared_memory.SharedMemory, spec: dict) -> np.ndarray:
    """numpy view of a block described by ``spec``, checked against the block's size."""
    dtype, shape = check_spec(spec)
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if need > block.size:
        raise ProtocolError(f"array {shape} {dtype} needs {need} bytes but the block holds {block.size}")
    return np.ndarray(shape, dtype=dtype, buffer=block.buf)


def check_spec(spec) -> tuple[np.dtype, tuple[int, ...]]:
    if not isinstance(spec, dict) or not {"shm", "shape", "dtype"} <= spec.keys():
        raise ProtocolError("array description needs 'shm', 'shape' and 'dtype'")
    if spec["dtype"] not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype '{spec['dtype']}' is not allowed")
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape) or len(shape) > 5:
        raise ProtocolError(f"shape {shape!r} is not a list of up to 5 non-negative integers")
    return np.dtype(spec["dtype"]), tuple(shape)


def list_blocks(owner_pid: int | None = None) -> list[str]:
    """BiomedSeg blocks currently in /dev/shm (Linux), all or those of one process; empty where the OS
    has no such folder."""
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if block_owner(n) is not None and owner_pid in (None, block_owner(n)))


def sweep_stale_blocks() -> list[str]:
    """Unlink blocks whose owner process no longer exists (after a client crash)."""
    import psutil

    removed = []
    for name in list_blocks():
        pid = block_owner(name)
        if not psutil.pid_exists(pid):
            try:
                os.unlink(os.path.join("/dev/shm", name))
                removed.append(name)
            except OSError:
                pass
    return removed
