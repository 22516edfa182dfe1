"""benchmarks/slmrec_pipeline.py --pool: the reports of several seeds pooled, on reports written by its own renderer
from hand-made stage results (no training)."""
from types import SimpleNamespace

import pytest

from conftest import load_benchmark
from test_compare import result as compare_result

STAGES = ["sasrec", "teacher", "student_distilled", "student_alone"]


@pytest.fixture(scope="module")
def pipeline():
    return load_benchmark("slmrec_pipeline")


def stage_run(stage, seed, ndcg):
    """A stage's run record whose test metrics all follow from its NDCG@10."""
    result = compare_result(stage, seed, ndcg, 0.0, 0.0, 10.0, 100.0)
    result["best_valid"] = {"ndcg@10": ndcg}
    result["test"] = {"hit@10": 2 * ndcg, "ndcg@10": ndcg, "fullmrr": ndcg / 2,
                      "ndcg@10[tail_item]": ndcg / 4, "ndcg@10[head_item]": 1.5 * ndcg}
    result["protocol"]["valid_metric"] = "NDCG@10"
    result["total_params"] = 2000
    return {"model": stage, "seed": seed, "result": result, "error": None, "entry": f"SLMRec@stage={stage}",
            "config_files": "stages.yaml"}


def write_report(pipeline, tmp_path, seed, ndcgs, yaml="epochs: 20\n", failed=()):
    """A report as the pipeline writes it; the stages in ``failed`` failed."""
    (tmp_path / "stages.yaml").write_text(yaml, encoding="utf-8")
    args = SimpleNamespace(dataset="test", seed=seed, extra=[], sasrec_config=str(tmp_path / "stages.yaml"),
                           config_files=str(tmp_path / "stages.yaml"), teacher_layers=4, student_layers=2)
    runs = [stage_run(stage, seed, ndcg) for stage, ndcg in zip(STAGES, ndcgs)]
    for run in runs:
        if run["model"] in failed:
            run.update(result=None, error="RuntimeError: boom")
    path = tmp_path / f"seed{seed}{'-failed' if failed else ''}.md"
    path.write_text(pipeline.render(args, "cmd", runs), encoding="utf-8")
    return str(path)


def table_rows(text, first_cell):
    return [line for line in text.splitlines() if line.startswith(f"| {first_cell} ")]


def test_pool_gives_mean_std_and_per_seed_differences(pipeline, tmp_path):
    reports = [write_report(pipeline, tmp_path, 43, [0.10, 0.08, 0.07, 0.09]),
               write_report(pipeline, tmp_path, 42, [0.10, 0.06, 0.09, 0.09])]
    text = pipeline.pooled_report(reports, "cmd")
    assert "- Seeds: 42, 43;" in text  # sorted by seed, whatever the order given
    # teacher: NDCG 0.06 and 0.08 -> 0.0700 ± 0.0141 (sqrt(2 * 0.01^2)); HR, FullMRR and the groups follow it
    assert table_rows(text, "teacher") == [
        "| teacher | 0.0700 ± 0.0141 | 0.1400 ± 0.0283 | 0.0350 ± 0.0071 | 0.0175 ± 0.0035 | 0.1050 ± 0.0212 |"]
    # distilled - teacher: +0.03 at seed 42, -0.01 at seed 43
    assert table_rows(text, "student_distilled − teacher") == [
        "| student_distilled − teacher | +0.0100 ± 0.0283 | +0.0300 -0.0100 | 1 of 2 |"]
    assert table_rows(text, "student_distilled − student_alone") == [
        "| student_distilled − student_alone | -0.0100 ± 0.0141 | +0.0000 -0.0200 | 0 of 2 |"]


def test_pool_refuses_other_protocols_repeated_seeds_and_failed_stages(pipeline, tmp_path):
    first = write_report(pipeline, tmp_path, 42, [0.1] * 4)
    other = write_report(pipeline, tmp_path, 43, [0.1] * 4, yaml="epochs: 5\n")
    with pytest.raises(SystemExit, match="ran other stages or YAML"):
        pipeline.pooled_report([first, other], "cmd")
    with pytest.raises(SystemExit, match="same seed"):
        pipeline.pooled_report([first, first], "cmd")
    failed = write_report(pipeline, tmp_path, 44, [0.1] * 4, failed=["teacher"])
    with pytest.raises(SystemExit, match="stage teacher .*has no test ndcg@10"):
        pipeline.pooled_report([failed], "cmd")
    not_a_report = tmp_path / "other.md"
    not_a_report.write_text("# Something else\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="not a report"):
        pipeline.pooled_report([str(not_a_report)], "cmd")


def test_pool_writes_its_tables_to_out(pipeline, tmp_path, capsys):
    reports = [write_report(pipeline, tmp_path, seed, [0.1] * 4) for seed in (42, 43)]
    out = tmp_path / "pooled.md"
    assert pipeline.main(["--pool", *reports, "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# SLMRec pipeline: the seeds pooled") and text in capsys.readouterr().out + "\n"
    assert "--pool" in text.splitlines()[2]  # the command that wrote it
