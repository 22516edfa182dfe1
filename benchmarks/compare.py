"""Compare models under one protocol: metrics overall and by long-tail group, time, memory, parameters.

    python benchmarks/compare.py --dataset ml-1m-half --models SASRec,GRU4Rec,BERT4Rec \
        [--config_files "protocol.yaml"] [--seeds 42,43,44] [--out results/ml-1m-half.md] [--append] [--key=value ...]

A model entry may carry its own keys, for ablations: ``LLMESR_SASRec@llmesr_distill=False@llmesr_alpha=0.5`` is a
row of its own, run with those keys on top of (and replacing) the shared ``--key=value`` arguments.

Every (model, seed) runs in its own process (``--worker``, hidden), through recbole_llm's own pipeline
(``quick_start.run``), with the same config files and ``--key=value`` arguments plus ``--seed=<seed>``; each model's
own defaults come from the property files as usual. The parent aggregates mean ± std over the seeds and writes
``results/<dataset>.md`` (``--out`` overrides; the file is overwritten unless ``--append`` adds a section).
Before any run, every entry's Config is built once (``--check``, hidden), so that an unknown model or key, or a value
of the wrong type, stops the harness at once. A run that fails later is reported with its last error line and the
others go on.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

MARKER = "COMPARE_RESULT "  # prefix of the worker's one JSON line on stdout
GROUPS = ("tail_user", "head_user", "tail_item", "head_item")  # recbole_llm.evaluator.GROUPS, without importing torch
# Effective config values shown in the report; values that differ between models are listed per model.
PROTOCOL_KEYS = ("eval_args", "metrics", "topk", "valid_metric", "epochs", "stopping_step", "eval_step",
                 "train_batch_size", "eval_batch_size", "learning_rate", "MAX_ITEM_LIST_LENGTH", "llm_train_mode",
                 "llm_exclude_history",
                 "loss_type", "train_neg_sample_args", "llm_head_ratio", "llm_tail_user_threshold",
                 "llm_tail_item_threshold", "metric_decimal_place", "reproducibility", "device")
RESERVED_KEYS = ("model", "dataset", "seed", "config_files")  # set by the harness, not by --key=value
COST_COLUMNS = (  # (worker field, header, format)
    ("train_s_per_epoch", "train s/epoch", "{:.2f}"),
    ("epochs", "epochs run", "{:g}"),
    ("valid_eval_s", "valid eval s", "{:.2f}"),
    ("test_eval_s", "test eval s (incl. best-model reload)", "{:.2f}"),
    ("test_users_per_s", "test users/s", "{:.0f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("peak_gpu_mb", "peak GPU MB", "{:.0f}"),
    ("params", "trainable params", "{:,.0f}"),
)


# ---------------------------------------------------------------- worker: one (model, seed) in this process

def _timed(function, record):
    """``function`` that appends its wall seconds to ``record`` (after a CUDA sync, so GPU work is counted)."""
    import torch

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        record.append(time.perf_counter() - start)
        return result
    return wrapper


def _instrument(stats):
    """Hook quick_start so that a run records what its result lacks: dataset size, timings, model, groups.

    ``run_recbole_llm`` looks ``create_dataset`` and ``_build_trainer`` up in its module at call time, so wrapping
    them there leaves the pipeline itself untouched.
    """
    from recbole_llm import quick_start

    create_dataset, build_trainer = quick_start.create_dataset, quick_start._build_trainer

    def recording_create_dataset(config):
        dataset = create_dataset(config)  # before data_preparation, which replaces sequential rows by samples
        stats["dataset"] = {"users": dataset.user_num - 1, "items": dataset.item_num - 1, "inters": dataset.inter_num}
        return dataset

    def timing_build_trainer(config, model, dataset, valid_data, test_data):
        trainer = build_trainer(config, model, dataset, valid_data, test_data)
        stats.update(config=config, model=model, trainer=trainer, test_rows=test_data.sample_size)
        trainer._train_epoch = _timed(trainer._train_epoch, stats["train_s"])
        valid_evaluate, test_evaluate = (_timed(trainer.evaluate, stats[key]) for key in ("valid_s", "test_s"))
        trainer.evaluate = lambda data, *a, **kw: (test_evaluate if data is test_data else valid_evaluate)(
            data, *a, **kw)
        return trainer

    quick_start.create_dataset, quick_start._build_trainer = recording_create_dataset, timing_build_trainer


def run_worker(model, dataset, config_files, keep_checkpoint):
    """Train and test one model through ``quick_start.run``; return the worker's JSON-ready summary.

    The seed and the ``--key=value`` arguments are on this process's command line, where RecBole's Config reads them.
    """
    import resource

    import recbole
    import torch

    from recbole_llm.quick_start import run

    stats = {"train_s": [], "valid_s": [], "test_s": []}
    _instrument(stats)
    result = run(model, dataset, config_file_list=config_files, saved=True)
    if result["saved_model_file"] and not keep_checkpoint:
        os.remove(result["saved_model_file"])
    config, trainer = stats["config"], stats["trainer"]
    groups = getattr(trainer.evaluator, "groups", None)  # a GroupEvaluator for sequential models
    protocol = {key: config[key] for key in PROTOCOL_KEYS}
    if groups is not None:
        protocol.update(llm_tail_user_threshold=groups.user_threshold, llm_tail_item_threshold=groups.item_threshold)
    cuda = config["device"].type == "cuda"
    test_s = sum(stats["test_s"])
    return {
        "model": model, "seed": config["seed"],
        # RecBole returns no best-valid result when a run never validates (eval_step 0).
        "best_valid": dict(result["best_valid_result"] or {}), "test": dict(result["test_result"]),
        "train_s_per_epoch": statistics.mean(stats["train_s"]) if stats["train_s"] else None,
        "epochs": len(stats["train_s"]),
        "valid_eval_s": statistics.mean(stats["valid_s"]) if stats["valid_s"] else None,
        "test_eval_s": test_s, "test_rows": stats["test_rows"],
        "test_users_per_s": stats["test_rows"] / test_s if test_s else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None,
        "params": sum(p.numel() for p in stats["model"].parameters() if p.requires_grad),
        "groups": groups.describe() if groups is not None else None,
        "group_rows": dict(trainer.evaluator.row_counts) if groups is not None else None,  # of the test evaluation
        "dataset": stats["dataset"], "protocol": protocol,
        "env": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "torch": torch.__version__, "recbole": recbole.__version__, "device": str(config["device"]),
                "gpu": torch.cuda.get_device_name(config["device"]) if cuda else None},
    }


def worker_main(argv):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    for name in ("--model", "--dataset", "--config_files"):
        parser.add_argument(name)
    parser.add_argument("--keep_checkpoints", action="store_true")
    args, _ = parser.parse_known_args(argv)  # the rest (--seed, --key=value) reaches Config through sys.argv
    summary = run_worker(args.model, args.dataset, args.config_files.split() if args.config_files else None,
                         args.keep_checkpoints)
    print(MARKER + json.dumps(summary, default=str), flush=True)


def check_main(argv):
    """``--check <json>``: build each entry's Config, nothing more, and print one line per entry that fails."""
    from recbole_llm.config import Config

    spec = json.loads(argv[0])
    failures = []
    for entry in spec["models"]:
        model, overrides = split_variant(entry)
        sys.argv = [sys.argv[0], *_with_overrides(spec["extra"], overrides)]  # RecBole reads its keys from argv
        try:
            Config(model=model, dataset=spec["dataset"], config_file_list=spec["config_files"])
        except Exception as error:  # whatever stops this entry's config stops its runs: report it, run nothing
            failures.append(f"--models entry {entry!r}: {error}")
    print("\n".join(failures))
    return 1 if failures else 0


