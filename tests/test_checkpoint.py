"""Tests for minipar.checkpoint: round trips, every way a file can be bad, atomic saves, no pickle."""
import io
import json
import pickle
import zipfile

import numpy  # host arrays to build hand-made (broken) checkpoint files with
import numpy.lib.format as npy_format
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as array_strategies

from minipar import checkpoint
from minipar.backend import to_host, xp
from minipar.checkpoint import (
    load_checkpoint,
    read_array_file,
    read_json,
    save_checkpoint,
    write_array_file,
    write_json_atomic,
)
from minipar.errors import CheckpointError

METADATA = {"step": 120, "model": {"layers": 2, "width": 64}, "tokenizer": {"kind": "char", "characters": "ab"}}


def example_arrays():
    return {
        "embedding.weight": xp.linspace(-1, 1, 12, dtype=xp.float32).reshape(3, 4),
        "blocks.0.mlp.bias": xp.asarray([1e-300, -0.0, xp.inf, xp.nan], dtype=xp.float64),
        "optimizer/step_counts": xp.arange(6, dtype=xp.int64).reshape(2, 3) - 3,
        "scalar": xp.asarray(2.5, dtype=xp.float32),
        "empty": xp.zeros((0, 5), dtype=xp.float32),
        "mask": xp.asarray([True, False]),
    }


def bits(array):
    """The exact bytes of an array, so NaN and -0.0 compare bit for bit."""
    return to_host(array).tobytes()


def test_round_trip_keeps_values_dtypes_shapes_and_metadata(tmp_path):
    path = tmp_path / "model.ckpt"
    arrays = example_arrays()
    save_checkpoint(path, arrays, METADATA)
    loaded, metadata = load_checkpoint(path)
    assert metadata == METADATA
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape, name
        assert bits(loaded[name]) == bits(array), name


@settings(max_examples=40, deadline=None)
@given(array_strategies.arrays(
    dtype=st.sampled_from([numpy.float32, numpy.float64, numpy.int64, numpy.int8, numpy.uint16]),
    shape=array_strategies.array_shapes(min_dims=0, max_dims=3, max_side=5)))
def test_round_trip_any_numeric_array(tmp_path_factory, array):
    path = tmp_path_factory.mktemp("ckpt") / "a.ckpt"
    save_checkpoint(path, {"x": array}, {})
    loaded, _ = load_checkpoint(path)
    assert loaded["x"].dtype == array.dtype and loaded["x"].shape == array.shape
    assert bits(loaded["x"]) == bits(array)


def test_non_contiguous_arrays_are_saved_in_logical_order(tmp_path):
    matrix = xp.arange(12, dtype=xp.float64).reshape(3, 4)
    save_checkpoint(tmp_path / "t.ckpt", {"transposed": matrix.T, "strided": matrix[:, ::2]}, {})
    loaded, _ = load_checkpoint(tmp_path / "t.ckpt")
    assert xp.array_equal(loaded["transposed"], matrix.T) and xp.array_equal(loaded["strided"], matrix[:, ::2])


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, {"w": xp.zeros(3)}, {"step": 1})
    save_checkpoint(path, {"w": xp.ones(3)}, {"step": 2})
    loaded, metadata = load_checkpoint(path)
    assert metadata == {"step": 2} and xp.array_equal(loaded["w"], xp.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


# --- bad files ---------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent.ckpt")


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep_fraction", [0.1, 0.5, 0.99])
def test_truncated_file(tmp_path, keep_fraction):
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, example_arrays(), METADATA)
    content = path.read_bytes()
    path.write_bytes(content[:int(len(content) * keep_fraction)])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_flipped_byte_in_array_data_is_a_checksum_error(tmp_path):
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, {"w": xp.arange(1000, dtype=xp.float64)}, {})
    content = bytearray(path.read_bytes())
    position = content.index(numpy.float64(500.0).tobytes())  # a byte inside the array's data
    content[position] ^= 0x01
    path.write_bytes(bytes(content))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def build_archive(path, manifest, entries):
    """A hand-made zip with the given manifest and ``{entry name: bytes}``."""
    with zipfile.ZipFile(path, "w") as archive:
        if manifest is not None:
            archive.writestr("manifest.json", json.dumps(manifest))
        for name, content in entries.items():
            archive.writestr(name, content)


