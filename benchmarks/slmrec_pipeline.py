"""SLMRec's three stages on one dataset: SASRec, the deep teacher, the distilled student, and a student trained alone.

    python benchmarks/slmrec_pipeline.py --dataset ml-1m-half [--seed 42] [--teacher_layers 4] [--student_layers 2] \
        [--blocks 2] [--sasrec_config benchmarks/protocols/slmrec_sasrec.yaml] \
        [--config_files benchmarks/protocols/slmrec_cpu.yaml] [--out results/<dataset>-slmrec.md] [--key=value ...]

1. ``SASRecAP`` (RecBole's SASRec network) under ``--sasrec_config``: its item table feeds every SLMRec stage.
2. The teacher: ``SLMRec`` with ``--teacher_layers`` layers.
3. The student: ``--student_layers`` layers, distilled from the teacher over ``--blocks`` blocks.
4. The same student trained alone (no teacher), the paper's "same-depth" baseline.

The defaults (a 4-layer teacher and a 2-layer student of all-MiniLM-L6-v2, 2 blocks) keep the paper's 8 -> 4 depth
ratio at a size a CPU trains in minutes.

Each stage runs in its own process through ``benchmarks/compare.py``'s worker (``quick_start.run``), keeps its
checkpoint for the next stage, and reports metrics, time and parameters (total and trainable). Then the teacher
and the distilled student are timed side by side in one process (``--side_by_side TEACHER STUDENT`` does only that).
The SLMRec stages share ``--config_files``; every stage gets the ``--key=value`` arguments. The report goes to
``--out``, with the YAML of every stage.

    python benchmarks/slmrec_pipeline.py --pool REPORT [REPORT ...] --out results/<dataset>-slmrec-seeds.md

pools the reports of runs at different seeds: each stage's test metrics as mean ± std, and the per-seed
differences between stages (the distilled student against the teacher and against the student alone). The reports
must share their stages and YAML (the checkpoints' time stamps aside) and differ in seed.
"""
import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

METRICS_HEADING = "## Metrics (test, at the best validation epoch)"
GROUPS_HEADING = "## By long-tail group (test)"

# ---------------------------------------------------------------- worker: compare's, plus the total parameter count

def worker_main(argv):
    """compare.py's worker; its summary also holds ``total_params`` (frozen ones included)."""
    from recbole_llm import quick_start

    totals = {}
    build_trainer, run_worker = quick_start._build_trainer, compare.run_worker

    def counting_build_trainer(config, model, *args):
        totals["total_params"] = sum(p.numel() for p in model.parameters())
        return build_trainer(config, model, *args)

    quick_start._build_trainer = counting_build_trainer
    compare.run_worker = lambda *args: {**run_worker(*args), **totals}
    compare.worker_main(argv)


# ---------------------------------------------------------------- parent: the stages

def stages(args, checkpoint):
    """``[(label, --models entry, config files)]`` in run order; ``checkpoint(label)`` names a stage's .pth."""
    sasrec = f"slmrec_item_emb_checkpoint={checkpoint('sasrec')}"
    student = f"SLMRec@{sasrec}@slmrec_n_layers={args.student_layers}"
    return [
        ("sasrec", args.sasrec_model, args.sasrec_config),
        ("teacher", f"SLMRec@{sasrec}@slmrec_n_layers={args.teacher_layers}", args.config_files),
        ("student_distilled", f"{student}@slmrec_distill=True@slmrec_distill_blocks={args.blocks}"
                              f"@slmrec_teacher_checkpoint={checkpoint('teacher')}", args.config_files),
        ("student_alone", student, args.config_files),
    ]


def run_stage(label, entry, args, config_files, checkpoint):
    """One stage in its own worker process, saving its checkpoint as ``checkpoint(label)``; compare's run record."""
    entry += f"@llm_checkpoint_name={os.path.basename(checkpoint(label))}"
    cmd = compare.worker_command(entry, args.dataset, args.seed, config_files, args.extra, keep_checkpoints=True)
    cmd[1] = os.path.abspath(__file__)  # this script's worker: compare's, plus the total parameter count
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    result, error = compare.parse_worker_output(done.returncode, done.stdout, done.stderr)
    print(f"{label}: {'ok' if result else 'FAILED: ' + error} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"model": label, "seed": args.seed, "result": result, "error": error, "entry": entry,
            "config_files": config_files}