# ---------------------------------------------------------------- parent: run the workers, aggregate, report

def check_entries(models, dataset, config_files, extra):
    """The lines saying why an entry's config cannot be built (unknown model or key, wrong type), before any run.

    One process builds every entry's Config, so a typo in the last ablation row fails in seconds, not hours in.
    """
    spec = {"models": models, "dataset": dataset, "extra": extra,
            "config_files": config_files.split() if config_files else None}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--check", json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode == 0:
        return []
    return [line for line in done.stdout.splitlines() if line.strip()] or [last_error_line(done.returncode, done.stderr)]


def split_variant(entry):
    """``'M@k=v@k2=v2'`` -> ``('M', ['--k=v', '--k2=v2'])``: a --models entry and the keys of that row only."""
    model, *keys = entry.split("@")
    for key in keys:
        if "=" not in key or key.split("=", 1)[0] in RESERVED_KEYS:
            raise ValueError(f"--models entry {entry!r}: after '@' come key=value pairs other than "
                             f"{', '.join(RESERVED_KEYS)}, got {key!r}")
    return model, [f"--{key}" for key in keys]


def _with_overrides(extra, overrides):
    """``extra`` without the keys ``overrides`` sets, then ``overrides`` (RecBole refuses a key given twice)."""
    overridden = {arg.split("=", 1)[0] for arg in overrides}
    return [arg for arg in extra if arg.split("=", 1)[0] not in overridden] + overrides


