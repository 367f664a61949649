"""Checkpoints that are atomic, pickle-free and checksummed.

A checkpoint is one file: an uncompressed zip archive, so ``unzip -l`` lists it.

    manifest.json          format name and version, the user's metadata, and for
                           every array its shape, dtype and SHA-256 of its bytes
    arrays/<name>.npy      one array in NumPy's .npy format, written with
                           allow_pickle=False

Why not ``numpy.savez`` + ``numpy.load``? ``numpy.load`` can run pickled code
when asked to, and neither records checksums. Here reading never unpickles:
numeric dtypes only, ``allow_pickle=False`` on both sides.

Reading trusts nothing in the file before checking it against the file itself, so that a crafted
checkpoint (``sample --checkpoint`` of a file from anywhere) cannot make minipar allocate more
than the file's size: every entry must be stored uncompressed (a compressed entry's unpacked size
is bounded by nothing: a 1.8 MB "zip bomb" once took 3.6 GB), its declared size must lie inside
the file, its name must be ``manifest.json`` or ``arrays/<allowed name>.npy`` (no ``..``, no
absolute path), and each array's .npy header must declare the shape and dtype of the manifest
and exactly the bytes the entry holds, all before the array is allocated.

Atomic: the file is written under a temporary name in the same folder, flushed
to disk (fsync), then renamed over the target with ``os.replace``. A rename
within one file system is atomic on POSIX, so a reader sees the old checkpoint
or the new one, never half of one -- a crash mid-save leaves the old file as it
was.

Building blocks for distributed checkpoints: ``write_array_file`` and
``read_array_file`` are exactly the single-file format above, so each rank can
write its shard with them; ``write_json_atomic`` writes a shared index (which
shard holds which slice of which global array) the same atomic way. A loader
for another parallel layout reads the index, reads the shards it needs, and
re-slices.
"""
import hashlib
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

# Files live in host memory: this module turns backend arrays into NumPy arrays
# (via to_host) to serialise them, and does no compute with them.
import numpy
import numpy.lib.format as npy_format

from minipar.backend import from_host, to_host
from minipar.errors import CheckpointError

FORMAT_NAME = "minipar-arrays"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ZIP_MAGIC = b"PK\x03\x04"
# bool, signed and unsigned integers, floats, complex: the kinds with no Python objects inside.
STORABLE_KINDS = "biufc"
# Dotted names like "blocks.0.attention.weight"; '/' separates groups; no '.' or '..' parts.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*")


def sha256_of(array):
    """SHA-256 of an array's bytes in C order (what the manifest records)."""
    return hashlib.sha256(array.reshape(-1).view("u1")).hexdigest()


def _host_array(name, value):
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise CheckpointError(f"array name {name!r} is not allowed; use letters, digits, '_', '.', '-', '/'")
    array = to_host(value)
    if array.dtype.kind not in STORABLE_KINDS:
        raise CheckpointError(
            f"array {name!r} has dtype {array.dtype}; checkpoints store numeric arrays only "
            "(object and string arrays would need pickle, which minipar never uses)")
    # Not ascontiguousarray: it turns a 0-d array into shape (1,).
    return array if array.flags.c_contiguous else array.copy(order="C")


# Every entry gets ZIP's earliest time, not the clock's: the same arrays always make the same bytes.
ENTRY_TIME = (1980, 1, 1, 0, 0, 0)


def _write_entry(archive, name, array):
    with archive.open(zipfile.ZipInfo(f"arrays/{name}.npy", ENTRY_TIME), "w", force_zip64=True) as entry:
        npy_format.write_array(entry, array, allow_pickle=False)