def npy_bytes(array, allow_pickle=False):
    buffer = io.BytesIO()
    npy_format.write_array(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def manifest_for(arrays, version=1):
    return {"format": "minipar-arrays", "version": version, "metadata": {},
            "arrays": {name: {"shape": list(a.shape), "dtype": a.dtype.str, "sha256": checkpoint.sha256_of(a)}
                       for name, a in arrays.items()}}


def test_array_that_differs_from_its_sha256_is_refused(tmp_path):
    """Bytes changed and the zip CRC recomputed, as a faulty copy tool might: the SHA-256 still catches it."""
    original = numpy.arange(10, dtype=numpy.float32)
    tampered = original.copy()
    tampered[3] = 7.5
    build_archive(tmp_path / "c.ckpt", manifest_for({"w": original}), {"arrays/w.npy": npy_bytes(tampered)})
    with pytest.raises(CheckpointError, match="checksum mismatch for array 'w'"):
        load_checkpoint(tmp_path / "c.ckpt")


def test_shape_or_dtype_differing_from_the_manifest_is_refused(tmp_path):
    stored = numpy.zeros((2, 3), dtype=numpy.float32)
    build_archive(tmp_path / "c.ckpt", manifest_for({"w": stored.reshape(3, 2)}), {"arrays/w.npy": npy_bytes(stored)})
    with pytest.raises(CheckpointError, match=r"has shape \(2, 3\).*manifest says \(3, 2\)"):
        load_checkpoint(tmp_path / "c.ckpt")


def test_missing_array(tmp_path):
    present = numpy.ones(2)
    manifest = manifest_for({"a": present, "b": present})
    build_archive(tmp_path / "c.ckpt", manifest, {"arrays/a.npy": npy_bytes(present)})
    with pytest.raises(CheckpointError, match="missing array 'b'"):
        load_checkpoint(tmp_path / "c.ckpt")


def test_expected_arrays_are_checked(tmp_path):
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, {"w": xp.zeros((4, 4), dtype=xp.float32)}, {})
    arrays, _ = load_checkpoint(path, expected={"w": ((4, 4), "float32")})
    assert arrays["w"].shape == (4, 4)
    with pytest.raises(CheckpointError, match=r"'w' has shape \(4, 4\).*but \(4, 8\)"):
        load_checkpoint(path, expected={"w": ((4, 8), "float32")})
    with pytest.raises(CheckpointError, match="float64 are expected"):
        load_checkpoint(path, expected={"w": ((4, 4), "float64")})
    with pytest.raises(CheckpointError, match="missing array 'bias'"):
        load_checkpoint(path, expected={"w": ((4, 4), "float32"), "bias": ((4,), "float32")})


@pytest.mark.parametrize("content, message", [
    (b"step 100, loss 2.3\n", "not a minipar checkpoint (not a zip archive)"),
    (b"", "not a minipar checkpoint"),
])
def test_file_that_is_not_a_checkpoint(tmp_path, content, message):
    (tmp_path / "notes.ckpt").write_bytes(content)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(tmp_path / "notes.ckpt")


def test_zip_without_manifest_or_of_another_format(tmp_path):
    build_archive(tmp_path / "a.zip", None, {"readme.txt": b"hello"})
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        load_checkpoint(tmp_path / "a.zip")
    build_archive(tmp_path / "b.zip", {"format": "something-else"}, {})
    with pytest.raises(CheckpointError, match="format is not 'minipar-arrays'"):
        load_checkpoint(tmp_path / "b.zip")


def test_newer_format_version_is_refused(tmp_path):
    build_archive(tmp_path / "c.ckpt", manifest_for({}, version=2), {})
    with pytest.raises(CheckpointError, match="format version 2; this minipar reads version 1"):
        load_checkpoint(tmp_path / "c.ckpt")


# --- pickle is never used ----------------------------------------------------------------

class LeavesAFileWhenUnpickled:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_object_arrays_are_refused_on_save(tmp_path):
    objects = numpy.array([{"a": 1}, None], dtype=object)
    with pytest.raises(CheckpointError, match="dtype object.*pickle"):
        save_checkpoint(tmp_path / "o.ckpt", {"w": xp.ones(2), "objects": objects}, {})
    with pytest.raises(CheckpointError, match="numeric arrays only"):
        save_checkpoint(tmp_path / "o.ckpt", {"names": numpy.array(["a", "b"])}, {})
    assert list(tmp_path.iterdir()) == []