def worker_command(entry, dataset, seed, config_files, extra, keep_checkpoints=False):
    """The argv of one worker: the shared protocol (config files, ``extra``), then the entry's own keys."""
    model, overrides = split_variant(entry)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--model={model}", f"--dataset={dataset}"]
    if config_files:
        cmd.append(f"--config_files={config_files}")
    cmd += [f"--seed={seed}", *_with_overrides(extra, overrides)]
    return cmd + (["--keep_checkpoints"] if keep_checkpoints else [])


def last_error_line(returncode, stderr, stdout=""):
    """The line that says why a worker failed: its last non-empty output line, or the signal that killed it."""
    if returncode is not None and returncode < 0:
        return f"killed by signal {-returncode} (out of memory?)"
    for text in (stderr, stdout):
        lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return f"exit status {returncode}, no output"


def parse_worker_output(returncode, stdout, stderr):
    """``(summary, None)`` for a successful worker, else ``(None, error line)``."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    if returncode == 0 and lines:
        return json.loads(lines[-1][len(MARKER):]), None
    return None, last_error_line(returncode, stderr, stdout)


def run_all(models, seeds, dataset, config_files, extra, keep_checkpoints=False):
    """Every (model, seed) in its own process; a list of ``{model, seed, result, error}``."""
    runs = []
    for model in models:
        for seed in seeds:
            start = time.perf_counter()
            done = subprocess.run(worker_command(model, dataset, seed, config_files, extra, keep_checkpoints),
                                  capture_output=True, text=True)
            result, error = parse_worker_output(done.returncode, done.stdout, done.stderr)
            runs.append({"model": model, "seed": seed, "result": result, "error": error})
            status = "ok" if result else f"FAILED: {error}"
            print(f"[{len(runs)}/{len(models) * len(seeds)}] {model} seed {seed}: {status} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return runs


def mean_std(values):
    """``(mean, sample standard deviation)``; the deviation is 0 for a single value."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(values, decimals=4):
    """``'0.2000 ± 0.1000'``; a single value without ``±``; no values as ``—``."""
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if len(values) > 1 else "")


def aggregate(runs):
    """Per model (in run order): its seeds, failures, and every value over its successful runs.

    ``{model: {"runs": n, "ok": n_ok, "failed": [(seed, error)], "test": {key: [..]}, "valid": {key: [..]},
    "cost": {field: [..]}}}``; metric keys keep the order of RecBole's result.
    """
    models = {}
    for run in runs:
        entry = models.setdefault(run["model"], {"runs": 0, "ok": 0, "failed": [], "test": {}, "valid": {},
                                                 "cost": {field: [] for field, _, _ in COST_COLUMNS}})
        entry["runs"] += 1
        result = run["result"]
        if result is None:
            entry["failed"].append((run["seed"], run["error"]))
            continue
        entry["ok"] += 1
        for part, source in (("test", "test"), ("valid", "best_valid")):
            for key, value in result[source].items():
                entry[part].setdefault(key, []).append(float(value))
        for field, _, _ in COST_COLUMNS:
            if result.get(field) is not None:
                entry["cost"][field].append(result[field])
    return models


def markdown_table(header, rows):
    """A GitHub Markdown table; ``|`` inside a cell is escaped."""
    def line(cells):
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header))] + [line(row) for row in rows])


def _model_cell(name, entry):
    return name if entry["ok"] == entry["runs"] else f"{name} ({entry['ok']}/{entry['runs']} runs ok)"


def _failed_cells(entry, width, detail=False):
    """A model whose runs all failed: 'failed' (with ``detail``, its first error line, cut), then dashes."""
    error = entry["failed"][0][1]
    text = f"failed: {error[:157] + '...' if len(error) > 160 else error}" if detail else "failed (see Failed runs)"
    return [text] + ["—"] * (width - 1)


