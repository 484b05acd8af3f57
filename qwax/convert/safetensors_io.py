"""Reader and streaming writer for Hugging Face safetensors checkpoints.

A safetensors file is an 8-byte little-endian header length N, then N bytes of JSON mapping each tensor name
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional ``"__metadata__"`` string map), then
the raw little-endian tensor bytes, with offsets relative to the end of the header.

Reading goes through the ``safetensors`` library (``safe_open(framework="np", backend="pread")``): it validates
every header when a file is opened, lists names, dtypes, shapes and metadata, and reads whole tensors with
positional reads into fresh numpy arrays. Positional reads rather than the default memory map, because every
page a map touches stays resident in the process: streaming a 60 GB checkpoint through a map shows 60 GB of RSS.
qwax adds what the library does not do:

* row ranges (`CheckpointReader.get_slice`): with the pread backend, safetensors 0.8's ``get_slice(k)[a:b]``
  reads the whole tensor and then slices it (measured: a 64-row slice of a 512 MB tensor takes as long as the
  tensor, and peak RSS grows by 512 MB), which would defeat loading a device's shard of an expert stack; the
  rows are therefore read here, one positional read at the offset the (already validated) header gives;
* the fp8 dtypes (F8_E4M3, F8_E5M2 and the FNUZ / E8M0 variants): safetensors 0.8 asks numpy itself for a
  dtype of that name and fails, so those tensors are read the same way and viewed as the ``ml_dtypes`` type.
  The packed sub-byte dtypes (F4, F6_*) have no numpy equivalent and raise a `CheckpointError` when read;
* sharded checkpoints (``model.safetensors.index.json``, every shard checked to exist and to hold its keys);
* errors that name the file, the tensor and the expected value: the library's own messages name neither, so
  when it refuses a file the header is inspected here to say what is wrong (`_diagnose`).

Writing stays here because the library serialises a whole file from tensors held in memory at once, while a
converter produces tensors one at a time: `write_checkpoint` spools each to disk as it arrives, so neither side
needs more host memory than the largest single tensor.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import ml_dtypes  # also registers the name "bfloat16" with numpy, which the library's BF16 reads rely on
import numpy as np
from safetensors import SafetensorError, safe_open

__all__ = [
    "CheckpointError",
    "CheckpointKeyError",
    "CheckpointReader",
    "atomic_directory",
    "write_checkpoint",
    "SINGLE_FILE",
    "INDEX_FILE",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The reference reader rejects larger headers; a garbage length must not make us read gigabytes of JSON.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
# Keyed by the native-order dtype, so big-endian input arrays are byte-swapped before being matched.
_NAMES: dict[np.dtype, str] = {dtype.newbyteorder("="): name for name, dtype in _DTYPES.items()}
# Dtypes the library cannot hand to numpy (it looks them up as numpy attributes): read from their raw bytes.
_RAW_DTYPES = frozenset(name for name in _DTYPES if name.startswith("F8_"))
# Packed sub-byte dtypes the format allows but numpy cannot hold one value per element: bits per value.
_PACKED_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


class CheckpointError(ValueError):
    """A checkpoint directory, index or safetensors file is missing, malformed or inconsistent."""


class CheckpointKeyError(CheckpointError, KeyError):
    """A tensor name is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class _TensorInfo:
    """Where a tensor lives and what it is: its file's handle, safetensors dtype name, shape, rank in file order."""

    __slots__ = ("file", "handle", "dtype_name", "shape", "rank")

    def __init__(self, file: Path, handle: safe_open, dtype_name: str, shape: tuple[int, ...], rank: int):
        self.file, self.handle, self.dtype_name, self.shape, self.rank = file, handle, dtype_name, shape, rank

    @property
    def nbytes(self) -> int:
        bits = _PACKED_BITS.get(self.dtype_name)
        if bits is not None:
            return math.prod(self.shape) * bits // 8
        return math.prod(self.shape) * _DTYPES[self.dtype_name].itemsize


# ------------------------------------------------------------------------------------------ header inspection
class _HeaderProblem(Exception):
    pass


