"""benchmarks/compare.py: aggregation, Markdown tables and failed-run reporting on hand-made results (no training)."""
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO_ROOT, load_benchmark

SCRIPT = REPO_ROOT / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    return load_benchmark("compare")


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


def split_report(compare, text):
    """``(title line, summary block, the sections after it)`` of a results file."""
    title, rest = text.split("\n\n", 1)
    summary, sections = rest.split(compare.SUMMARY_END + "\n\n", 1)
    assert summary.startswith(compare.SUMMARY_START)
    return title, summary, sections


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
    title, summary, sections = split_report(compare, out.read_text())
    assert title == "# Model comparison on toy" and sections == "section one\n\nsection two\n"
    assert "No section of this file carries a record of its rows." in summary
    compare.write_report(str(out), "toy", "fresh\n", append=False)
    assert split_report(compare, out.read_text())[2] == "fresh\n"


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


# ---------------------------------------------------------------- the summary table and the plot

def ranked(model, seed, overall, tail_item, epochs=20):
    """A successful run of a sequential model with all four groups; head and user groups follow from ``overall``."""
    groups = {"tail_item": tail_item, "head_item": overall + 0.01, "tail_user": overall - 0.01,
              "head_user": overall + 0.02}
    summary = result(model.split("@")[0], seed, overall, 0.0, 0.0, 10.0, 100.0)
    summary["test"] = {"ndcg@10": overall, **{f"ndcg@10[{g}]": v for g, v in groups.items()}}
    summary.update(epochs=epochs, protocol={"valid_metric": "NDCG@10"})
    return {"model": model, "seed": seed, "result": summary, "error": None}


def backbone_and_variant():
    """SASRecAP: overall 0.10/0.12, tail 0.02/0.04; its LLM-ESR variant: 0.11/0.13, tail 0.03/0.05; HLLM failed."""
    variant = "LLMESR_SASRec@llmesr_alpha=0.01"
    return [ranked("SASRecAP", 1, 0.10, 0.02), ranked("SASRecAP", 2, 0.12, 0.04),
            ranked(variant, 1, 0.11, 0.03, epochs=18), ranked(variant, 2, 0.13, 0.05, epochs=20),
            {"model": "HLLM", "seed": 1, "result": None, "error": "RuntimeError: boom"}]


def section_of(compare, runs, dataset="toy"):
    args = SimpleNamespace(dataset=dataset, seeds="1,2", config_files=None, extra=[])
    return compare.render_section(args, "python benchmarks/compare.py ...", runs)


def test_backbone_mapping(compare):
    expected = {"LLMESR_SASRec": "SASRecAP", "DualLLMSASRec": "SASRecAP", "LLMESR_GRU4Rec": "GRU4RecAP",
                "DualLLMGRU4Rec": "GRU4RecAP", "LLMESR_Bert4Rec": "BERT4RecAP", "DualLLMBert4Rec": "BERT4RecAP",
                "HLLM": "SASRecAP", "SLMRec": "SASRec", "RecLoRA": "DIN"}
    assert {model: compare.backbone_of(model) for model in expected} == expected
    assert compare.backbone_of("LLMESR_GRU4Rec@llmesr_alpha=0.5@epochs=3") == "GRU4RecAP"
    for stock in ("SASRec", "SASRecAP", "GRU4Rec", "DIN"):
        assert compare.backbone_of(stock) is None


def test_backbone_row_runs_under_the_same_protocol_keys(compare):
    def row(model, section=0):
        return {"model": model, "dataset": "d", "metric": "ndcg@10", "section": section, "values": {"overall": [0.1]}}
    rows = [row("SASRecAP"), row("SASRecAP@llm_exclude_history=False"), row("SASRecAP@learning_rate=0.01")]
    pick = lambda model: compare.backbone_row(row(model), rows)["model"]  # noqa: E731
    assert pick("HLLM") == "SASRecAP"
    assert pick("HLLM@llm_exclude_history=False") == "SASRecAP@llm_exclude_history=False"
    assert pick("HLLM@hllm_loss=softmax") == "SASRecAP"  # a model key is no protocol key
    assert compare.backbone_row(row("HLLM", section=1), rows[2:])["model"] == "SASRecAP@learning_rate=0.01"