def efficiency_table(runs, args):
    """Stage x parameters (total, trainable), train s/epoch, test users/s, and the student/teacher speed-ups."""
    ok = {run["model"]: run["result"] for run in runs if run["result"]}
    teacher = ok.get("teacher")
    rows = []
    for label, result in ok.items():
        speedups = ["—", "—"]
        if teacher and label.startswith("student"):
            speedups = [f"{teacher['train_s_per_epoch'] / result['train_s_per_epoch']:.2f}×",
                        f"{result['test_users_per_s'] / teacher['test_users_per_s']:.2f}×"]
        rows.append([label, f"{result.get('total_params', 0):,}", f"{result['params']:,}",
                     f"{result['train_s_per_epoch']:.1f}", f"{result['test_users_per_s']:.1f}", *speedups])
    header = ["stage", "total params", "trainable params", "train s/epoch", "test users/s",
              "train speed-up vs teacher", "inference speed-up vs teacher"]
    ideal = args.teacher_layers / args.student_layers
    return compare.markdown_table(header, rows) + (
        f"\n\nIdeal layer ratio {args.teacher_layers}/{args.student_layers} = {ideal:.1f}×: the speed-up if all time "
        f"went into the transformer layers. The distilled student's epoch also runs the teacher's forward pass.")


def side_by_side(paths, batches=2, rounds=3):
    """``{label: {"users_per_s", "train_s_per_step", "layers"}}``: the checkpoints in ``paths`` timed in this one
    process, in turn, for ``rounds`` rounds (the median counts), so that other load on the machine hits all alike.

    Inference: ``full_sort_predict`` on the first ``batches`` test batches; training: forward and backward of the
    model's own CE loss (no teacher) on the first ``batches`` training batches.
    """
    import itertools
    import statistics

    import torch

    from recbole_llm.quick_start import load_data_and_model

    loaded = {label: load_data_and_model(path) for label, path in paths.items()}
    seconds = {label: {"infer": [], "train": []} for label in paths}
    users = {}
    for _ in range(rounds):
        for label, (_, model, _, train_data, _, test_data) in loaded.items():
            model.eval()
            evaluation = [batch[0] for batch in itertools.islice(test_data, batches)]
            users[label] = sum(len(batch) for batch in evaluation)
            start = time.perf_counter()
            with torch.no_grad():
                for batch in evaluation:
                    model.full_sort_predict(batch)
            seconds[label]["infer"].append(time.perf_counter() - start)
            model.train()
            start = time.perf_counter()
            for batch in itertools.islice(train_data, batches):
                model.calculate_loss(batch).backward()
            model.zero_grad()
            seconds[label]["train"].append((time.perf_counter() - start) / batches)
    return {label: {"users_per_s": users[label] / statistics.median(seconds[label]["infer"]),
                    "train_s_per_step": statistics.median(seconds[label]["train"]),
                    "layers": loaded[label][1].n_layers} for label in paths}


def side_by_side_section(timings, paths):
    """Markdown: the side-by-side timings, each model's speed-up over the first one and the ideal layer ratio."""
    base_label, base = next(iter(timings.items()))
    rows = [[label, t["layers"], f"{t['users_per_s']:.1f}", f"{t['train_s_per_step']:.2f}",
             f"{t['users_per_s'] / base['users_per_s']:.2f}×",
             f"{base['train_s_per_step'] / t['train_s_per_step']:.2f}×", f"{base['layers'] / t['layers']:.1f}×"]
            for label, t in timings.items()]
    header = ["model", "layers", "inference users/s", "train s/step", f"inference speed-up vs {base_label}",
              f"train speed-up vs {base_label}", "ideal (layer ratio)"]
    sources = ", ".join(f"{label} `{path}`" for label, path in paths.items())
    return "\n".join(["## Side by side: teacher and student in one process", "",
                      f"Checkpoints: {sources}. Each round times every model in turn (full-ranking inference on the "
                      f"first test batches; forward + backward of its own CE on the first training batches, without "
                      f"a teacher); the median of the rounds counts. Load from other processes on the machine "
                      f"thus hits all models alike, unlike the per-stage figures above.", "",
                      compare.markdown_table(header, rows), ""])


