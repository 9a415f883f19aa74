"""Progress bars of the long flow steps: shown when asked (tqdm), silent otherwise, and the
quantised result does not depend on them."""
from __future__ import annotations

import io

import torch

from flows_testutils import calib_ids, tiny_model
from layerpress.flows import quantize_model
from layerpress.flows.progress import progress_bar


def test_progress_bar_disabled_is_silent(capsys):
    bar = progress_bar(3, "x", enabled=False)
    for _ in range(3):
        bar.update()
    bar.close()
    assert capsys.readouterr().err == ""


def test_progress_bar_auto_off_without_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    bar = progress_bar(2, "x", enabled=None)
    bar.update(2)
    bar.close()
    assert type(bar).__name__ == "_NoBar"


def test_quantize_model_progress_bar(capsys):
    runs = []
    for progress in (True, False):
        model = tiny_model("llama", layers=2)
        quantize_model(model, bits=4, method="rtn", axis="oc", calib=calib_ids(), progress=progress)
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
        err = capsys.readouterr().err
        assert ("quantising (rtn)" in err) == progress, err[-500:]
        assert ("/2 " in err) == progress  # total of 2 blocks
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