def test_backbone_row_is_never_a_later_run_under_other_keys(compare):
    def row(model, section, keys=None, code="a", overall=0.1):
        protocol = keys is not None and {"config_files": {"p.yaml": "x"}, "keys": keys, "code": code}
        return {"model": model, "dataset": "d", "metric": "ndcg@10", "section": section, "protocol": protocol or None,
                "values": {"overall": [overall]}}
    old_backbone, old_variant = row("SASRecAP", 0), row("LLMESR_SASRec", 1)  # written before protocols were kept
    capped = row("SASRecAP", 2, ["--epochs=300"], code="a", overall=0.2)
    bpr = row("SASRecAP", 4, ["--epochs=300", "--loss_type=BPR"], code="b", overall=0.3)
    rows = [old_backbone, old_variant, capped, bpr]
    pick = lambda variant: compare.backbone_row(variant, rows)["values"]["overall"]  # noqa: E731
    assert pick(old_variant) == [0.1]  # the latest backbone at or before its section, not the later BPR run
    assert pick(row("LLMESR_SASRec", 3, ["--epochs=300"], code="c")) == [0.2]  # same files and keys, other code
    assert pick(row("LLMESR_SASRec", 5, ["--epochs=300", "--loss_type=BPR"], code="b")) == [0.3]  # same protocol

def test_summary_table_by_hand(compare):
    """Means, sample std and the change against the backbone, computed by hand from the fake runs."""
    records, without = compare.read_records(section_of(compare, backbone_and_variant()))
    assert without == 0 and len(records) == 1
    lines = compare.summary_table(compare.summary_rows(records)).splitlines()
    assert lines[0] == ("| model | keys | backbone | metric | test overall | test tail_item | vs backbone | "
                        "tail_item vs backbone | epochs run | seeds |")
    # std of (0.10, 0.12) = sqrt(2 * 0.01^2 / 1) = 0.0141; 0.12 / 0.11 - 1 = +9.1%; 0.04 / 0.03 - 1 = +33.3%
    assert lines[2] == "| SASRecAP | (none) | — | ndcg@10 | 0.1100 ± 0.0141 | 0.0300 ± 0.0141 | — | — | 20 | 1, 2 |"
    assert lines[3] == ("| LLMESR_SASRec@llmesr_alpha=0.01 | (none) | SASRecAP | ndcg@10 | 0.1200 ± 0.0141 | "
                        "0.0400 ± 0.0141 | +9.1% | +33.3% | 18–20 | 1, 2 |")
    assert lines[4] == "| HLLM | (none) | SASRecAP | ndcg@10 | failed | — | — | — | — | none (1 failed) |"
    keyed = SimpleNamespace(dataset="toy", seeds="1,2", config_files=None, extra=["--loss_type=BPR", "--epochs=3"])
    section = compare.render_section(keyed, "python benchmarks/compare.py ...", backbone_and_variant()[:2])
    lines = compare.summary_table(compare.summary_rows(compare.read_records(section)[0])).splitlines()
    assert lines[2].startswith("| SASRecAP | --epochs=3 --loss_type=BPR | — | ndcg@10 |")  # the section's keys
    assert compare.relative_change([0.09], [0.1]) == "-10.0%"
    assert compare.relative_change([0.1], [0.0]) == compare.relative_change([0.1], []) == "—"


def test_a_record_survives_any_model_name(compare):
    record = {"dataset": "toy", "rows": [{"model": "A@x=-->", "values": {}}]}
    comment = compare.record_comment(record)
    assert "-->" not in comment[:-3] and "\n" not in comment
    assert compare.read_records(f"## section\n\n{comment}\n")[0] == [record]