def overall_table(models, valid_metric):
    """Model × best valid ``valid_metric`` and every overall test metric, mean ± std."""
    keys = next((list(e["test"]) for e in models.values() if e["ok"]), [])
    keys = [key for key in keys if "[" not in key]
    valid_key = valid_metric.lower()
    header = ["model", f"valid {valid_key} (best)"] + [f"test {key}" for key in keys]
    rows = []
    for name, entry in models.items():
        if entry["ok"]:
            cells = [format_mean_std(entry["valid"].get(valid_key))]
            cells += [format_mean_std(entry["test"].get(key)) for key in keys]
        else:
            cells = _failed_cells(entry, len(header) - 1, detail=True)
        rows.append([_model_cell(name, entry)] + cells)
    return markdown_table(header, rows)


def group_metric_keys(models, valid_metric, extra=("hit@10", "ndcg@10")):
    """The valid metric's key, then ``extra`` keys, among the overall test keys that have group keys."""
    keys = {key for entry in models.values() for key in entry["test"]}
    wanted = dict.fromkeys([valid_metric.lower(), *extra])
    return [key for key in wanted if key in keys and any(f"{key}[{g}]" in keys for g in GROUPS)]


def group_table(models, metric_keys):
    """(model, metric) × overall and each long-tail group, test, mean ± std; '' when no model has group keys."""
    if not metric_keys:
        return ""
    header = ["model", "metric", "all", *GROUPS]
    rows = []
    for name, entry in models.items():
        if not entry["ok"]:
            rows.append([_model_cell(name, entry)] + _failed_cells(entry, len(header) - 1))
            continue
        for key in metric_keys:
            rows.append([_model_cell(name, entry), key, format_mean_std(entry["test"].get(key))]
                        + [format_mean_std(entry["test"].get(f"{key}[{g}]")) for g in GROUPS])
    return markdown_table(header, rows)


def cost_table(models):
    """Model × time, memory and size, the mean over its successful runs; columns no run measured are left out."""
    columns = [(f, h, fmt) for f, h, fmt in COST_COLUMNS if any(e["cost"][f] for e in models.values())]
    header = ["model"] + [h for _, h, _ in columns]
    rows = []
    for name, entry in models.items():
        cells = ([fmt.format(statistics.mean(entry["cost"][f])) if entry["cost"][f] else "—" for f, _, fmt in columns]
                 if entry["ok"] else _failed_cells(entry, len(columns)))
        rows.append([_model_cell(name, entry)] + cells)
    return markdown_table(header, rows)


def failed_lines(runs):
    """One Markdown bullet per failed run."""
    return [f"- {run['model']} seed {run['seed']}: `{run['error']}`" for run in runs if run["result"] is None]


def split_protocol(runs):
    """``(common, differing)``: effective values shared by every successful run, and ``{key: {model: value}}``."""
    done = [run for run in runs if run["result"]]  # keyed by the --models entry, so variants stay apart
    common, differing = {}, {}
    for key in (done[0]["result"]["protocol"] if done else {}):
        values = {run["model"]: run["result"]["protocol"].get(key) for run in done}
        if all(value == done[0]["result"]["protocol"][key] for value in values.values()):
            common[key] = done[0]["result"]["protocol"][key]
        else:
            differing[key] = values
    return common, differing


