"""benchmarks/compare.py: aggregation, Markdown tables and failed-run reporting on hand-made results (no training)."""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(model, seed, ndcg, tail, head, s_per_epoch, rss, mrr=0.1, tail_user_threshold=5):
    """A worker summary with the fields the parent reads."""
    return {
        "model": model, "seed": seed,
        "best_valid": {"mrr@10": mrr, "ndcg@10": ndcg},
        "test": {"mrr@10": mrr, "ndcg@10": ndcg, "ndcg@10[tail_user]": tail, "ndcg@10[head_user]": head},
        "train_s_per_epoch": s_per_epoch, "epochs": 2, "valid_eval_s": 1.0, "test_eval_s": 2.0, "test_rows": 100,
        "test_users_per_s": 50.0, "peak_rss_mb": rss, "peak_gpu_mb": None, "params": 1000,
        "groups": "long-tail groups ...", "group_rows": {"tail_user": 30, "head_user": 70},
        "dataset": {"users": 10, "items": 20, "inters": 300},
        "protocol": {"valid_metric": "MRR@10", "epochs": 2, "loss_type": "CE" if model == "A" else "BPR",
                     "llm_tail_user_threshold": tail_user_threshold},
        "env": {"platform": "Linux", "cpus": 2, "python": "3.11", "torch": "2.x", "recbole": "1.2.1", "device": "cpu"},
    }


def runs_of(compare):
    """Model A: three seeds; model B: one failure, one success; model C: failed only."""
    return [
        {"model": "A", "seed": 1, "result": result("A", 1, 0.1, 0.05, 0.2, 10.0, 100.0), "error": None},
        {"model": "A", "seed": 2, "result": result("A", 2, 0.2, 0.10, 0.3, 20.0, 200.0), "error": None},
        {"model": "A", "seed": 3, "result": result("A", 3, 0.3, 0.15, 0.4, 30.0, 300.0), "error": None},
        {"model": "B", "seed": 1, "result": None, "error": "RuntimeError: boom | bang"},
        {"model": "B", "seed": 2, "result": result("B", 2, 0.5, 0.4, 0.6, 5.0, 50.0), "error": None},
        {"model": "C", "seed": 1, "result": None, "error": "killed by signal 9 (out of memory?)"},
    ]