def test_summary_covers_every_appended_section(compare, tmp_path):
    """An old section without a record keeps its place and is named under the summary; the rows of both new sections
    are in it, and a backbone found only in the first section is the reference of the second."""
    out = tmp_path / "toy.md"
    out.write_text("# Model comparison on toy\n\nhand-written notes\n\n## old run\n\n### Overall metrics (test)\n\n"
                   "| model |\n", encoding="utf-8")
    compare.write_report(str(out), "toy", section_of(compare, backbone_and_variant()[:2]), append=True)
    second = [ranked("LLMESR_SASRec", 1, 0.121, 0.02), ranked("GRU4RecAP", 1, 0.05, 0.01)]
    compare.write_report(str(out), "toy", section_of(compare, second), append=True)
    title, summary, sections = split_report(compare, out.read_text(encoding="utf-8"))
    assert title == "# Model comparison on toy"
    assert sections.startswith("hand-written notes\n\n## old run\n")
    assert sections.count(compare.SUMMARY_START) == 0 and sections.count("<!-- compare-rows: ") == 2
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| SASRecAP", "| LLMESR_SASRec", "| GRU4RecAP"]
    assert rows[1].split(" | ")[6:8] == ["+10.0%", "-33.3%"]  # 0.121 / 0.11, 0.02 / 0.03: the first SASRecAP
    assert "1 section(s) of this file were written before these records existed" in summary
    compare.write_report(str(out), "toy", section_of(compare, second), append=False)
    assert "were written before" not in split_report(compare, out.read_text(encoding="utf-8"))[1]


