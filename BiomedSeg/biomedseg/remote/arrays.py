"""Arrays on the wire: a JSON header, blosc2 chunks, a checksum trailer, checked as they arrive; never pickle.

One body = ``MAGIC``, the header's length (4 bytes, little-endian), the header (JSON: shape,
dtype, raw byte count, chunk size), then one record per chunk of ``chunk_bytes`` raw bytes (the
last may be shorter): its compressed length (4 bytes) and the blosc2 chunk; last, the content id
(64 hex characters: sha256 over dtype, shape and bytes). Chunks let both ends work while the
bytes travel: the sender compresses chunk i+1 while chunk i is on the wire and hashes as it goes
(``pack_stream``: the id comes last, so nothing waits for a hash of the whole array first), the
receiver decompresses and hashes each chunk as soon as it is whole (``Unpacker.feed``). The
receiver refuses a body before decompressing anything when the header claims more bytes than it
allows or disagrees with itself, and each chunk before decompressing it when its own sizes are not
the ones the header implies, so a small body cannot expand past the cap. The trailer must match
what arrived: a flipped bit or a short transfer is an error, not a wrong mask.

The content id is also the cache key of the server's array store: an array the server holds is
not sent again.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import struct

import numpy as np

from ..worker.protocol import ALLOWED_DTYPES

MAGIC = b"BMSARR3\n"
#: A header never needs more (a shape, a dtype and three numbers).
MAX_HEADER_BYTES = 4096
#: Raw bytes per chunk: big enough for blosc2 to work well, small enough to overlap work and transfer.
CHUNK_BYTES = 4 << 20
#: codec -> (blosc2 codec name, level): zstd level 1 with byte shuffle (CT-like int16 shrinks 2.5x at
#: hundreds of MB/s per core); lz4 is faster and gains less.
CODECS = {"zstd": ("ZSTD", 1), "lz4": ("LZ4", 1)}
#: the trailer: the content id in hex
ID_BYTES = 64
#: blosc2 adds at most this to a chunk that does not compress
CHUNK_OVERHEAD = 64 + 32


class ArrayFormatError(ValueError):
    """A body that is not a BiomedSeg array, or that disagrees with what it says it holds."""


class ArrayTooLargeError(ArrayFormatError):
    """An array larger, once decompressed, than the receiver accepts."""


def content_id(array: np.ndarray) -> str:
    """sha256 over dtype, shape and the C-ordered bytes (two arrays with the same bytes but another shape
    or dtype are different volumes)."""
    array = np.ascontiguousarray(array)
    digest = _digest(array.dtype.name, array.shape)
    digest.update(_bytes(array))
    return digest.hexdigest()


def _digest(dtype: str, shape) -> "hashlib._Hash":
    return hashlib.sha256(f"{dtype}|{','.join(map(str, shape))}|".encode())


def _bytes(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def pack_stream(array: np.ndarray, *, codec: str = "zstd", known_id: str | None = None):
    """The wire body of ``array`` in pieces: the header, each compressed chunk as soon as it is ready (chunks
    are compressed in parallel, a few ahead of the one being sent), then the content id (``known_id``, or
    hashed chunk by chunk on the way)."""
    import blosc2

    array = np.ascontiguousarray(array)
    if array.dtype.name not in ALLOWED_DTYPES:
        raise ArrayFormatError(f"dtype {array.dtype.name} cannot be sent")
    name, clevel = CODECS[codec]
    header = json.dumps({"shape": list(array.shape), "dtype": array.dtype.name, "nbytes": int(array.nbytes),
                         "chunk_bytes": CHUNK_BYTES, "codec": "blosc2"}).encode()
    yield MAGIC + struct.pack("<I", len(header)) + header
    raw = _bytes(array)
    digest = None if known_id else _digest(array.dtype.name, array.shape)
    cparams = blosc2.CParams(codec=getattr(blosc2.Codec, name), clevel=clevel, typesize=array.dtype.itemsize,
                             nthreads=1, filters=[blosc2.Filter.SHUFFLE])
    starts = range(0, len(raw), CHUNK_BYTES)
    with concurrent.futures.ThreadPoolExecutor(_threads()) as pool:  # blosc2 lets go of the GIL
        ahead = 2 * _threads()
        futures = [pool.submit(blosc2.compress2, raw[s:s + CHUNK_BYTES], cparams=cparams) for s in starts[:ahead]]
        for i, start in enumerate(starts):
            if i + ahead < len(starts):
                s = starts[i + ahead]
                futures.append(pool.submit(blosc2.compress2, raw[s:s + CHUNK_BYTES], cparams=cparams))
            if digest is not None:
                digest.update(raw[start:start + CHUNK_BYTES])  # while the pool compresses what follows
            chunk = futures[i].result()
            futures[i] = None
            yield struct.pack("<I", len(chunk)) + chunk
    yield (known_id or digest.hexdigest()).encode()


def pack(array: np.ndarray, *, codec: str = "zstd", known_id: str | None = None) -> bytes:
    """The whole wire body of ``array`` at once."""
    return b"".join(pack_stream(array, codec=codec, known_id=known_id))


class Unpacker:
    """Reads a body piece by piece (``feed``), decompressing each chunk into the array as soon as it is whole;
    ``finish`` checks that everything came and matches its content id."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.buffer = bytearray()
        self.header: dict | None = None
        self.array: np.ndarray | None = None
        self.raw: memoryview | None = None
        self.offset = 0  # raw bytes written so far
        self.digest = None

    def feed(self, data: bytes) -> None:
        import blosc2

        self.buffer += data
        if self.header is None and not self._read_header():
            return
        start = 0
        while self.offset < len(self.raw) and len(self.buffer) - start >= 4:
            (length,) = struct.unpack_from("<I", self.buffer, start)
            expect = min(self.header["chunk_bytes"], len(self.raw) - self.offset)
            if length > expect + CHUNK_OVERHEAD or length < 16:
                raise ArrayFormatError(f"a chunk claims {length} compressed bytes for {expect} raw ones")
            if len(self.buffer) - start - 4 < length:
                break
            chunk = bytes(self.buffer[start + 4:start + 4 + length])
            try:
                nbytes, cbytes, _ = blosc2.get_cbuffer_sizes(chunk)
            except Exception:  # noqa: BLE001 -- whatever the library cannot read is the sender's fault
                raise ArrayFormatError("a chunk is not a blosc2 chunk") from None
            if nbytes != expect or cbytes != length:
                raise ArrayFormatError(f"a chunk holds {nbytes} bytes in {cbytes}; {expect} in {length} were due")
            target = self.raw[self.offset:self.offset + expect]
            try:
                blosc2.decompress2(chunk, dst=target)
            except Exception as exc:  # noqa: BLE001
                raise ArrayFormatError(f"a chunk cannot be decompressed ({str(exc)[:80]})") from None
            self.digest.update(target)
            self.offset += expect
            start += 4 + length
        del self.buffer[:start]
        if self.offset == len(self.raw) and len(self.buffer) > ID_BYTES:
            raise ArrayFormatError("the body goes on after its checksum")

    def _read_header(self) -> bool:
        if len(self.buffer) < len(MAGIC) + 4:
            return False
        if bytes(self.buffer[:len(MAGIC)]) != MAGIC:
            raise ArrayFormatError("the body is not a BiomedSeg array (wrong or missing magic bytes)")
        (length,) = struct.unpack_from("<I", self.buffer, len(MAGIC))
        if length > MAX_HEADER_BYTES:
            raise ArrayFormatError(f"the array header claims {length} bytes")
        start = len(MAGIC) + 4
        if len(self.buffer) < start + length:
            return False
        self.header = check_header(bytes(self.buffer[start:start + length]), self.max_bytes)
        del self.buffer[:start + length]
        self.array = np.empty(tuple(self.header["shape"]), dtype=self.header["dtype"])
        self.raw = _bytes(self.array)
        self.digest = _digest(self.header["dtype"], self.header["shape"])
        return True

    def finish(self) -> tuple[np.ndarray, dict]:
        """The array and its header (with ``id``, the content id), once the whole body came and adds up."""
        if self.header is None or self.offset != len(self.raw) or len(self.buffer) != ID_BYTES:
            got = 0 if self.raw is None else self.offset
            raise ArrayFormatError(f"the body ended early ({got} of {self.header['nbytes'] if self.header else '?'}"
                                   " bytes, or no checksum)")
        self.header["id"] = bytes(self.buffer).decode("ascii", "replace")
        if self.digest.hexdigest() != self.header["id"]:
            raise ArrayFormatError("the array's checksum does not match: it was damaged on the way")
        if self.array.dtype == bool and self.array.size and self.array.view(np.uint8).max() > 1:
            raise ArrayFormatError("a boolean array holds bytes other than 0 and 1")
        return self.array, self.header