def default_mode(folder=False):
    """The permissions ``open``/``mkdir`` would give under the process's umask (mkstemp/mkdtemp give 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def _atomic_write(path, write_contents):
    """Call ``write_contents(file)`` on a temporary file beside ``path``, fsync it, rename it onto ``path``."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write {str(path)!r}: it is a directory")
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    # mkstemp gives every writer its own name, so ranks saving shards side by side never collide.
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write_contents(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, default_mode())  # readable as any file the user writes, not mkstemp's 0600
        os.replace(temporary, path)
    except BaseException:
        # Nothing was renamed: the previous file at `path`, if any, is untouched.
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder):
    """Make the rename itself durable; some file systems do not support this, which is harmless."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_json_atomic(path, value):
    """Write ``value`` as JSON to ``path`` atomically (temporary file, fsync, rename)."""
    try:
        text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"cannot write {str(path)!r}: value is not JSON-serialisable ({error})") from None
    _atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def read_json(path):
    """Read a JSON file written by ``write_json_atomic``, with a CheckpointError if it is missing or invalid."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"no file at {str(path)!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read JSON from {str(path)!r}: {error}") from None


def write_array_file(path, arrays, metadata=None):
    """Write named arrays and a JSON metadata dict to one file at ``path``, atomically."""
    if not isinstance(arrays, dict):
        raise CheckpointError(f"arrays must be a dict of name -> array, got {type(arrays).__name__}")
    host_arrays = {name: _host_array(name, value) for name, value in arrays.items()}
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "arrays": {name: {"shape": list(array.shape), "dtype": array.dtype.str, "sha256": sha256_of(array)}
                   for name, array in host_arrays.items()},
        "metadata": {} if metadata is None else metadata,
    }
    try:
        manifest_text = json.dumps(manifest, indent=2, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {error}") from None

    def write_archive(file):
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(zipfile.ZipInfo(MANIFEST, ENTRY_TIME), manifest_text)
            for name, array in host_arrays.items():
                _write_entry(archive, name, array)

    try:
        _atomic_write(path, write_archive)
    except OSError as error:
        raise CheckpointError(f"could not write {str(path)!r}: {error}") from error


def _open_archive(path):
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a directory, not a checkpoint file")
    try:
        return zipfile.ZipFile(path, "r")
    except zipfile.BadZipFile:
        with open(path, "rb") as file:
            starts_like_zip = file.read(4) == ZIP_MAGIC
        if starts_like_zip:
            raise CheckpointError(f"checkpoint {str(path)!r} is truncated or damaged "
                                  "(the zip directory at its end is missing)") from None
        raise CheckpointError(f"{str(path)!r} is not a minipar checkpoint (not a zip archive)") from None


def _check_entries(archive, path):
    """Refuse a crafted archive before reading any entry: {name: ZipInfo} of its checked entries."""
    size, entries = os.path.getsize(path), {}
    for info in archive.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise CheckpointError(f"checkpoint {str(path)!r} holds an entry named {name!r}, which escapes the "
                                  f"archive's folder; minipar writes only {MANIFEST} and arrays/<name>.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: entry {name!r} is compressed (zip method {info.compress_type}); minipar "
                "stores every entry uncompressed and refuses others, whose unpacked size the file does not bound")
        if info.file_size != info.compress_size or info.header_offset + info.compress_size > size:
            raise CheckpointError(f"checkpoint {str(path)!r}: entry {name!r} declares {info.file_size:,} bytes, "
                                  f"which the {size:,}-byte file does not hold")
        entries[name] = info
    return entries


def _read_entry(archive, path, entries, entry_name):
    info = entries.get(entry_name)
    if info is None:
        return None
    try:
        return archive.read(info)  # stored: at most the bytes the file holds (_check_entries)
    except zipfile.BadZipFile as error:
        # zipfile checks each entry's CRC-32 as it reads; a mismatch means the bytes changed.
        raise CheckpointError(f"checkpoint {str(path)!r}: checksum mismatch in {entry_name} ({error})") from None
    except (EOFError, OSError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or unreadable at {entry_name}: {error}") from None


def _read_npy(archive, path, info, name, record):
    """One array, its .npy header checked against the manifest ``record`` and the entry's size before allocating."""
    where = f"checkpoint {str(path)!r}: array {name!r}"
    try:
        with archive.open(info) as stream:
            version = npy_format.read_magic(stream)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version} is not one minipar writes")
            reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, fortran_order, dtype = reader(stream)
            if dtype.kind not in STORABLE_KINDS:
                raise ValueError(f"dtype {dtype.str} holds Python objects, which minipar never unpickles")
            declared = (list(record["shape"]), record["dtype"])
            if fortran_order or [int(n) for n in shape] != declared[0] \
                    or dtype.str != declared[1]:
                raise CheckpointError(f"{where} has shape {tuple(shape)} and dtype {dtype.str}, but the manifest "
                                      f"says {tuple(declared[0])} and {declared[1]}")
            count = 1
            for n in shape:
                count *= int(n)
            if count * dtype.itemsize != info.file_size - stream.tell():
                raise CheckpointError(f"{where} declares {count * dtype.itemsize:,} bytes of data; its entry holds "
                                      f"{info.file_size - stream.tell():,}")
            array = numpy.empty(shape, dtype=dtype)  # no more than the entry holds, so no more than the file
            view, done = memoryview(array.reshape(-1).view("u1")), 0
            while done < len(view):
                got = stream.readinto(view[done:])
                if not got:
                    raise EOFError(f"{len(view) - done} bytes missing")
                done += got
            stream.read(1)  # at the end: zipfile checks the entry's CRC-32 now
        return array
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"checkpoint {str(path)!r}: checksum mismatch in {info.filename} ({error})") from None
    except (EOFError, OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{where} is unreadable ({error})") from None


def read_array_file(path, expected=None):
    """Read ``(arrays, metadata)`` from a file written by ``write_array_file``, checking everything.

    Every array's shape, dtype and SHA-256 must match the manifest, and nothing is allocated beyond
    what the file holds (see the module docstring). ``expected`` optionally maps names to
    ``(shape, dtype)`` the caller needs (a model's parameters): each must be present with that shape
    and dtype. Arrays are returned as backend arrays.
    """
    with _open_archive(path) as archive:
        entries = _check_entries(archive, path)
        manifest_bytes = _read_entry(archive, path, entries, MANIFEST)
        if manifest_bytes is None:
            raise CheckpointError(f"{str(path)!r} is not a minipar checkpoint (it has no {MANIFEST})")
        try:
            manifest = json.loads(manifest_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"checkpoint {str(path)!r} has an unreadable {MANIFEST}: {error}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{str(path)!r} is not a minipar checkpoint (format is not {FORMAT_NAME!r})")
        if manifest.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {str(path)!r} has format version {manifest.get('version')!r}; "
                                  f"this minipar reads version {FORMAT_VERSION}")
        records = manifest.get("arrays")
        if not isinstance(records, dict) or not isinstance(manifest.get("metadata"), dict) or not all(
                isinstance(record, dict) and isinstance(record.get("shape"), list) for record in records.values()):
            raise CheckpointError(f"checkpoint {str(path)!r} has a malformed {MANIFEST}")
        arrays = {}
        for name, record in records.items():
            info = entries.get(f"arrays/{name}.npy")
            if info is None:
                raise CheckpointError(f"checkpoint {str(path)!r} is missing array {name!r}")
            array = _read_npy(archive, path, info, name, record)
            if sha256_of(array) != record.get("sha256"):
                raise CheckpointError(f"checkpoint {str(path)!r}: checksum mismatch for array {name!r} "
                                      "(its bytes differ from the SHA-256 in the manifest)")
            arrays[name] = array
    for name, (shape, dtype) in (expected or {}).items():
        if name not in arrays:
            raise CheckpointError(f"checkpoint {str(path)!r} is missing array {name!r}")
        found = arrays[name]
        if tuple(found.shape) != tuple(shape) or found.dtype != numpy.dtype(dtype):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: array {name!r} has shape {tuple(found.shape)} and dtype {found.dtype}, "
                f"but {tuple(shape)} and {numpy.dtype(dtype)} are expected (another model shape?)")
    return {name: from_host(array) for name, array in arrays.items()}, manifest["metadata"]


def save_checkpoint(path, arrays, metadata):
    """Save a training state: ``arrays`` (parameters, optimizer moments) and ``metadata``.

    ``metadata`` is a JSON-serialisable dict: model config, step, tokenizer
    (``CharTokenizer.to_dict()``), optimizer hyperparameters, and so on. An
    existing checkpoint at ``path`` is replaced only once the new one is
    completely on disk.
    """
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")
    write_array_file(path, arrays, metadata)


def load_checkpoint(path, expected=None):
    """``(arrays, metadata)`` from ``save_checkpoint``, verified; see ``read_array_file`` for ``expected``."""
    return read_array_file(path, expected)