def render_section(args, command, runs, now=None):
    """The Markdown section of one comparison: context, protocol, the three tables and the failures."""
    import yaml

    results = [run["result"] for run in runs if run["result"]]
    first = results[0] if results else {}
    env = first.get("env") or {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": "?", "device": "?"}
    models = aggregate(runs)
    common, differing = split_protocol(runs)
    valid_metric = common.get("valid_metric") or next(iter(differing.get("valid_metric", {}).values()), "")
    now = now or datetime.datetime.now().astimezone()
    threads = f" ({env['threads']} torch threads)" if env.get("threads") else ""
    machine = (f"{env['platform']}, {env['cpus']} CPUs{threads}, python {env.get('python', '?')}, torch {env['torch']}, "
               f"recbole {env.get('recbole', '?')}, device {env['device']}"
               + (f" ({env['gpu']})" if env.get("gpu") else ""))
    out = [f"## {', '.join(models)} on {args.dataset}, seeds {args.seeds}", "",
           f"- Date: {now:%Y-%m-%d %H:%M %Z}", f"- Machine: {machine}", f"- Command: `{command}`"]
    if first.get("dataset"):
        d = first["dataset"]
        out.append(f"- Dataset: {d['users']:,} users, {d['items']:,} items, {d['inters']:,} interactions "
                   f"(as loaded, after RecBole's filtering)")
    out += ["- Protocol: every run had the same config files and command-line keys, plus `--seed=<seed>`; each model's "
            "own defaults come from RecBole's and recbole_llm's property files. Each (model, seed) ran in its own "
            "process. Metrics are the test result at the best validation epoch, mean ± sample std (n−1) over the "
            "seeds, as RecBole rounds them (`metric_decimal_place`); time and memory are means.", ""]
    out += ["### Protocol", ""]
    for path in (args.config_files or "").split():
        with open(path, encoding="utf-8") as f:
            out += [f"`{path}`:", "", "```yaml", f.read().rstrip(), "```", ""]
    if not args.config_files:
        out += ["Config files: none.", ""]
    out += [f"Command-line keys for every run: `{' '.join(args.extra) or '(none)'}`; seeds: {args.seeds}.", "",
            "Effective values (the merged config of the runs):", "", "```yaml",
            yaml.safe_dump(common, sort_keys=False, default_flow_style=None).rstrip(), "```", ""]
    if differing:
        names = list(models)
        out += ["Values that differ between models (from their own property files):", "",
                markdown_table(["key", *names], [[k, *(json.dumps(v.get(m)) for m in names)]
                                                 for k, v in differing.items()]), ""]
    if first.get("groups"):
        rows = ", ".join(f"{g} {n}" for g, n in first["group_rows"].items())
        out += [f"Groups: {first['groups']}. Test rows: {rows}.", ""]
    out += ["### Overall metrics (test)", "", overall_table(models, valid_metric), ""]
    groups = group_table(models, group_metric_keys(models, valid_metric))
    if groups:
        out += ["### Metrics by long-tail group (test)", "", groups, ""]
    out += ["### Cost", "", cost_table(models), "",
            "Train s/epoch is the mean over the epochs run; valid eval s the mean per validation; test eval s "
            "includes reloading the best checkpoint; test users/s = test rows / test eval s; peak RSS is the "
            "worker process's maximum (dataset, model, RecBole's FLOPs probe, training and evaluation).", ""]
    failed = failed_lines(runs)
    if failed:
        out += ["### Failed runs", "", *failed, ""]
    return "\n".join(out)


def write_report(path, dataset, section, append):
    """Overwrite ``path`` with a title and the section, or with ``append`` add the section to it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if append and os.path.isfile(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" + section)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"# Model comparison on {dataset}\n\n{section}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Any other --key=value is passed to every run's RecBole Config.")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--models", required=True, help="comma-separated, e.g. SASRec,GRU4Rec,BERT4Rec")
    parser.add_argument("--config_files", default=None, help="space-separated YAML files given to every run")
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated seeds (default 42,43,44)")
    parser.add_argument("--out", default=None, help="Markdown file (default results/<dataset>.md)")
    parser.add_argument("--append", action="store_true", help="add a section to --out instead of overwriting it")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep each run's best-model checkpoint")
    args, extra = parser.parse_known_args(argv)
    for arg in extra:
        key = arg[2:].split("=", 1)[0]
        if not arg.startswith("--") or "=" not in arg:
            parser.error(f"extra arguments must be --key=value, got {arg!r}")
        if key in RESERVED_KEYS:
            parser.error(f"--{key}= is set by the harness; use --models, --dataset, --seeds or --config_files")
    for path in (args.config_files or "").split():
        if not os.path.isfile(path):
            parser.error(f"config file {path!r} does not exist")
    for entry in args.models.split(","):
        try:
            split_variant(entry)
        except ValueError as error:
            parser.error(str(error))
    args.extra = extra
    args.out = args.out or os.path.join("results", f"{args.dataset}.md")
    return args


def main(argv):
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    if argv[:1] == ["--check"]:
        return check_main(argv[1:])
    args = parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    problems = check_entries(models, args.dataset, args.config_files, args.extra)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    runs = run_all(models, seeds, args.dataset, args.config_files, args.extra, args.keep_checkpoints)
    section = render_section(args, shlex.join(["python", "benchmarks/compare.py", *argv]), runs)
    print("\n" + section)
    write_report(args.out, args.dataset, section, args.append)
    print(f"written to {args.out}")
    return 1 if any(run["result"] is None for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