def render(args, command, runs):
    """The Markdown report: context, each stage's YAML and keys, metrics overall and by group, efficiency."""
    results = [run["result"] for run in runs if run["result"]]
    env = results[0]["env"] if results else {}
    models = compare.aggregate(runs)
    valid_metric = results[-1]["protocol"]["valid_metric"] if results else ""
    out = [f"# SLMRec pipeline on {args.dataset}, seed {args.seed}", "",
           f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
           f"- Machine: {env.get('platform', '?')}, {env.get('cpus', '?')} CPUs, python {env.get('python', '?')}, "
           f"torch {env.get('torch', '?')}, recbole {env.get('recbole', '?')}, device {env.get('device', '?')}",
           f"- Command: `{command}`", ""]
    if results and results[0].get("dataset"):
        d = results[0]["dataset"]
        out += [f"- Dataset: {d['users']:,} users, {d['items']:,} items, {d['inters']:,} interactions", ""]
    out += ["## Stages", ""]
    for run in runs:
        keys = " ".join(compare.split_variant(run["entry"])[1] + args.extra)
        out += [f"- **{run['model']}**: `{run['config_files']}` plus `{keys}`"]
    for path in dict.fromkeys([args.sasrec_config, *args.config_files.split()]):
        with open(path, encoding="utf-8") as f:
            out += ["", f"`{path}`:", "", "```yaml", f.read().rstrip(), "```"]
    out += ["", METRICS_HEADING, "", compare.overall_table(models, valid_metric), ""]
    groups = compare.group_table(models, compare.group_metric_keys(models, valid_metric))
    if groups:
        out += [GROUPS_HEADING, "", groups, ""]
    out += ["## Efficiency", "", efficiency_table(runs, args), "", compare.cost_table(models), ""]
    failed = compare.failed_lines(runs)
    if failed:
        out += ["## Failed stages", "", *failed, ""]
    return "\n".join(out)


# ---------------------------------------------------------------- --pool: the reports of several seeds in one table

POOLED_COLUMNS = [("test ndcg@10", "NDCG@10"), ("test hit@10", "HR@10"), ("test fullmrr", "FullMRR"),
                  ("tail_item", "tail-item NDCG@10"), ("head_item", "head-item NDCG@10")]
PAIRS = [("student_distilled", "teacher"), ("student_distilled", "student_alone"), ("student_alone", "teacher")]


