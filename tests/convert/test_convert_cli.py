"""`qwax convert`: summary, overwrite protection, corrupt input named, SIGKILL leaves no partial destination."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwax.cli import main
from qwax.convert.cli import parse_size

ROOT = Path(__file__).resolve().parents[2]


def test_hf_to_orbax_prints_a_summary_and_refuses_to_overwrite_without_force(hf_checkpoint, tmp_path, capsys):
    src, _ = hf_checkpoint("qwen3_5_text")
    dst = tmp_path / "orbax"
    assert main(["convert", "hf-to-orbax", str(src), str(dst), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "tensors" in err and "MB/s" in err
    before = sorted(p.name for p in dst.iterdir())
    assert main(["convert", "hf-to-orbax", str(src), str(dst), "--no-progress"]) == 1
    assert "--force" in capsys.readouterr().err and str(dst) in err + str(dst)
    assert sorted(p.name for p in dst.iterdir()) == before
    assert main(["convert", "hf-to-orbax", str(src), str(dst), "--no-progress", "--force",
                 "--layout", "unscanned"]) == 0
    assert json.loads((dst / "qwax.json").read_text())["scan_layers"] is False
    out = tmp_path / "hf"
    assert main(["convert", "orbax-to-hf", str(dst), str(out), "--no-progress", "--max-shard-size", "20KB"]) == 0
    assert (out / "model.safetensors.index.json").exists()


def test_truncated_shard_and_bad_index_errors_name_the_file(hf_checkpoint, tmp_path, capsys):
    src, model = hf_checkpoint("qwen3_5_moe_text")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]

    truncated = tmp_path / "truncated"
    shutil.copytree(sharded, truncated)
    data = (truncated / shard.name).read_bytes()
    (truncated / shard.name).write_bytes(data[: len(data) - 1000])
    assert main(["convert", "hf-to-orbax", str(truncated), str(tmp_path / "o1"), "--no-progress"]) == 1
    assert shard.name in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()

    bad_index = tmp_path / "bad_index"
    shutil.copytree(sharded, bad_index)
    (bad_index / "model.safetensors.index.json").write_text('{"weight_map": ')
    assert main(["convert", "hf-to-hf", str(bad_index), str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "model.safetensors.index.json" in capsys.readouterr().err

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    missing_shard = tmp_path / "missing_shard"
    shutil.copytree(sharded, missing_shard)
    (missing_shard / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["convert", "hf-to-orbax", str(missing_shard), str(tmp_path / "o3"), "--no-progress"]) == 1
    assert "model-00099-of-00099.safetensors" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("100") == 100


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("direction", ["hf-to-orbax", "orbax-to-hf"])
def test_sigkill_during_conversion_leaves_no_partial_destination(direction, tmp_path_factory):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from make_synthetic_checkpoint import make_checkpoint, synthetic_config
    finally:
        sys.path.pop(0)
    work = tmp_path_factory.mktemp("sigkill")
    src = work / "hf"
    make_checkpoint(src, synthetic_config(0.1, hidden=512, vocab=8192, moe_intermediate=256, layers=8),
                    shard_bytes=40 << 20)
    if direction == "orbax-to-hf":
        assert main(["convert", "hf-to-orbax", str(src), str(work / "orbax"), "--no-progress"]) == 0
        src = work / "orbax"
    dst = work / "dst"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "qwax.cli", "convert", direction, str(src), str(dst), "--no-progress"]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        temps = [p for p in work.iterdir() if p.name.startswith(".dst.tmp-")]
        if temps and any(f.is_file() for f in temps[0].rglob("*")):  # it has started writing
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the conversion finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    assert [p for p in work.iterdir() if p.name.startswith(".dst.tmp-")]  # the orphan, left by the killed run
    # The next run removes the orphan and completes.
    assert main(["convert", direction, str(src), str(dst), "--no-progress"]) == 0
    assert dst.is_dir() and not [p for p in work.iterdir() if p.name.startswith(".dst.tmp-")]