def test_mean_std_by_hand(compare):
    mean, std = compare.mean_std([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert std == pytest.approx(0.1)  # sqrt(((-0.1)^2 + 0 + 0.1^2) / (3 - 1))
    assert compare.mean_std([0.25]) == (0.25, 0.0)
    assert compare.format_mean_std([0.1, 0.2, 0.3]) == "0.2000 ± 0.1000"
    assert compare.format_mean_std([0.5]) == "0.5000"
    assert compare.format_mean_std([]) == "—"
    assert compare.format_mean_std([1.0, 2.0], decimals=2) == "1.50 ± 0.71"  # std sqrt(0.5) = 0.7071


def test_aggregate_collects_each_key_over_successful_seeds(compare):
    models = compare.aggregate(runs_of(compare))
    assert list(models) == ["A", "B", "C"]
    a, b, c = models["A"], models["B"], models["C"]
    assert (a["runs"], a["ok"], a["failed"]) == (3, 3, [])
    assert a["test"]["ndcg@10[tail_user]"] == pytest.approx([0.05, 0.10, 0.15])
    assert list(a["test"]) == ["mrr@10", "ndcg@10", "ndcg@10[tail_user]", "ndcg@10[head_user]"]
    assert a["cost"]["train_s_per_epoch"] == [10.0, 20.0, 30.0]
    assert a["cost"]["peak_gpu_mb"] == []  # None is not measured
    assert (b["runs"], b["ok"], b["failed"]) == (2, 1, [(1, "RuntimeError: boom | bang")])
    assert b["test"]["ndcg@10"] == [0.5]
    assert (c["ok"], c["test"]) == (0, {})


def test_markdown_table_escapes_pipes(compare):
    table = compare.markdown_table(["a", "b"], [[1, "x|y"]])
    assert table == "| a | b |\n| --- | --- |\n| 1 | x\\|y |"


def test_overall_table(compare):
    table = compare.overall_table(compare.aggregate(runs_of(compare)), "MRR@10")
    lines = table.splitlines()
    assert lines[0] == "| model | valid mrr@10 (best) | test mrr@10 | test ndcg@10 |"
    assert lines[2] == "| A | 0.1000 ± 0.0000 | 0.1000 ± 0.0000 | 0.2000 ± 0.1000 |"
    assert lines[3] == "| B (1/2 runs ok) | 0.1000 | 0.1000 | 0.5000 |"
    assert lines[4] == "| C (0/1 runs ok) | failed: killed by signal 9 (out of memory?) | — | — |"
    long = compare.aggregate([{"model": "D", "seed": 1, "result": None, "error": "x" * 200}])
    assert "| failed: " + "x" * 157 + "... |" in compare.overall_table(long, "MRR@10")


def test_group_table(compare):
    models = compare.aggregate(runs_of(compare))
    keys = compare.group_metric_keys(models, "MRR@10")
    assert keys == ["ndcg@10"]  # mrr@10 has no group keys here; hit@10 is absent
    lines = compare.group_table(models, keys).splitlines()
    assert lines[0] == "| model | metric | all | tail_user | head_user | tail_item | head_item |"
    assert lines[2] == "| A | ndcg@10 | 0.2000 ± 0.1000 | 0.1000 ± 0.0500 | 0.3000 ± 0.1000 | — | — |"
    assert lines[3] == "| B (1/2 runs ok) | ndcg@10 | 0.5000 | 0.4000 | 0.6000 | — | — |"
    assert lines[4] == "| C (0/1 runs ok) | failed (see Failed runs) | — | — | — | — | — |"
    assert compare.group_table(models, []) == ""


def test_cost_table_means_and_drops_unmeasured_columns(compare):
    lines = compare.cost_table(compare.aggregate(runs_of(compare))).splitlines()
    assert "peak GPU MB" not in lines[0]
    assert lines[0].startswith("| model | train s/epoch | epochs run | valid eval s |")
    assert lines[2] == "| A | 20.00 | 2 | 1.00 | 2.00 | 50 | 200 | 1,000 |"
    assert lines[4] == "| C (0/1 runs ok) | failed (see Failed runs) | — | — | — | — | — | — |"


def test_failed_runs_are_reported(compare):
    assert compare.last_error_line(1, "Traceback ...\n  File x\nValueError: bad key\n\n") == "ValueError: bad key"
    assert compare.last_error_line(1, "epoch 1 \r 50%\rKeyError: 'x'\r") == "KeyError: 'x'"
    assert compare.last_error_line(-9, "partial") == "killed by signal 9 (out of memory?)"
    assert compare.last_error_line(3, "", "") == "exit status 3, no output"
    summary, error = compare.parse_worker_output(0, 'log\nCOMPARE_RESULT {"model": "A"}\n', "")
    assert (summary, error) == ({"model": "A"}, None)
    assert compare.parse_worker_output(1, "", "oops\nRuntimeError: x\n") == (None, "RuntimeError: x")
    assert compare.parse_worker_output(0, "no marker\n", "")[0] is None
    assert compare.failed_lines(runs_of(compare)) == [
        "- B seed 1: `RuntimeError: boom | bang`", "- C seed 1: `killed by signal 9 (out of memory?)`"]


def test_protocol_split_and_report(compare, tmp_path):
    runs = runs_of(compare)
    common, differing = compare.split_protocol(runs)
    assert common == {"valid_metric": "MRR@10", "epochs": 2, "llm_tail_user_threshold": 5}
    assert differing == {"loss_type": {"A": "CE", "B": "BPR"}}
    args = SimpleNamespace(dataset="toy", seeds="1,2,3", config_files=None, extra=["--epochs=2"])
    section = compare.render_section(args, "python benchmarks/compare.py ...", runs)
    for expected in ("## A, B, C on toy, seeds 1,2,3", "- Dataset: 10 users, 20 items, 300 interactions",
                     "Command-line keys for every run: `--epochs=2`", "### Overall metrics (test)",
                     "### Metrics by long-tail group (test)", "### Cost", "### Failed runs",
                     "| loss_type | \"CE\" | \"BPR\" | null |"):
        assert expected in section
    out = tmp_path / "sub" / "toy.md"
    compare.write_report(str(out), "toy", "section one\n", append=True)  # a missing file gets the title
    compare.write_report(str(out), "toy", "section two\n", append=True)
    assert out.read_text() == "# Model comparison on toy\n\nsection one\n\nsection two\n"
    compare.write_report(str(out), "toy", "fresh\n", append=False)
    assert out.read_text() == "# Model comparison on toy\n\nfresh\n"


def test_worker_command_carries_the_protocol(compare):
    cmd = compare.worker_command("SASRec", "ml-100k", 7, "a.yaml b.yaml", ["--epochs=1"])
    assert cmd[0] == sys.executable and cmd[2:] == [
        "--worker", "--model=SASRec", "--dataset=ml-100k", "--config_files=a.yaml b.yaml", "--seed=7", "--epochs=1"]
    with pytest.raises(SystemExit):
        compare.parse_args(["--dataset", "d", "--models", "A", "--seed=3"])  # seeds belong to --seeds
    assert compare.parse_args(["--dataset", "d", "--models", "A", "--epochs=1"]).out == "results/d.md"


def test_quick_start_still_has_the_hook_points(compare):
    """The worker wraps these two functions of quick_start; a rename must fail here, not in a long benchmark."""
    import inspect

    from recbole_llm import quick_start

    assert list(inspect.signature(quick_start._build_trainer).parameters) == [
        "config", "model", "dataset", "valid_data", "test_data"]
    assert list(inspect.signature(quick_start.create_dataset).parameters) == ["config"]


def test_a_model_entry_carries_its_own_keys(compare):
    """``M@k=v`` runs M with k=v replacing the shared value; the row keeps the whole entry as its name."""
    cmd = compare.worker_command("LLMESR_SASRec@llmesr_distill=False@epochs=3", "d", 1, None,
                                 ["--epochs=1", "--learning_rate=0.01"])
    assert cmd[3:] == ["--model=LLMESR_SASRec", "--dataset=d", "--seed=1", "--learning_rate=0.01",
                       "--llmesr_distill=False", "--epochs=3"]
    with pytest.raises(SystemExit):
        compare.parse_args(["--dataset", "d", "--models", "A@seed=3"])  # seeds belong to --seeds
    with pytest.raises(SystemExit):
        compare.parse_args(["--dataset", "d", "--models", "A@novalue"])
    runs = [{"model": "A", "seed": 1, "result": result("A", 1, 0.1, 0.05, 0.2, 10.0, 100.0), "error": None},
            {"model": "A@epochs=3", "seed": 1, "error": None,
             "result": {**result("A", 1, 0.2, 0.1, 0.3, 10.0, 100.0), "protocol": {"epochs": 3}}}]
    common, differing = compare.split_protocol(runs)
    assert differing["epochs"] == {"A": 2, "A@epochs=3": 3}
    assert list(compare.aggregate(runs)) == ["A", "A@epochs=3"]


def test_bad_entries_are_reported_before_any_run(compare):
    """Every entry's Config is built up front: a misspelt key or model is named with its entry, a good one passes."""
    problems = compare.check_entries(["SASRecAP", "LLMESR_SASRec@llmesr_distil=False", "SASRc"], "ml-100k", None,
                                     ["--epochs=1"])
    assert len(problems) == 2
    assert problems[0].startswith("--models entry 'LLMESR_SASRec@llmesr_distil=False': config key 'llmesr_distil'")
    assert "did you mean 'llmesr_distill'" in problems[0]
    assert problems[1].startswith("--models entry 'SASRc': unknown model 'SASRc'")
    assert compare.check_entries(["SASRecAP@epochs=2"], "ml-100k", None, ["--epochs=1"]) == []
    assert compare.main(["--dataset", "ml-100k", "--models", "SASRc", "--seeds", "1", "--out", "unused.md"]) == 2


def test_prefix_and_all_positions_protocols_differ_only_in_the_sample_mode_and_its_batch():
    """results/ml-1m-half.md compares the two sample modes: nothing else in their presets may differ."""
    import yaml

    protocols = SCRIPT.parent / "protocols"
    prefix, all_positions = (yaml.safe_load((protocols / name).read_text(encoding="utf-8"))
                             for name in ("prefix.yaml", "all_positions.yaml"))
    differing = {key for key in prefix.keys() | all_positions.keys() if prefix.get(key) != all_positions.get(key)}
    assert differing == {"llm_train_mode", "train_batch_size"}
    assert (prefix["llm_train_mode"], all_positions["llm_train_mode"]) == ("prefix", "all_positions")
