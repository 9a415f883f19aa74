"""bench.bench_decode runs end to end on a tiny synthetic Llama and reports every engine asked for."""
import json

import pytest

pytest.importorskip("transformers")
from bench import bench_decode  # noqa: E402

TINY = ["--layers", "1", "--hidden", "128", "--intermediate", "256", "--heads", "4",
        "--prompt", "8", "--new-tokens", "3", "--rounds", "1", "--threads", "1", "--quiet"]


def test_tiny_run_reports_each_engine(tmp_path):
    out = tmp_path / "r.jsonl"
    assert bench_decode.main(TINY + ["--engines", "fp32,w4,w2,llamacpp", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[0]["kind"] == "machine"
    by_engine = {r["engine"]: r for r in recs[1:]}
    assert set(by_engine) == {"fp32", "w4", "w2", "llamacpp"}
    for name in ("fp32", "w4", "w2"):
        r = by_engine[name]
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and len(r["decode_samples_ms"]) == 1
        assert r["prefill_tok_s"] == pytest.approx(8 / r["prefill_ms"] * 1e3, rel=1e-3)
    assert by_engine["w4"]["weights"] == "W4 g128 per-OC"
    cpp = by_engine["llamacpp"]
    assert "skipped" in cpp or cpp["decode_ms_per_token"] > 0  # llama-cpp-python is optional


@pytest.mark.parametrize("argv, needle", [(["--engines", "fp8"], "--engines"),
                                          (["--hidden", "130"], "--heads"),
                                          (["--compile"], "--cache static")])
def test_bad_arguments_are_named(argv, needle, capsys):
    assert bench_decode.main(TINY + argv) == 2
    assert needle in capsys.readouterr().err