def test_plot_is_a_png_with_a_bar_per_model_and_group(compare, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "toy.md"
    runs = backbone_and_variant() + [ranked("GRU4RecAP", 1, 0.05, 0.01)]
    compare.write_report(str(out), "toy", section_of(compare, runs), append=False)
    axes = compare.plot_summary(compare.summary_rows(compare.read_records(out.read_text())[0]), str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(axes) == 1  # one metric, one panel
    bars = [container for container in axes[0].containers if hasattr(container, "patches")]
    assert [bar.get_label() for bar in bars] == [
        "SASRecAP (backbone)", "LLMESR_SASRec@llmesr_alpha=0.01", "GRU4RecAP"]  # the failed HLLM has no bars
    assert [len(bar.patches) for bar in bars] == [5, 5, 5]
    assert [tick.get_text() for tick in axes[0].get_xticklabels()] == list(compare.LONG_TAIL_GROUPS)
    assert bars[0].patches[1].get_height() == pytest.approx(0.03)  # SASRecAP's mean on tail items
    assert bars[0].patches[0].get_hatch() == "//" and bars[1].patches[0].get_hatch() is None
    assert compare.main(["--from_results", str(out), "--plot"]) == 0
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert compare.plot_summary([], str(tmp_path / "none.png")) == [] and not (tmp_path / "none.png").exists()


def test_plot_draws_an_entry_once_per_set_of_command_line_keys(compare, tmp_path):
    pytest.importorskip("matplotlib")
    protocol = {"config_files": {}, "code": "c"}
    rows = [{"model": "HLLM", "metric": "ndcg@10", "seeds": [1], "failed_seeds": [], "epochs": [3],
             "values": {g: [value] for g in compare.LONG_TAIL_GROUPS}, "dataset": "toy", "section": index,
             "protocol": {**protocol, "keys": keys}}
            for index, (keys, value) in enumerate([(["--epochs=30"], 0.1), (["--epochs=50"], 0.2),
                                                   (["--epochs=30"], 0.3)])]
    drawn = compare.plot_rows(rows)
    assert [(compare.command_keys(row), row["values"]["tail_item"]) for row in drawn] == [
        (("--epochs=30",), [0.3]), (("--epochs=50",), [0.2])]  # the latest of each set of keys
    axes = compare.plot_summary(rows, str(tmp_path / "keys.png"))
    labels = [bar.get_label() for bar in axes[0].containers if hasattr(bar, "patches")]
    assert labels == ["HLLM --epochs=30", "HLLM --epochs=50"]
    assert compare.plot_label(rows[0], rows[:1]) == "HLLM"  # a lone entry keeps its plain name


def test_plot_without_matplotlib_stops_before_any_run(compare, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError

    def no_run(*args):
        raise AssertionError("a run started")
    monkeypatch.setattr(compare, "check_entries", no_run)
    monkeypatch.setattr(compare, "run_all", no_run)
    assert compare.main(["--dataset", "d", "--models", "A", "--plot", "--out", "unused.md"]) == 2
    assert capsys.readouterr().err.strip() == "--plot needs matplotlib: pip install 'recbole-llm[plot]'"
    with pytest.raises(SystemExit):
        compare.parse_args(["--from_results", "x.md"])  # re-drawing is all it does: --plot is required


def test_parallel_runs_keep_the_model_seed_order_and_share_the_threads(compare, monkeypatch):
    """--jobs 2: the second seed finishes first, yet the runs come back in (model, seed) order, and each worker
    gets half of the CPU threads unless the caller set OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 4)

    def fake_worker(model, dataset, seed, config_files, extra, keep_checkpoints=False):
        code = (f"import os, time, json; time.sleep({0.6 if seed == 1 else 0.0}); "
                f"print({compare.MARKER!r} + json.dumps({{'seed': {seed}, "
                f"'threads': os.environ.get('OMP_NUM_THREADS')}}))")
        return [sys.executable, "-c", code]

    monkeypatch.setattr(compare, "worker_command", fake_worker)
    runs = compare.run_all(["A"], [1, 2], "d", None, [], jobs=2)
    assert [(run["model"], run["seed"], run["result"]["seed"]) for run in runs] == [("A", 1, 1), ("A", 2, 2)]
    assert {run["result"]["threads"] for run in runs} == {"2"}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert compare.worker_env(2)["OMP_NUM_THREADS"] == "1"


def appended(compare, path, runs, extra=(), config_files=None):
    """``runs`` written to ``path`` as a new section, under ``extra`` keys and ``config_files``."""
    args = SimpleNamespace(dataset="toy", seeds="", config_files=config_files, extra=list(extra))
    compare.write_report(str(path), "toy", compare.render_section(args, "python benchmarks/compare.py ...", runs),
                         append=True)


def summary_lines(compare, path):
    rows = compare.summary_rows(compare.read_records(path.read_text(encoding="utf-8"))[0])
    return compare.summary_table(rows).splitlines()[2:]


def test_keys_cell_names_the_config_files_that_not_every_row_ran_with(compare, tmp_path):
    protocol, preset = tmp_path / "protocol.yaml", tmp_path / "preset.yaml"
    protocol.write_text("epochs: 3\n", encoding="utf-8")
    preset.write_text("learning_rate: 0.01\n", encoding="utf-8")
    out = tmp_path / "toy.md"
    appended(compare, out, [ranked("SASRecAP", 1, 0.10, 0.02)], config_files=str(protocol))
    appended(compare, out, [ranked("HLLM", 1, 0.11, 0.03)], extra=["--epochs=12"],
             config_files=f"{protocol} {preset}")
    cells = [line.split(" | ")[1] for line in summary_lines(compare, out)]
    assert cells == ["(none)", "preset.yaml --epochs=12"]


def test_seeds_of_one_protocol_in_several_sections_pool_into_one_row(compare, tmp_path):
    out, variant = tmp_path / "toy.md", "LLMESR_SASRec@llmesr_alpha=0.01"
    appended(compare, out, [ranked("SASRecAP", 1, 0.10, 0.02), ranked("SASRecAP", 2, 0.12, 0.04)])
    appended(compare, out, [ranked(variant, 1, 0.11, 0.03, epochs=18)])
    appended(compare, out, [ranked(variant, 2, 0.13, 0.05), {"model": variant, "seed": 3, "result": None,
                                                              "error": "RuntimeError: boom"}])
    # the variant: (0.11, 0.13) from two sections, std 0.0141, against SASRecAP's 0.11 mean: +9.1%, tail +33.3%
    assert summary_lines(compare, out) == [
        "| SASRecAP | (none) | — | ndcg@10 | 0.1100 ± 0.0141 | 0.0300 ± 0.0141 | — | — | 20 | 1, 2 |",
        "| LLMESR_SASRec@llmesr_alpha=0.01 | (none) | SASRecAP | ndcg@10 | 0.1200 ± 0.0141 | 0.0400 ± 0.0141 | "
        "+9.1% | +33.3% | 18–20 | 1, 2 (3 failed) |"]
    appended(compare, out, [ranked(variant, 3, 0.15, 0.07)])  # the failed seed, rerun
    assert summary_lines(compare, out)[1].endswith("| 0.1300 ± 0.0200 | 0.0500 ± 0.0200 | +18.2% | +66.7% | 18–20 | "
                                                   "1, 2, 3 |")


def test_a_seed_run_again_counts_once_with_its_latest_result(compare, tmp_path):
    out = tmp_path / "toy.md"
    appended(compare, out, [ranked("SASRecAP", 1, 0.10, 0.02), ranked("SASRecAP", 2, 0.12, 0.04)])
    appended(compare, out, [ranked("SASRecAP", 2, 0.14, 0.06, epochs=30)])
    assert summary_lines(compare, out) == [
        "| SASRecAP | (none) | — | ndcg@10 | 0.1200 ± 0.0283 | 0.0400 ± 0.0283 | — | — | 20–30 | 1, 2 |"]


def test_sections_under_another_protocol_or_without_one_stay_apart(compare, tmp_path, monkeypatch):
    out, protocol = tmp_path / "toy.md", tmp_path / "p.yaml"
    protocol.write_text("epochs: 10\n", encoding="utf-8")
    appended(compare, out, [ranked("SASRecAP", 1, 0.10, 0.02)])
    appended(compare, out, [ranked("SASRecAP", 2, 0.12, 0.04)], extra=["--epochs=300"])
    appended(compare, out, [ranked("SASRecAP", 3, 0.14, 0.04)], config_files=str(protocol))
    protocol.write_text("epochs: 20\n", encoding="utf-8")  # the same file name, other contents
    appended(compare, out, [ranked("SASRecAP", 4, 0.16, 0.04)], config_files=str(protocol))
    monkeypatch.setattr(compare, "code_digest", lambda: "other code")
    appended(compare, out, [ranked("SASRecAP", 5, 0.18, 0.04)])
    text = out.read_text(encoding="utf-8")
    out.write_text(text + "\n" + compare.record_comment({"dataset": "toy", "rows": [  # a record of the older format
        {"model": "SASRecAP", "metric": "ndcg@10", "seeds": [1], "failed_seeds": [], "epochs": [20],
         "values": {"overall": [0.2], "tail_item": [0.02]}}]}) + "\n", encoding="utf-8")
    assert [line.split(" | ")[-1] for line in summary_lines(compare, out)] == ["1 |", "2 |", "3 |", "4 |", "5 |", "1 |"]


def test_code_digest_follows_the_code_and_property_files(compare, tmp_path):
    (tmp_path / "recbole_llm").mkdir()
    (tmp_path / "properties").mkdir()
    (tmp_path / "recbole_llm" / "model.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "properties" / "model.yaml").write_text("k: 1\n", encoding="utf-8")
    first = compare.code_digest(str(tmp_path))
    (tmp_path / "recbole_llm" / "notes.txt").write_text("not code\n", encoding="utf-8")
    assert compare.code_digest(str(tmp_path)) == first
    (tmp_path / "properties" / "model.yaml").write_text("k: 2\n", encoding="utf-8")
    assert compare.code_digest(str(tmp_path)) != first