def test_pickled_array_in_a_file_is_never_unpickled(tmp_path):
    marker = tmp_path / "pickle-ran"
    LeavesAFileWhenUnpickled.marker = marker
    payload = numpy.array([LeavesAFileWhenUnpickled()], dtype=object)
    assert pickle.loads(pickle.dumps(payload)) is not None and marker.exists()  # the trap works
    marker.unlink()
    manifest = manifest_for({})
    manifest["arrays"]["evil"] = {"shape": [1], "dtype": "|O", "sha256": "0" * 64}
    build_archive(tmp_path / "evil.ckpt", manifest, {"arrays/evil.npy": npy_bytes(payload, allow_pickle=True)})
    with pytest.raises(CheckpointError, match="'evil' is unreadable"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


# --- atomic saves ------------------------------------------------------------------------

def test_failure_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, example_arrays(), METADATA)
    before = path.read_bytes()

    real_write_entry, entries_written = checkpoint._write_entry, []

    def write_one_entry_then_fail(archive, name, array):
        if entries_written:
            raise OSError(28, "No space left on device")
        real_write_entry(archive, name, array)
        entries_written.append(name)

    monkeypatch.setattr(checkpoint, "_write_entry", write_one_entry_then_fail)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(path, {name: a + 1 for name, a in example_arrays().items()}, {"step": 999})
    assert entries_written  # the failure really happened part way through the file
    assert path.read_bytes() == before
    loaded, metadata = load_checkpoint(path)
    assert metadata == METADATA and bits(loaded["embedding.weight"]) == bits(example_arrays()["embedding.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]  # no temporary file left behind


def test_failure_before_the_rename_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, {"w": xp.zeros(3)}, {"step": 1})

    def interrupted(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": xp.ones(3)}, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)[1] == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_unserialisable_metadata_is_refused_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "m.ckpt", {"w": xp.zeros(2)}, {"config": object()})
    with pytest.raises(CheckpointError, match="must be a dict"):
        save_checkpoint(tmp_path / "m.ckpt", {"w": xp.zeros(2)}, ["step", 3])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "../escape", "a//b", "/root", "with space", 3])
def test_bad_array_names_are_refused(tmp_path, name):
    with pytest.raises(CheckpointError, match="is not allowed"):
        save_checkpoint(tmp_path / "n.ckpt", {name: xp.zeros(2)}, {})


def test_save_creates_missing_folders_and_refuses_a_directory_target(tmp_path):
    save_checkpoint(tmp_path / "out" / "run1" / "model.ckpt", {"w": xp.zeros(1)}, {})
    assert load_checkpoint(tmp_path / "out" / "run1" / "model.ckpt")[0]["w"].shape == (1,)
    with pytest.raises(CheckpointError, match="it is a directory"):
        save_checkpoint(tmp_path / "out", {"w": xp.zeros(1)}, {})


# --- building blocks for sharded checkpoints ---------------------------------------------

def test_shard_files_and_json_index(tmp_path):
    full = xp.arange(24, dtype=xp.float32).reshape(6, 4)
    for rank in range(2):
        write_array_file(tmp_path / f"shard-{rank}.ckpt", {"w": full[3 * rank:3 * rank + 3]}, {"rank": rank})
    index = {"arrays": {"w": {"shape": [6, 4], "shards": [[0, 0, 3], [1, 3, 6]]}}}
    write_json_atomic(tmp_path / "index.json", index)
    assert read_json(tmp_path / "index.json") == index
    pieces = [read_array_file(tmp_path / f"shard-{rank}.ckpt", expected={"w": ((3, 4), "float32")})
              for rank in range(2)]
    assert [metadata["rank"] for _, metadata in pieces] == [0, 1]
    assert xp.array_equal(xp.concatenate([arrays["w"] for arrays, _ in pieces]), full)


