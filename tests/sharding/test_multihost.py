"""Two local processes x 4 devices (jax.distributed over gloo) train like one process with 8 devices, and save
and restore an orbax checkpoint from both processes."""

import pytest

pytestmark = pytest.mark.multiprocess


def test_two_processes_match_one_process_and_round_trip_a_checkpoint(tmp_path, workers):
    port = workers.free_port()
    procs = [workers.start("multihost", i, 2, port, tmp_path / "ckpt") for i in range(2)]
    results = [workers.finish(p) for p in procs]
    reference = workers.finish(workers.start("single_process_reference"))

    assert reference["devices"] == 8
    for i, r in enumerate(results):
        assert (r["process_index"], r["process_count"], r["devices"], r["local_devices"]) == (i, 2, 8, 4)
        # The same losses as one process, before and after an AdamW update.
        assert r["losses"] == pytest.approx(reference["losses"], abs=1e-5)
        assert r["restored_equal"] and r["restored_specs_equal"] and r["restored_type"]
    # Each process loaded its own half of the batch rows.
    assert sorted(results[0]["rows"] + results[1]["rows"]) == reference["rows"] == list(range(8))
    assert (tmp_path / "ckpt").is_dir()