def check_header(text: bytes, max_bytes: int) -> dict:
    """The parsed header, checked for consistency and against ``max_bytes`` (the most uncompressed bytes
    the receiver accepts) before any memory is set aside for it."""
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise ArrayFormatError("the array header is not JSON (or nests too deep)") from None
    if not isinstance(header, dict) or header.get("codec") != "blosc2":
        raise ArrayFormatError("the array header names no known codec")
    shape, dtype, nbytes, chunk = header.get("shape"), header.get("dtype"), header.get("nbytes"), header.get(
        "chunk_bytes")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise ArrayFormatError(f"dtype {str(dtype)[:40]!r} is not allowed")
    if (not isinstance(shape, list) or len(shape) > 5
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 31 for s in shape)):
        raise ArrayFormatError("the array shape is not a list of up to 5 whole numbers")
    need = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes != need:
        raise ArrayFormatError(f"the header says {nbytes} bytes, but {shape} {dtype} holds {need}")
    if need > max_bytes:
        raise ArrayTooLargeError(f"the array would take {need / 2**20:.0f} MiB uncompressed, more than the "
                               f"{max_bytes / 2**20:.0f} MiB allowed")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or not 1024 <= chunk <= 256 << 20:
        raise ArrayFormatError("the array header names no usable chunk size")
    return header


def unpack(body: bytes | memoryview, max_bytes: int) -> tuple[np.ndarray, dict]:
    """The array in a whole ``body`` and its header; an ``ArrayFormatError`` for anything that does not add up."""
    unpacker = Unpacker(max_bytes)
    unpacker.feed(bytes(body))
    return unpacker.finish()