def test_json_helpers_report_problems(tmp_path):
    with pytest.raises(CheckpointError, match="no file at"):
        read_json(tmp_path / "index.json")
    (tmp_path / "broken.json").write_text('{"arrays": ')
    with pytest.raises(CheckpointError, match="cannot read JSON"):
        read_json(tmp_path / "broken.json")
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        write_json_atomic(tmp_path / "index.json", {"bad": {1, 2}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json"]


# ---- crafted files: refused without allocating more than the file's size ----------------------
def peak_bytes_while(action):
    """(what ``action()`` raised, the peak of Python's and NumPy's allocations meanwhile, in bytes)."""
    import tracemalloc

    tracemalloc.start()
    try:
        action()
    except CheckpointError as error:
        raised = error
    else:
        raised = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak


def test_a_compressed_entry_a_zip_bomb_is_refused_unread(tmp_path):
    """50 MB of zeros deflated into about 50 kB: reading it would allocate 50 MB from a tiny file."""
    zeros = numpy.zeros(50 * 2**20 // 8)
    path = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest_for({"w": zeros})))
        archive.writestr("arrays/w.npy", npy_bytes(zeros))
    size = path.stat().st_size
    assert size < 2**20  # the file is small; the entry is not
    raised, peak = peak_bytes_while(lambda: read_array_file(path))
    assert raised is not None and "is compressed" in str(raised) and "uncompressed" in str(raised), raised
    assert peak < size + 2**20, f"allocated {peak} bytes for a {size}-byte file"


def test_a_shape_declared_far_beyond_the_file_is_refused_before_allocating(tmp_path):
    """Manifest and .npy header agree on 2**31 float64s (16 GiB); the entry holds 80 bytes."""
    small = numpy.arange(10, dtype=numpy.float64)
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**31,)})
    manifest = manifest_for({"w": small})
    manifest["arrays"]["w"]["shape"] = [2**31]
    path = tmp_path / "huge.ckpt"
    build_archive(path, manifest, {"arrays/w.npy": header.getvalue() + small.tobytes()})
    raised, peak = peak_bytes_while(lambda: read_array_file(path))
    assert raised is not None and "declares 17,179,869,184 bytes of data" in str(raised), raised
    assert peak < path.stat().st_size + 2**20, f"allocated {peak} bytes for a {path.stat().st_size}-byte file"


def test_an_entry_declaring_more_bytes_than_the_file_holds_is_refused(tmp_path):
    """The zip directory itself lies about an entry's size (patched in the central directory)."""
    path = tmp_path / "liar.ckpt"
    write_array_file(path, {"w": numpy.arange(4.0)})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("arrays/w.npy")
    name = b"arrays/w.npy"
    record = data.rfind(b"PK\x01\x02", 0, data.rfind(name))  # the entry's central directory record
    assert data[record + 46:record + 46 + len(name)] == name
    data[record + 20:record + 28] = (2**30).to_bytes(4, "little") * 2  # compressed and unpacked sizes: 1 GiB
    path.write_bytes(bytes(data))
    assert info.file_size < 1000
    raised, peak = peak_bytes_while(lambda: read_array_file(path))
    assert raised is not None and "declares 1,073,741,824 bytes" in str(raised), raised
    assert peak < path.stat().st_size + 2**20


@pytest.mark.parametrize("name", ["arrays/../../outside.npy", "/etc/evil.npy", "arrays\\..\\evil.npy"])
def test_entry_names_that_escape_the_folder_are_refused(tmp_path, name):
    path = tmp_path / "escape.ckpt"
    build_archive(path, manifest_for({}), {name: npy_bytes(numpy.arange(3.0))})
    with pytest.raises(CheckpointError, match="escapes the archive's folder"):
        read_array_file(path)


def test_files_written_by_this_minipar_are_stored_uncompressed_and_load(tmp_path):
    """The other side of the checks above: what save writes passes them (old checkpoints keep loading)."""
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, example_arrays(), METADATA)
    with zipfile.ZipFile(path) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    arrays, metadata = load_checkpoint(path)
    assert metadata == METADATA and sorted(arrays) == sorted(example_arrays())


