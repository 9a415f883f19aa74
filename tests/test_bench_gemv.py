"""bench.bench_gemv runs end to end on a tiny case and reports what its docstring promises."""
import json

import pytest

from bench import bench_gemv


def test_tiny_run_reports_every_case_against_the_bandwidths(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rc = bench_gemv.main(["--shapes", "256x512", "--bits", "4", "2", "--axes", "oc", "ic",
                          "--rounds", "1", "--target-s", "0.05", "--cache-multiple", "0.05",
                          "--resident", "--quiet", "--out", str(out)])
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["kind"] for r in recs]
    assert kinds[0] == "machine" and "copy" in kinds and "read" in kinds
    results = [r for r in recs if r["kind"] == "result"]
    ours = [r for r in results if r["impl"] == "layerpress"]
    # every (bits, axis) once resident and once rotating, plus the int4pack baseline
    assert sorted((r["bits"], r["axis"], r["copies"] == 1) for r in ours) == sorted(
        (b, a, res) for b in (4, 2) for a in ("oc", "ic") for res in (True, False))
    assert any(r["impl"] == bench_gemv.INT4PACK for r in results)
    packed = {(r["bits"], r["axis"]): r["bytes"] for r in ours}
    assert packed[(2, "oc")] < packed[(4, "oc")]  # bytes are the packed weight's, not a constant
    for r in results:
        assert r["median_ms"] > 0 and r["gb_per_s"] > 0 and r["fraction_of_copy"] > 0


def test_variants_are_timed_in_the_same_run(tmp_path):
    import layerpress
    info = layerpress.build_info()
    variants = info["cpu_gemm_variants"][:1] + info["cpu_gemm_opt_in_variants"][:1]
    out = tmp_path / "r.jsonl"
    assert bench_gemv.main(["--shapes", "256x512", "--bits", "4", "--axes", "oc", "--rounds", "1",
                            "--target-s", "0.05", "--cache-multiple", "0.05", "--no-baseline",
                            "--variants", *variants, "--quiet", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in recs if r["kind"] == "result"] == variants
    assert layerpress.build_info()["cpu_kernels"]["gemm"] == info["cpu_kernels"]["gemm"]


@pytest.mark.parametrize("argv, needle", [(["--shapes", "4096"], "--shapes"),
                                          (["--bits", "5"], "--bits"),
                                          (["--variants", "no-such-kernel"], "--variants")])
def test_bad_arguments_are_named(argv, needle, capsys):
    assert bench_gemv.main(argv + ["--quiet"]) == 2
    assert needle in capsys.readouterr().err