def _read_header(file: Path) -> tuple[dict, int, int]:
    """(header JSON object, absolute offset of the data section, file size); raises _HeaderProblem."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _HeaderProblem(f"truncated safetensors file ({size} bytes, no 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise _HeaderProblem(f"truncated or corrupt safetensors file: header length {header_len} does not "
                                 f"fit in a file of {size} bytes")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _HeaderProblem(f"corrupt safetensors header (not JSON): {e}") from None
    if not isinstance(header, dict):
        raise _HeaderProblem(f"corrupt safetensors header: expected a JSON object, got {type(header).__name__}")
    return header, 8 + header_len, size


def _diagnose(file: Path) -> str | None:
    """What is wrong with a file the library refused, naming the tensor and the expected value (None: nothing
    found here; the library's own message then stands alone)."""
    try:
        header, data_start, size = _read_header(file)
    except _HeaderProblem as e:
        return str(e)
    except OSError as e:
        return f"cannot read safetensors file: {e}"
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return "corrupt safetensors header: __metadata__ is not a map of strings"
    data_size = size - data_start
    spans = []
    for key, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            return f"corrupt header entry for tensor {key!r}: {entry!r}"
        if dtype_name not in _DTYPES and dtype_name not in _PACKED_BITS:
            return f"tensor {key!r} has unknown dtype {dtype_name!r}; safetensors dtypes: " \
                   f"{sorted(_DTYPES) + sorted(_PACKED_BITS)}"
        bits = _PACKED_BITS.get(dtype_name) or _DTYPES[dtype_name].itemsize * 8
        expected = math.prod(shape) * bits // 8
        if any(d < 0 for d in shape) or not 0 <= begin <= end or end - begin != expected:
            return (f"corrupt header entry for tensor {key!r}: data_offsets [{begin}, {end}] do not hold "
                    f"{dtype_name} {list(shape)} ({expected} bytes)")
        if end > data_size:
            return (f"truncated safetensors file: tensor {key!r} needs bytes [{begin}, {end}) of the data "
                    f"section but only {data_size} bytes are present")
        spans.append((begin, end, key))
    covered = 0
    for begin, end, key in sorted(spans):  # the format requires the tensors to tile the data section exactly
        if begin != covered:
            return (f"tensor {key!r} starts at byte {begin} of the data section, expected {covered} (tensors "
                    "must follow each other without gaps or overlaps)")
        covered = end
    if covered != data_size:
        return (f"{data_size - covered} byte(s) after the last tensor: the data section holds {data_size} bytes, "
                f"the header accounts for {covered} (truncated header or trailing garbage)")
    return None


def _open(file: Path) -> safe_open:
    try:
        return safe_open(file, framework="np", backend="pread")
    except SafetensorError as e:
        problem = _diagnose(file) or "corrupt safetensors file"
        raise CheckpointError(f"{file}: {problem} (safetensors: {e})") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read safetensors file: {e}") from e


def _read_index(index_file: Path) -> dict[str, Path]:
    """Returns tensor name -> shard path from an HF ``*.safetensors.index.json``, checking every shard exists."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_file}: cannot parse safetensors index: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index_file}: bad safetensors index: expected an object with a 'weight_map' of file names"
        )
    shards = {}
    for name in sorted(set(weight_map.values())):
        shard = index_file.parent / name
        if not shard.is_file():
            raise CheckpointError(
                f"{index_file}: shard file {name!r} listed in the index is missing from {index_file.parent}"
            )
        shards[name] = shard
    return {key: shards[name] for key, name in weight_map.items()}


def _close(handles: dict[Path, safe_open]) -> None:
    for handle in handles.values():
        handle.__exit__(None, None, None)
    handles.clear()


class CheckpointReader:
    """Random access to the tensors of an HF safetensors checkpoint, one tensor at a time.

    ``path`` is a checkpoint directory (holding ``model.safetensors``, or ``model.safetensors.index.json`` and its
    shards, or exactly one other ``*.safetensors`` file), or a ``.safetensors`` / index file itself. Every file
    is opened and its header validated on construction (a corrupt or truncated file raises `CheckpointError`
    naming it and the tensor at fault); no tensor data is read until ``get``. ``get`` is thread-safe.

        with CheckpointReader("ckpt/") as ckpt:
            for key in ckpt.keys():
                array = ckpt.get(key)   # numpy, exact stored dtype (bf16, fp8 via ml_dtypes)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._infos: dict[str, _TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._handles: dict[Path, safe_open] = {}
        self._raw_offsets: dict[Path, tuple[int, dict]] = {}  # row / fp8 reads: data start, header, per file
        try:
            self._open_all()
        except BaseException:
            self.close()
            raise

    def _open_all(self) -> None:
        files, weight_map, index_file = self._locate(self.path)
        self.files: list[Path] = files
        infos: dict[str, _TensorInfo] = {}
        for file in files:
            handle = self._handles[file] = _open(file)
            self.metadata.update(handle.metadata() or {})
            for rank, key in enumerate(handle.offset_keys()):
                if weight_map is not None and weight_map.get(key) != file:
                    continue  # a shard may hold tensors its index does not list; the index decides
                piece = handle.get_slice(key)
                infos[key] = _TensorInfo(file, handle, piece.get_dtype(), tuple(piece.get_shape()), rank)
        if weight_map is not None:
            for key, shard in weight_map.items():
                if key not in infos:
                    raise CheckpointError(
                        f"{index_file}: tensor {key!r} is mapped to {shard.name!r}, which does not contain it"
                    )
            infos = {key: infos[key] for key in weight_map}  # index order, nothing unlisted
        self._infos = infos

    @staticmethod
    def _locate(path: Path) -> tuple[list[Path], dict[str, Path] | None, Path | None]:
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path} does not exist")
        if path.is_file():
            if path.name.endswith(".index.json"):
                weight_map = _read_index(path)
                return sorted(set(weight_map.values())), weight_map, path
            return [path], None, None
        if (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE], None, None
        if (path / INDEX_FILE).is_file():
            weight_map = _read_index(path / INDEX_FILE)
            return sorted(set(weight_map.values())), weight_map, path / INDEX_FILE
        candidates = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if not candidates:
            raise CheckpointError(f"no safetensors file in {path} (expected {SINGLE_FILE} or {INDEX_FILE})")
        if len(candidates) > 1:
            raise CheckpointError(
                f"{path} holds several safetensors files ({', '.join(p.name for p in candidates)}) but no {INDEX_FILE}"
            )
        return candidates, None, None

    def _info(self, key: str) -> _TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise CheckpointKeyError(f"tensor {key!r} not found in checkpoint {self.path}") from None

    def keys(self) -> list[str]:
        """Tensor names, in index order or file order."""
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info(key).shape

    def dtype(self, key: str) -> np.dtype:
        """The stored numpy dtype (``ml_dtypes.bfloat16`` for BF16, ``ml_dtypes.float8_e4m3fn`` for F8_E4M3)."""
        info = self._info(key)
        if info.dtype_name not in _DTYPES:
            raise CheckpointError(f"{info.file}: tensor {key!r} has dtype {info.dtype_name} (packed "
                                  f"{_PACKED_BITS.get(info.dtype_name, '?')}-bit values), which numpy cannot "
                                  f"hold; qwax reads {sorted(_DTYPES)}")
        return _DTYPES[info.dtype_name]

    def get(self, key: str) -> np.ndarray:
        """Reads one tensor into a new writable numpy array [*shape] of its stored dtype."""
        info = self._info(key)
        dtype = self.dtype(key)
        if info.dtype_name in _RAW_DTYPES:
            return self._read_raw(key, info, dtype, 0, info.shape[0] if info.shape else None)
        try:
            return info.handle.get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {key!r} ({info.dtype_name} "
                                  f"{list(info.shape)}): {e}") from None

    def get_slice(self, key: str, start: int, stop: int) -> np.ndarray:
        """Reads rows ``[start, stop)`` of a tensor's leading axis (``get(key)[start:stop]``, shape
        [stop - start, *shape[1:]]) and nothing else.

        Rows are contiguous in the file, so this is one byte-range read: a process loading its shard of an
        expert stack, or a converter streaming a large tensor in pieces, never holds the whole tensor.
        """
        info = self._info(key)
        if not info.shape:
            raise CheckpointError(f"tensor {key!r} in {info.file} is a scalar and has no leading axis to slice")
        rows = info.shape[0]
        if not 0 <= start <= stop <= rows:
            raise CheckpointError(f"rows [{start}, {stop}) out of range for tensor {key!r} of shape "
                                  f"{list(info.shape)} in {info.file}")
        return self._read_raw(key, info, self.dtype(key), start, stop)

    def _read_raw(self, key: str, info: _TensorInfo, dtype: np.dtype, start: int, stop: int | None) -> np.ndarray:
        """Rows [start, stop) (stop None: a scalar) read as bytes and viewed as `dtype`: row ranges of any tensor,
        and whole tensors of the dtypes the library cannot give to numpy. The library validated the header on
        open; only the offsets are read from it here."""
        if info.file not in self._raw_offsets:
            try:
                header, data_start, _ = _read_header(info.file)
            except (_HeaderProblem, OSError) as e:
                raise CheckpointError(f"{info.file}: cannot read the header again for tensor {key!r}: {e}") from None
            self._raw_offsets[info.file] = (data_start, header)
        data_start, header = self._raw_offsets[info.file]
        shape = info.shape if stop is None else (stop - start,) + info.shape[1:]
        row_bytes = math.prod(info.shape[1:]) * dtype.itemsize
        offset = data_start + int(header[key]["data_offsets"][0]) + start * row_bytes
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(info.file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            done = 0
            while done < len(view):  # one read may return fewer bytes than asked (and at most ~2 GiB on Linux)
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise CheckpointError(f"{info.file}: file shrank while reading tensor {key!r}")
                done += n
        finally:
            os.close(fd)
        return out

    def file_of(self, key: str) -> Path:
        """The file holding tensor ``key``."""
        return self._info(key).file

    def nbytes(self, key: str) -> int:
        """Bytes the tensor occupies in its file."""
        return self._info(key).nbytes

    def keys_in_file_order(self) -> list[str]:
        """Tensor names sorted by file and byte offset: reading in this order is sequential on disk."""
        return sorted(self._infos, key=lambda k: (str(self._infos[k].file), self._infos[k].rank))

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields ``(key, array)`` one tensor at a time, in file and offset order (sequential reads)."""
        for key in self.keys_in_file_order():
            yield key, self.get(key)

    def close(self) -> None:
        _close(self._handles)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors in {len(self.files)} file(s))"


class _ShardWriter:
    """Spools tensors of one shard to per-alignment body files, then writes header + bodies as one file.

    Tensors are grouped by item size (8, 4, 2, 1 bytes, largest first) so every tensor starts at a multiple of
    its item size, as the reference writer guarantees, without buffering the whole shard in memory.
    """

    def __init__(self, directory: Path, name: str):
        self.directory, self.name = directory, name
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}  # key -> (dtype, shape, itemsize, nbytes)
        self.nbytes = 0
        self._bodies: dict[int, tuple[Path, object]] = {}

    def add(self, key: str, array: np.ndarray) -> None:
        itemsize = array.dtype.itemsize
        if itemsize not in self._bodies:
            body = self.directory / f"{self.name}.body{itemsize}"
            self._bodies[itemsize] = (body, open(body, "wb"))
        array.reshape(-1).view(np.uint8).tofile(self._bodies[itemsize][1])
        self.entries[key] = (_NAMES[array.dtype.newbyteorder("=")], list(array.shape), itemsize, array.nbytes)
        self.nbytes += array.nbytes

    def finish(self, metadata: dict[str, str]) -> Path:
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for itemsize in sorted(self._bodies, reverse=True):
            for key, (dtype, shape, size, nbytes) in self.entries.items():
                if size == itemsize:
                    header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                    offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned
        out = self.directory / self.name
        with open(out, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for itemsize in sorted(self._bodies, reverse=True):
                body, handle = self._bodies[itemsize]
                handle.close()
                with open(body, "rb") as src:
                    shutil.copyfileobj(src, f, 16 * 1024 * 1024)
                body.unlink()
            f.flush()
            os.fsync(f.fileno())
        return out

    def abort(self) -> None:
        for body, handle in self._bodies.values():
            handle.close()
            body.unlink(missing_ok=True)


def _as_array(key: object, value: object) -> np.ndarray:
    if not isinstance(key, str):
        raise CheckpointError(f"tensor names must be str, got {key!r}")
    array = np.asarray(value, order="C")
    if array.dtype.newbyteorder("=") not in _NAMES:
        raise CheckpointError(f"tensor {key!r} has dtype {array.dtype}, which safetensors cannot store")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def write_checkpoint(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    *,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Writes tensors as an HF safetensors checkpoint into directory ``path`` (created if missing).

    ``tensors`` is a mapping or an iterable of ``(name, array)`` pairs (numpy, or anything ``np.asarray``
    accepts, e.g. a jax array), consumed one at a time: only one tensor plus spooled file data is held. The
    result is ``model.safetensors``; when ``max_shard_bytes`` is given and the tensor bytes exceed it, shards
    ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json`` (``metadata.total_size``,
    ``weight_map``). A tensor larger than ``max_shard_bytes`` gets a shard of its own.

    Files are written into a hidden temporary directory inside ``path`` and renamed into place only when all
    are complete, the index (or single file) last; checkpoint files from an earlier write that the new set
    does not include are then removed. Other files in ``path`` (config.json, ...) are left alone. To make the
    whole directory appear at once, write everything inside ``atomic_directory``.

    ``metadata`` is stored as the safetensors ``__metadata__`` string map, always with ``format: pt`` so
    transformers accepts the files. Returns the paths written, index last when sharded.
    """
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    header_metadata = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise CheckpointError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
        header_metadata[k] = v
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors

    staging = _make_hidden_dir(path, "safetensors")
    shards: list[_ShardWriter] = []
    finished: list[Path] = []
    try:
        seen: set[str] = set()
        for key, value in items:
            array = _as_array(key, value)
            if key in seen:
                raise CheckpointError(f"tensor {key!r} given twice")
            seen.add(key)
            shard_full = (
                max_shard_bytes is not None
                and shards
                and shards[-1].entries
                and shards[-1].nbytes + array.nbytes > max_shard_bytes
            )
            if not shards or shard_full:
                if shards:
                    finished.append(shards[-1].finish(header_metadata))
                shards.append(_ShardWriter(staging, f"shard{len(shards)}"))
            shards[-1].add(key, array)
        if not shards:
            shards.append(_ShardWriter(staging, "shard0"))
        finished.append(shards[-1].finish(header_metadata))

        if len(shards) == 1:
            names = [SINGLE_FILE]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in shards)},
                "weight_map": {key: names[i] for i, s in enumerate(shards) for key in sorted(s.entries)},
            }
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            index_path = staging / INDEX_FILE
            index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            finished.append(index_path)
            names.append(INDEX_FILE)

        written = []
        for src, name in zip(finished, names):
            os.replace(src, path / name)
            written.append(path / name)
        for stale in _checkpoint_files(path) - set(names):
            (path / stale).unlink()
        _fsync_dir(path)
        return written
    except BaseException:
        for shard in shards:
            shard.abort()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _checkpoint_files(directory: Path) -> set[str]:
    """Names of files in ``directory`` that an HF safetensors checkpoint write owns."""
    names = {SINGLE_FILE, INDEX_FILE}
    return {
        p.name
        for p in directory.iterdir()
        if p.is_file() and (p.name in names or re.fullmatch(r"model-\d+-of-\d+\.safetensors", p.name))
    }


