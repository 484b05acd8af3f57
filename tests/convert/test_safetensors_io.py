import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest

from qwax.convert import safetensors_io
from qwax.convert.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    CheckpointKeyError,
    CheckpointReader,
    atomic_directory,
    write_checkpoint,
)

RNG = np.random.default_rng(0)

DTYPES = [
    np.float32,
    ml_dtypes.bfloat16,
    np.float16,
    np.float64,
    np.int8,
    np.int32,
    np.int64,
    np.uint8,
    np.bool_,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
]


def _random(shape, dtype):
    return (RNG.standard_normal(shape) * 4).astype(dtype)


def _tensors():
    return {
        "model.embed_tokens.weight": _random((16, 8), ml_dtypes.bfloat16),
        "model.layers.0.linear_attn.A_log": _random((3,), np.float32),  # odd bf16 neighbours test alignment
        "model.layers.0.odd": _random((5,), ml_dtypes.bfloat16),
        "model.layers.0.mlp.experts.gate_up_proj": _random((4, 6, 8), ml_dtypes.bfloat16),
        "steps": np.arange(7, dtype=np.int64),
        "flag": np.array([True, False, True]),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 4), np.float16),
    }


def _assert_same(actual, expected):
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual.reshape(-1).view(np.uint8), expected.reshape(-1).view(np.uint8))  # bitwise


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_keeps_dtype_shape_and_bits(tmp_path, dtype):
    value = _random((3, 5), dtype)
    write_checkpoint(tmp_path, {"w": value})
    with CheckpointReader(tmp_path) as ckpt:
        assert ckpt.keys() == ["w"]
        assert ckpt.shape("w") == (3, 5)
        assert ckpt.dtype("w") == np.dtype(dtype)
        _assert_same(ckpt.get("w"), value)


def test_round_trip_of_mixed_tensors_from_a_generator(tmp_path):
    tensors = _tensors()
    written = write_checkpoint(tmp_path, ((k, v) for k, v in tensors.items()), metadata={"producer": "qwax"})
    assert written == [tmp_path / SINGLE_FILE]
    assert sorted(os.listdir(tmp_path)) == [SINGLE_FILE]  # no staging directory left behind
    with CheckpointReader(tmp_path) as ckpt:
        assert set(ckpt.keys()) == set(tensors)
        assert ckpt.metadata == {"format": "pt", "producer": "qwax"}
        for key, value in tensors.items():
            _assert_same(ckpt.get(key), value)
        assert dict(ckpt.items()).keys() == tensors.keys()


def test_get_returns_a_fresh_writable_array(tmp_path):
    write_checkpoint(tmp_path, {"w": np.ones(4, np.float32)})
    with CheckpointReader(tmp_path) as ckpt:
        a = ckpt.get("w")
        a[0] = 5
        assert ckpt.get("w")[0] == 1


def test_tensors_start_at_a_multiple_of_their_item_size(tmp_path):
    write_checkpoint(tmp_path, _tensors())
    with open(tmp_path / SINGLE_FILE, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert (8 + n) % 8 == 0
    itemsize = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8, "BOOL": 1}
    for key, entry in header.items():
        if key != "__metadata__":
            assert entry["data_offsets"][0] % itemsize[entry["dtype"]] == 0, key