def markdown_rows(text, heading):
    """The rows of the first Markdown table under ``heading``, as dicts of header -> cell; [] without one."""
    if f"\n{heading}\n" not in text:
        return []
    lines = text.split(f"\n{heading}\n", 1)[1].lstrip("\n").splitlines()
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")]
             for line in itertools.takewhile(lambda line: line.startswith("|"), lines)]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def report_values(path):
    """``(seed, protocol, {stage: {column: value}})`` of one pipeline report; the protocol is its stages and YAML,
    with the checkpoints' time stamps taken out."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    title = re.search(r"^# SLMRec pipeline on .+, seed (\d+)$", text, re.MULTILINE)
    if not title or "\n## Stages\n" not in text:
        raise SystemExit(f"{path}: not a report of benchmarks/slmrec_pipeline.py (no title line or Stages section)")
    protocol = text.split("\n## Stages\n", 1)[1].split(f"\n{METRICS_HEADING}\n", 1)[0]
    values = {}
    rows = markdown_rows(text, METRICS_HEADING) + [
        {"model": row["model"], **{group: row[group] for group in ("tail_item", "head_item")}}
        for row in markdown_rows(text, GROUPS_HEADING) if row["metric"] == "ndcg@10"]
    for row in rows:
        for column, _ in POOLED_COLUMNS:
            if column in row:
                try:
                    values.setdefault(row["model"], {})[column] = float(row[column])
                except ValueError:
                    raise SystemExit(f"{path}: stage {row['model']} has no {column} ({row[column]!r}); pool only "
                                     f"reports whose stages all succeeded") from None
    return int(title.group(1)), re.sub(r"\d{8}-\d{6}", "<stamp>", protocol), values


def pooled_report(paths, command):
    """The Markdown of ``--pool``: every stage's metrics over the seeds, and the stages' per-seed differences."""
    reports = sorted(((*report_values(path), path) for path in paths), key=lambda report: report[0])
    seeds = [seed for seed, *_ in reports]
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"two reports have the same seed ({seeds}); pool one report per seed")
    for seed, protocol, _, path in reports[1:]:
        if protocol != reports[0][1]:
            raise SystemExit(f"{path} ran other stages or YAML than {reports[0][3]}; only runs of one protocol pool")
    values = [stage_values for _, _, stage_values, _ in reports]
    stages = [stage for stage in values[0] if all(stage in v for v in values)]
    rows = [[stage] + [compare.format_mean_std([v[stage][column] for v in values]) for column, _ in POOLED_COLUMNS]
            for stage in stages]
    differences = []
    for a, b in PAIRS:
        if a in stages and b in stages:
            deltas = [v[a]["test ndcg@10"] - v[b]["test ndcg@10"] for v in values]
            mean, std = compare.mean_std(deltas)
            differences.append([f"{a} − {b}", f"{mean:+.4f} ± {std:.4f}", " ".join(f"{d:+.4f}" for d in deltas),
                                f"{sum(d > 0 for d in deltas)} of {len(deltas)}"])
    return "\n".join([
        "# SLMRec pipeline: the seeds pooled", "", f"- Command: `{command}`",
        f"- Seeds: {', '.join(map(str, seeds))}; reports: {', '.join(f'`{path}`' for *_, path in reports)}", "",
        "Test metrics at each stage's best validation epoch, mean ± sample std over the seeds:", "",
        compare.markdown_table(["stage", *(header for _, header in POOLED_COLUMNS)], rows), "",
        "Test NDCG@10 differences between stages, seed by seed (in the order above):", "",
        compare.markdown_table(["stages", "mean ± std", "per seed", "higher in"], differences), ""])


def pool_main(argv):
    parser = argparse.ArgumentParser(prog="slmrec_pipeline.py --pool", allow_abbrev=False,
                                     description="Pool the reports of pipeline runs at different seeds.")
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--out", required=True, help="Markdown file of the pooled tables")
    args = parser.parse_args(argv)
    report = pooled_report(args.reports, shlex.join(["python", "benchmarks/slmrec_pipeline.py", "--pool", *argv]))
    print(report)
    compare.write_text_atomic(args.out, report + "\n")
    print(f"written to {args.out}")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Any other --key=value is passed to every stage's Config.")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--teacher_layers", type=int, default=4)
    parser.add_argument("--student_layers", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=2, help="slmrec_distill_blocks of the student")
    parser.add_argument("--sasrec_model", default="SASRecAP")
    parser.add_argument("--sasrec_config", default="benchmarks/protocols/slmrec_sasrec.yaml")
    parser.add_argument("--config_files", default="benchmarks/protocols/slmrec_cpu.yaml",
                        help="YAML files of the SLMRec stages, space-separated")
    parser.add_argument("--checkpoint_dir", default="saved")
    parser.add_argument("--out", default=None, help="Markdown file (default results/<dataset>-slmrec.md)")
    parser.add_argument("--side_by_side", nargs=2, metavar=("TEACHER", "STUDENT"),
                        help="only time these two SLMRec checkpoints side by side and add the section to --out")
    args, extra = parser.parse_known_args(argv)
    if any(not arg.startswith("--") or "=" not in arg for arg in extra):
        parser.error("extra arguments must be --key=value")
    args.extra = extra + [f"--checkpoint_dir={args.checkpoint_dir}"]
    return args


def main(argv):
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    if argv[:1] == ["--pool"]:
        return pool_main(argv[1:])
    args = parse_args(argv)
    out = args.out or os.path.join("results", f"{args.dataset}-slmrec.md")
    if args.side_by_side:
        teacher, student = args.side_by_side
        return append_side_by_side(out, {"teacher": teacher, "student": student})
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def checkpoint(label):
        return os.path.join(args.checkpoint_dir, f"slmrec-pipeline-{args.dataset}-{stamp}-{label}.pth")

    runs = []
    for label, entry, config_files in stages(args, checkpoint):
        runs.append(run_stage(label, entry, args, config_files, checkpoint))
        if runs[-1]["result"] is None:
            break  # the next stages need this one's checkpoint
    report = render(args, shlex.join(["python", "benchmarks/slmrec_pipeline.py", *argv]), runs)
    print("\n" + report)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(report + "\n")
    print(f"written to {out}")
    if not (all(run["result"] for run in runs) and len(runs) == 4):
        return 1
    return append_side_by_side(out, {"teacher": checkpoint("teacher"), "student": checkpoint("student_distilled")})


def append_side_by_side(out, paths):
    """Time the teacher and the student side by side and add the section to the report ``out``."""
    section = side_by_side_section(side_by_side(paths), paths)
    print("\n" + section)
    with open(out, "a", encoding="utf-8") as f:
        f.write("\n" + section)
    print(f"added to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