# ---- crafted distributed checkpoints (a folder: index.json + shard files) -----------------------
@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A real one-process checkpoint of a tiny model, made once by the CLI."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("saved")
    (out / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    result = subprocess.run([sys.executable, "-m", "minipar", "train", "--steps", "1", "--n-layer", "1", "--n-embd",
                             "16", "--n-head", "2", "--batch-size", "4", "--eval-batches", "1", "--block-size", "8",
                             "--data", str(out / "text.txt"), "--out", str(out)],
                            capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    return out / "ckpt.minipar"


def crafted(saved_folder, tmp_path, change):
    """A copy of the saved checkpoint with ``change(index)`` applied to its index."""
    import shutil

    folder = tmp_path / "crafted.minipar"
    shutil.copytree(saved_folder, folder)
    index = json.loads((folder / "index.json").read_text())
    change(index)
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def test_an_index_declaring_more_than_its_files_hold_is_refused_before_allocating(saved_folder, tmp_path):
    from minipar.parallel.distributed_checkpoint import load_single_process_model

    def grow(index):  # a model 2**20 times wider, every shape and config field consistent with it
        index["model_config"]["n_embd"] *= 2**20
        for entry in index["arrays"].values():
            entry["shape"] = [n * 2**20 for n in entry["shape"]]
            for record in entry["shards"]:
                record["shape"] = [n * 2**20 for n in record["shape"]]

    folder = crafted(saved_folder, tmp_path, grow)
    raised, peak = peak_bytes_while(lambda: load_single_process_model(folder))
    assert raised is not None and "bytes of arrays the index declares" in str(raised), raised
    assert peak < sum(f.stat().st_size for f in folder.iterdir()) + 2**20


def test_a_model_config_larger_than_the_saved_arrays_is_refused_before_building(saved_folder, tmp_path):
    from minipar.parallel.distributed_checkpoint import load_single_process_model

    def widen(index):
        index["model_config"]["vocab_size"] = 2**30  # sample would build a 2**30 x 16 embedding for it

    raised, peak = peak_bytes_while(lambda: load_single_process_model(crafted(saved_folder, tmp_path, widen)))
    assert raised is not None and "its model config says" in str(raised), raised
    assert peak < 2**22


@pytest.mark.parametrize("name", ["../outside.minipar", "/tmp/elsewhere.minipar", ".hidden.minipar"])
def test_shard_file_names_that_escape_the_folder_are_refused(saved_folder, tmp_path, name):
    from minipar.parallel.distributed_checkpoint import load_single_process_model

    def escape(index):
        first = next(iter(index["files"]))
        index["files"][name] = index["files"].pop(first)
        for entry in index["arrays"].values():
            for record in entry["shards"]:
                record["file"] = name if record["file"] == first else record["file"]

    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_single_process_model(crafted(saved_folder, tmp_path, escape))


def test_a_shard_file_that_links_out_of_the_folder_is_refused(saved_folder, tmp_path):
    from minipar.parallel.distributed_checkpoint import load_single_process_model

    folder = crafted(saved_folder, tmp_path, lambda index: None)
    shard = next(folder.glob("shard-*.minipar"))
    outside = tmp_path / "outside.minipar"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="link out of the checkpoint's folder"):
        load_single_process_model(folder)


# ---- the tokenizer is saved and compared on resume ----------------------------------------------
def run_train(*arguments, cwd=None):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", "minipar", "train", "--n-layer", "1", "--n-embd", "16", "--n-head",
                           "2", "--batch-size", "4", "--eval-batches", "1", "--block-size", "8", *arguments],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)


def test_the_character_table_is_compared_on_resume():
    """The check itself, fast: equal tables pass, another mapping is refused in one sentence, the flag allows it."""
    from types import SimpleNamespace

    from minipar.data import CharTokenizer
    from minipar.errors import DataError
    from minipar.run import check_same_tokenizer

    index = {"tokenizer": CharTokenizer("abc").to_dict()}
    arguments = SimpleNamespace(resume="out/ckpt.minipar", allow_new_data=False)
    check_same_tokenizer(index, CharTokenizer("cab"), arguments)  # the same table
    with pytest.raises(DataError, match=r"^--resume out/ckpt.minipar: the checkpoint was trained on 3 characters "
                                        r"'abc', this data has 3 characters 'abd', .*--allow-new-data"):
        check_same_tokenizer(index, CharTokenizer("abd"), arguments)
    check_same_tokenizer(index, CharTokenizer("abd"), SimpleNamespace(resume="x", allow_new_data=True))


@pytest.mark.slow
def test_resuming_on_data_with_another_character_table_is_refused_unless_allowed(tmp_path):
    """Same vocabulary size (so the model's shape matches), another character -> id mapping."""
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("abcdefgh\n" * 40)
    second.write_text("abcdefgz\n" * 40)  # 9 characters both; 'z' sorts last, 'h' moved out: ids shift
    out = tmp_path / "out"
    result = run_train("--steps", "1", "--data", str(first), "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "ckpt.minipar" / "index.json").read_text())["tokenizer"]
    assert saved == {"kind": "char", "characters": "\nabcdefgh"}
    result = run_train("--steps", "2", "--data", str(second), "--resume", str(out / "ckpt.minipar"), "--out", str(out))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (f"error: --resume {out / 'ckpt.minipar'}: the checkpoint was trained on 9 characters "
                        "'\\nabcdefgh', this data has 9 characters '\\nabcdefgz', so token ids would mean other "
                        "characters; pass --allow-new-data to resume on it anyway")
    result = run_train("--steps", "2", "--data", str(second), "--resume", str(out / "ckpt.minipar"), "--out", str(out),
                       "--allow-new-data")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "ckpt.minipar" / "index.json").read_text())["tokenizer"]["characters"] == "\nabcdefgz"
