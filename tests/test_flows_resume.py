"""Per-block checkpoints of quantize_model and resuming an interrupted run (flows/checkpoint.py):
a resumed run equals an uninterrupted one bit for bit, damaged files are detected and not used,
and a checkpoint of another run is refused with the differences named."""
from __future__ import annotations

import json

import pytest
import torch

from layerpress.flows import quantize_model
from layerpress.flows.checkpoint import MANIFEST, CheckpointError

from flows_testutils import calib_ids, tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ARGS = dict(bits=3, group_size=32, axis="oc", method="gptq", outliers=0.01, lorc_rank=2)
LAYERS = 3


class Interrupt(Exception):
    pass


def _stop_after(k):
    def hook(i):
        if i == k:
            raise Interrupt(f"stopped after block {i}")
    return hook


def _run(ckpt=None, resume=False, hook=None, family="llama", **over):
    model = tiny_model(family, layers=LAYERS)
    report = quantize_model(model, calib=calib_ids(), checkpoint_dir=ckpt, resume=resume,
                            on_block_done=hook, **dict(ARGS, **over))
    return model, report


def _same(run_a, run_b):
    (ma, ra), (mb, rb) = run_a, run_b
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    da, db = ra.to_dict(), rb.to_dict()
    da.pop("time_s"), db.pop("time_s")
    assert da == db


@pytest.fixture(scope="module")
def uninterrupted():
    return _run()


def test_interrupted_run_resumes_to_the_same_result(tmp_path, uninterrupted):
    ck = tmp_path / "ck"
    with pytest.raises(Interrupt):
        _run(ck, hook=_stop_after(0))
    manifest = json.loads((ck / MANIFEST).read_text())
    assert [b["block"] for b in manifest["blocks"]] == [0] and not manifest["complete"]
    assert manifest["run"]["outliers"] == 0.01 and manifest["run"]["lorc_rank"] == 2
    assert not list(ck.glob(".*tmp*"))  # nothing half-written left behind

    seen = []
    resumed = _run(ck, resume=True, hook=seen.append)
    assert seen == [1, 2]  # block 0 was restored, not recomputed
    _same(resumed, uninterrupted)
    assert json.loads((ck / MANIFEST).read_text())["complete"]
    # only the two newest inputs files are kept (the last block needs none)
    assert sorted(p.name for p in ck.glob("inputs_*")) == ["inputs_00001.safetensors", "inputs_00002.safetensors"]

    # resuming a complete run restores every block and computes nothing
    seen.clear()
    _same(_run(ck, resume=True, hook=seen.append), uninterrupted)
    assert seen == []


def test_truncated_block_file_is_detected_and_recomputed(tmp_path, uninterrupted):
    ck = tmp_path / "ck"
    with pytest.raises(Interrupt):
        _run(ck, hook=_stop_after(1))
    f = ck / "block_00001.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # a half-written file
    seen = []
    resumed = _run(ck, resume=True, hook=seen.append)
    assert seen == [1, 2]  # block 1 is not used: recomputed from the saved inputs of block 1
    _same(resumed, uninterrupted)


def test_corrupt_inputs_file_falls_back_to_an_earlier_block(tmp_path, uninterrupted):
    ck = tmp_path / "ck"
    with pytest.raises(Interrupt):
        _run(ck, hook=_stop_after(1))
    f = ck / "inputs_00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte: caught by the hash
    f.write_bytes(bytes(data))
    seen = []
    resumed = _run(ck, resume=True, hook=seen.append)
    # block 1's own file is intact, but the inputs of block 2 are not: the run goes back to the
    # newest point with intact inputs (block 1) and redoes blocks 1 and 2
    assert seen == [1, 2]
    _same(resumed, uninterrupted)


def test_a_different_run_is_refused(tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(Interrupt):
        _run(ck, hook=_stop_after(0))
    with pytest.raises(CheckpointError, match=r"different run.*lorc_rank: checkpoint 2, now 4"):
        _run(ck, resume=True, lorc_rank=4)
    with pytest.raises(CheckpointError, match=r"different run.*the model's weights/config differ"):
        quantize_model(tiny_model("llama", layers=LAYERS, seed=1), calib=calib_ids(),
                       checkpoint_dir=ck, resume=True, **ARGS)
    with pytest.raises(CheckpointError, match=r"different run.*the calibration data differ"):
        quantize_model(tiny_model("llama", layers=LAYERS), calib=calib_ids(seed=2),
                       checkpoint_dir=ck, resume=True, **ARGS)
    with pytest.raises(CheckpointError, match=r"already holds the checkpoints of a run: pass resume=True"):
        _run(ck)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty and holds no checkpoint manifest"):
        _run(other)
    (ck / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable checkpoint manifest"):
        _run(ck, resume=True)


def test_resume_on_an_empty_directory_starts_fresh(tmp_path, uninterrupted):
    _same(_run(tmp_path / "new", resume=True), uninterrupted)


def test_cli_checkpoint_flags_are_checked(capsys):
    from layerpress.cli import main

    assert main(["quantize", "--resume"]) == 2
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err
    assert main(["quantize", "--checkpoint-dir", "x", "--compare"]) == 2
    assert "cannot be combined with --compare" in capsys.readouterr().err
    assert main(["quantize", "--outliers", "1"]) == 2
    assert "--outliers must be a fraction in [0, 1), got 1.0" in capsys.readouterr().err
    assert main(["quantize", "--lorc-rank", "-2"]) == 2
    assert "--lorc-rank must be >= 0, got -2" in capsys.readouterr().err