def _make_hidden_dir(parent: Path, tag: str) -> Path:
    """Creates a uniquely named hidden directory in ``parent``, with the umask's usual permissions."""
    while True:
        candidate = parent / f".{tag}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()  # unlike mkdtemp (0700) this honours the umask, so the final directory does too
            return candidate
        except FileExistsError:
            continue


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory next to ``path`` and renames it to ``path`` when the block succeeds.

    On an exception the temporary directory is removed and ``path`` is untouched. An existing ``path`` that is
    not an empty directory raises ``FileExistsError`` (checked before and after the block) unless ``overwrite``;
    then the old ``path`` is first renamed aside, the new directory renamed in, and the old one deleted, so
    ``path`` is either the old or the new complete directory except for the instant between the two renames
    (and the old one is restored if the second rename fails).

        with atomic_directory("out/model") as tmp:
            (tmp / "config.json").write_text(...)
            write_checkpoint(tmp, tensors)
    """
    path = Path(path)

    def check_target() -> None:
        if (path.exists() or path.is_symlink()) and not _is_empty_dir(path) and not overwrite:
            raise FileExistsError(f"{path} already exists and is not empty; pass overwrite=True to replace it")

    check_target()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_hidden_dir(path.parent, path.name)
    try:
        yield tmp
        check_target()
        if _is_empty_dir(path):
            path.rmdir()
        if path.exists() or path.is_symlink():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