def test_written_file_is_read_by_the_safetensors_library(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    tensors = _tensors()
    write_checkpoint(tmp_path, tensors)
    with safetensors.safe_open(str(tmp_path / SINGLE_FILE), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        for key, value in tensors.items():
            _assert_same(f.get_tensor(key), value)


def test_reads_a_file_written_by_the_safetensors_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {k: v for k, v in _tensors().items() if k != "scalar"}
    safetensors_numpy.save_file(tensors, str(tmp_path / "weights.safetensors"), metadata={"format": "np"})
    with CheckpointReader(tmp_path) as ckpt:
        assert ckpt.metadata == {"format": "np"}
        for key, value in tensors.items():
            _assert_same(ckpt.get(key), value)


def test_reader_accepts_a_file_path(tmp_path):
    write_checkpoint(tmp_path, {"w": np.arange(3, dtype=np.int32)})
    with CheckpointReader(tmp_path / SINGLE_FILE) as ckpt:
        _assert_same(ckpt.get("w"), np.arange(3, dtype=np.int32))


def test_sharded_write_splits_at_max_shard_bytes_and_index_maps_every_key(tmp_path):
    tensors = {f"layer.{i}.weight": _random((8, 8), np.float32) for i in range(5)}  # 256 bytes each
    tensors["big"] = _random((40, 8), np.float32)  # 1280 bytes: over the limit, so a shard of its own
    written = write_checkpoint(tmp_path, tensors, max_shard_bytes=600)
    names = [p.name for p in written]
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + [INDEX_FILE]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert index["weight_map"]["layer.0.weight"] == index["weight_map"]["layer.1.weight"] == names[0]
    assert index["weight_map"]["big"] == names[3]
    with CheckpointReader(tmp_path) as ckpt:
        assert ckpt.keys() == sorted(tensors)
        assert len(ckpt.files) == 4
        for key, value in tensors.items():
            _assert_same(ckpt.get(key), value)


def test_checkpoint_that_fits_in_one_shard_has_no_index(tmp_path):
    write_checkpoint(tmp_path, {"w": np.zeros(4, np.float32)}, max_shard_bytes=1 << 20)
    assert sorted(os.listdir(tmp_path)) == [SINGLE_FILE]


def test_rewrite_replaces_old_checkpoint_files_and_keeps_other_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    tensors = {f"t{i}": np.full(64, i, np.float32) for i in range(4)}
    write_checkpoint(tmp_path, tensors, max_shard_bytes=256)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 4
    write_checkpoint(tmp_path, {"only": np.ones(2, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["config.json", SINGLE_FILE]
    with CheckpointReader(tmp_path) as ckpt:
        assert ckpt.keys() == ["only"]


def test_failed_write_leaves_the_destination_untouched(tmp_path):
    write_checkpoint(tmp_path, {"old": np.ones(2, np.float32)})
    before = (tmp_path / SINGLE_FILE).read_bytes()

    def tensors():
        yield "a", np.zeros(64, np.float32)
        yield "b", np.zeros(64, np.float32)
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        write_checkpoint(tmp_path, tensors(), max_shard_bytes=256)
    assert sorted(os.listdir(tmp_path)) == [SINGLE_FILE]
    assert (tmp_path / SINGLE_FILE).read_bytes() == before


def test_write_rejects_duplicate_names_and_unstorable_dtypes(tmp_path):
    with pytest.raises(CheckpointError, match="'w' given twice"):
        write_checkpoint(tmp_path / "a", [("w", np.ones(1)), ("w", np.ones(1))])
    with pytest.raises(CheckpointError, match="'obj'.*object"):
        write_checkpoint(tmp_path / "b", {"obj": np.array([None])})
    with pytest.raises(CheckpointError, match="metadata"):
        write_checkpoint(tmp_path / "c", {"w": np.ones(1)}, metadata={"step": 3})


def test_row_and_fp8_reads_survive_short_reads(tmp_path, monkeypatch):
    # Row ranges of any tensor, and whole fp8 tensors (which the safetensors library cannot give to numpy), are
    # read by qwax with positional reads, and a read may return fewer bytes than asked.
    fp8, f32 = _random((7, 9), ml_dtypes.float8_e4m3fn), _random((7, 9), np.float32)
    write_checkpoint(tmp_path, {"fp8": fp8, "f32": f32})
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, views, offset: real_preadv(fd, [views[0][:5]], offset))
    with CheckpointReader(tmp_path) as ckpt:
        _assert_same(ckpt.get("fp8"), fp8)
        _assert_same(ckpt.get_slice("fp8", 2, 5), fp8[2:5])
        _assert_same(ckpt.get_slice("f32", 1, 7), f32[1:7])


def test_get_slice_reads_only_the_rows_asked_for(tmp_path, monkeypatch):
    value = _random((64, 32), np.float32)
    write_checkpoint(tmp_path, {"w": value})
    read = []
    real_preadv = os.preadv

    def counting(fd, views, offset):
        n = real_preadv(fd, views, offset)
        read.append(n)
        return n

    monkeypatch.setattr(os, "preadv", counting)
    with CheckpointReader(tmp_path) as ckpt:
        _assert_same(ckpt.get_slice("w", 10, 14), value[10:14])
    assert sum(read) == 4 * 32 * 4  # 4 rows of 32 float32, not the 8 KiB tensor


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.bfloat16, np.float32],
                         ids=lambda d: np.dtype(d).name)
def test_get_slice_reads_rows_of_every_dtype(tmp_path, dtype):
    value = _random((6, 3, 2), dtype)
    write_checkpoint(tmp_path, {"a": _random((5,), np.float32), "w": value, "s": np.float32(1.0)})
    with CheckpointReader(tmp_path) as ckpt:
        _assert_same(ckpt.get_slice("w", 1, 4), value[1:4])
        _assert_same(ckpt.get_slice("w", 0, 6), value)
        assert ckpt.get_slice("w", 6, 6).shape == (0, 3, 2)
        assert ckpt.nbytes("w") == value.nbytes
        with pytest.raises(CheckpointError, match="'s'.*scalar"):
            ckpt.get_slice("s", 0, 1)


def test_packed_sub_byte_dtype_is_named_when_read(tmp_path):
    # F4 packs two values per byte: a valid safetensors file, but numpy has no dtype for it.
    (tmp_path / SINGLE_FILE).write_bytes(_raw_file({"w": {"dtype": "F4", "shape": [2, 4], "data_offsets": [0, 4]},
                                                    "v": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                                                   bytes(8)))
    with CheckpointReader(tmp_path) as ckpt:
        assert ckpt.shape("w") == (2, 4) and ckpt.nbytes("w") == 4
        assert ckpt.get("v").shape == (1,)
        for read in (ckpt.dtype, ckpt.get):
            with pytest.raises(CheckpointError, match="'w'.*F4"):
                read("w")


def test_concurrent_gets_return_the_right_tensors(tmp_path):
    tensors = {f"t{i}": _random((32, 16), np.float32) for i in range(16)}
    write_checkpoint(tmp_path, tensors, max_shard_bytes=4096)
    with CheckpointReader(tmp_path) as ckpt, ThreadPoolExecutor(4) as pool:
        results = dict(zip(tensors, pool.map(ckpt.get, tensors)))
    for key, value in tensors.items():
        _assert_same(results[key], value)


# --- errors name the file or key at fault ---------------------------------------------------------------------


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.*does not exist"):
        CheckpointReader(tmp_path / "nowhere")


def test_directory_without_safetensors_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"no safetensors file in {tmp_path}"):
        CheckpointReader(tmp_path)


def test_several_unindexed_files_are_ambiguous(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        write_checkpoint(tmp_path / "src", {"w": np.ones(1, np.float32)})
        os.replace(tmp_path / "src" / SINGLE_FILE, tmp_path / name)
    with pytest.raises(CheckpointError, match="a.safetensors, b.safetensors"):
        CheckpointReader(tmp_path)


def _sharded(tmp_path):
    tensors = {f"t{i}": np.full(64, i, np.float32) for i in range(3)}
    write_checkpoint(tmp_path, tensors, max_shard_bytes=256)
    return tensors


def test_missing_shard_is_named(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE}.*'model-00002-of-00003.safetensors'.*missing"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"weight_map": 3}', '{"metadata": {}}'])
def test_bad_index_is_named(tmp_path, text):
    _sharded(tmp_path)
    (tmp_path / INDEX_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        CheckpointReader(tmp_path)


def test_index_entry_absent_from_its_shard_is_named(tmp_path):
    _sharded(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00003.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'ghost'.*model-00001-of-00003"):
        CheckpointReader(tmp_path)


def test_truncated_file_is_detected_before_reading_and_names_the_tensor(tmp_path):
    write_checkpoint(tmp_path, {"a": np.ones(16, np.float32), "b": np.ones(16, np.float32)})
    path = tmp_path / SINGLE_FILE
    os.truncate(path, path.stat().st_size - 4)
    with pytest.raises(CheckpointError, match=rf"{SINGLE_FILE}: truncated .*tensor '[ab]'"):
        CheckpointReader(tmp_path)


def _raw_file(header, data=b""):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x02", "no 8-byte header length"),
        (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
        (_raw_file(b"{oops"), "not JSON"),
        (_raw_file([]), "JSON object"),
        (_raw_file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8)), "'w'.*F32 \\[2\\]"),
        (_raw_file({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "'w'.*'Q9'"),
        (_raw_file({"w": {"dtype": "F32", "shape": [1]}}, bytes(4)), "'w'"),
        (_raw_file({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), "'w' starts at byte 4"),
        (_raw_file({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(12)), "8 byte.*after"),
        (_raw_file({"__metadata__": {"step": 3}}), "__metadata__"),
    ],
    ids=["short", "huge-header", "not-json", "not-object", "wrong-byte-count", "unknown-dtype", "no-offsets", "gap",
         "trailing-bytes", "metadata-not-strings"],
)
def test_corrupt_file_is_named(tmp_path, content, message):
    (tmp_path / SINGLE_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        CheckpointReader(tmp_path)
    assert SINGLE_FILE in str(info.value)


def test_missing_key_names_the_key_and_is_a_key_error(tmp_path):
    write_checkpoint(tmp_path, {"w": np.ones(1, np.float32)})
    with CheckpointReader(tmp_path) as ckpt:
        for lookup in (ckpt.get, ckpt.shape, ckpt.dtype):
            with pytest.raises(CheckpointKeyError, match="'lm_head.weight' not found") as info:
                lookup("lm_head.weight")
            assert isinstance(info.value, KeyError) and isinstance(info.value, CheckpointError)
        assert "lm_head.weight" not in ckpt and "w" in ckpt


# --- atomic_directory -----------------------------------------------------------------------------------------


def test_atomic_directory_appears_complete(tmp_path):
    target = tmp_path / "out" / "model"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
        write_checkpoint(tmp, {"w": np.ones(2, np.float32)})
        assert not target.exists()
    assert sorted(os.listdir(target)) == ["config.json", SINGLE_FILE]
    assert os.listdir(target.parent) == ["model"]


def test_atomic_directory_leaves_nothing_on_exception(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            write_checkpoint(tmp, {"w": np.ones(2, np.float32)})
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_directory_refuses_a_non_empty_target_unless_overwrite(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="model"):
        with atomic_directory(target):
            pass
    assert os.listdir(tmp_path) == ["model"]

    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(target) == ["new.txt"]
    assert os.listdir(tmp_path) == ["model"]  # the old directory was removed, not left aside


def test_atomic_directory_fills_an_existing_empty_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("a")
    assert os.listdir(target) == ["a"]


def test_atomic_directory_restores_the_old_target_if_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(src).startswith(".model.") and ".tmp-" in os.path.basename(src):
            raise OSError("disk on fire")
        return real_replace(src, dst)

    monkeypatch.setattr(safetensors_io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["model"]
    assert os.listdir(target) == ["old.txt"]


# --- interoperability with transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_bytes", [None, 64 * 1024], ids=["single", "sharded"])
def test_transformers_checkpoint_round_trips_through_reader_and_writer(hf_checkpoint, tmp_path, max_shard_bytes):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hf_models import hf_logits, random_ids

    source, model = hf_checkpoint("qwen3_5_moe_text")
    with CheckpointReader(source) as ckpt:
        for key, value in model.state_dict().items():
            if key in ckpt:  # transformers saves fused experts per expert; compare what is stored
                np.testing.assert_array_equal(ckpt.get(key), value.numpy(), err_msg=key)
        with atomic_directory(tmp_path / "copy") as staging:
            (staging / "config.json").write_bytes((source / "config.json").read_bytes())
            write_checkpoint(staging, ckpt.items(), max_shard_bytes=max_shard_bytes)
    if max_shard_bytes:
        assert (tmp_path / "copy" / INDEX_FILE).is_file()

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "copy", dtype=torch.float32, attn_implementation="eager"
    )
    ids = random_ids(2, 12)
    # Same weights; only BLAS accumulation order may differ with the loaded tensors' memory layout.
    np.testing.assert_allclose(hf_logits(reloaded.eval(), ids), hf_logits(model, ids), rtol=1e-5, atol=1e-5)
