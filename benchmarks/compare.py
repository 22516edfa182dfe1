"""Compare models under one protocol: metrics overall and by long-tail group, time, memory, parameters.

    python benchmarks/compare.py --dataset ml-1m-half --models SASRec,GRU4Rec,BERT4Rec \
        [--config_files "protocol.yaml"] [--seeds 42,43,44] [--out results/ml-1m-half.md] [--append] [--plot] \
        [--key=value ...]
    python benchmarks/compare.py --from_results results/ml-1m-half.md --plot   # re-draw the picture, run nothing

A model entry may carry its own keys, for ablations: ``LLMESR_SASRec@llmesr_distill=False@llmesr_alpha=0.5`` is a
row of its own, run with those keys on top of (and replacing) the shared ``--key=value`` arguments.

Every (model, seed) runs in its own process (``--worker``, hidden), through recbole_llm's own pipeline
(``quick_start.run``), with the same config files and ``--key=value`` arguments plus ``--seed=<seed>``; each model's
own defaults come from the property files as usual. The parent aggregates mean ± std over the seeds and writes
``results/<dataset>.md`` (``--out`` overrides; the file is overwritten unless ``--append`` adds a section).
Before any run, every entry's Config is built once (``--check``, hidden), so that an unknown model or key, or a value
of the wrong type, stops the harness at once. A run that fails later is reported with its last error line and the
others go on.

Each section carries a machine-readable record of its rows (an HTML comment), and every write regenerates the
summary table at the top of the file from the records of all its sections. The record keeps the section's protocol:
the contents of its config files, its ``--key=value`` arguments and a digest of the package's code. The runs of one
entry in sections with the same protocol are pooled by seed into one summary row, so that seeds run one at a time
(``--seeds 43 --append``, in another session) give one mean ± std. ``--plot`` also draws the valid metric of
each model per long-tail group beside its backbone, into ``<out without .md>.png``; it needs the optional matplotlib
(``pip install 'recbole-llm[plot]'``).
"""
import argparse
import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import resource
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
# The test groups of the summary record and the plot, "overall" being the plain metric key.
LONG_TAIL_GROUPS = ("overall", "tail_item", "head_item", "tail_user", "head_user")
# The model each LLM model enhances, the row its gain is measured against; a model not listed is its own backbone.
BACKBONES = {
    "LLMESR_SASRec": "SASRecAP", "DualLLMSASRec": "SASRecAP",
    "LLMESR_GRU4Rec": "GRU4RecAP", "DualLLMGRU4Rec": "GRU4RecAP",
    "LLMESR_Bert4Rec": "BERT4RecAP", "DualLLMBert4Rec": "BERT4RecAP",
    "HLLM": "SASRecAP", "SLMRec": "SASRec", "RecLoRA": "DIN",
}
RECORD = re.compile(r"^<!-- compare-rows: (.*) -->$", re.MULTILINE)  # one per section, its rows as JSON
SUMMARY_START = "<!-- compare-summary: regenerated from the compare-rows records each time compare.py writes -->"
SUMMARY_END = "<!-- /compare-summary -->"
SECTION_HEADING = "### Overall metrics (test)"  # once in every section compare.py writes, records or not
PLOT_MISSING = "--plot needs matplotlib: pip install 'recbole-llm[plot]'"
RESERVED_KEYS = ("model", "dataset", "seed", "config_files")  # set by the harness, not by --key=value
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_TREES = (("recbole_llm", ".py"), ("properties", ".yaml"))  # what a run's results depend on, of this repository
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


# ---------------------------------------------------------------- helpers of every benchmark script

def peak_rss_mb():
    """This process's peak resident set size in MB (Linux reports it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def config_argv(keys):
    """``sys.argv`` holding only ``keys`` while a RecBole Config is built: Config reads ``--key=value`` from there."""
    argv = sys.argv
    sys.argv = [argv[0], *keys]
    try:
        yield
    finally:
        sys.argv = argv


def require_key_values(parser, extra):
    """Stop ``parser`` at the first argument of ``extra`` that is not ``--key=value``."""
    bad = [arg for arg in extra if not arg.startswith("--") or "=" not in arg]
    if bad:
        parser.error(f"extra arguments must be --key=value, got {bad[0]!r}")


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

        def evaluate(data, *args, **kwargs):
            if data is test_data:
                return test_evaluate(data, *args, **kwargs)
            result = valid_evaluate(data, *args, **kwargs)
            stats["valid_curve"].append(dict(result))  # one per validation, in epoch order
            return result
        trainer.evaluate = evaluate
        return trainer

    quick_start.create_dataset, quick_start._build_trainer = recording_create_dataset, timing_build_trainer


def run_worker(model, dataset, config_files, keep_checkpoint):
    """Train and test one model through ``quick_start.run``; return the worker's JSON-ready summary.

    The seed and the ``--key=value`` arguments are on this process's command line, where RecBole's Config reads them.
    """
    import recbole
    import torch

    from recbole_llm.quick_start import run

    stats = {"train_s": [], "valid_s": [], "test_s": [], "valid_curve": []}
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
        "valid_curve": stats["valid_curve"],
        "train_s_per_epoch": statistics.mean(stats["train_s"]) if stats["train_s"] else None,
        "epochs": len(stats["train_s"]),
        "valid_eval_s": statistics.mean(stats["valid_s"]) if stats["valid_s"] else None,
        "test_eval_s": test_s, "test_rows": stats["test_rows"],
        "test_users_per_s": stats["test_rows"] / test_s if test_s else None,
        "peak_rss_mb": peak_rss_mb(),
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
        try:
            with config_argv(_with_overrides(spec["extra"], overrides)):
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


def worker_env(jobs):
    """The environment of a worker: with ``jobs`` workers at once, each gets an equal share of the CPU threads
    (``OMP_NUM_THREADS``) unless the caller set it, so that parallel workers do not oversubscribe the cores."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_all(models, seeds, dataset, config_files, extra, keep_checkpoints=False, jobs=1):
    """Every (model, seed) in its own process, ``jobs`` at a time; a list of ``{model, seed, result, error}`` in
    (model, seed) order whatever order they finish in."""
    pairs = [(model, seed) for model in models for seed in seeds]
    env = worker_env(jobs)
    finished = []

    def one(pair):
        model, seed = pair
        start = time.perf_counter()
        done = subprocess.run(worker_command(model, dataset, seed, config_files, extra, keep_checkpoints),
                              capture_output=True, text=True, env=env)
        result, error = parse_worker_output(done.returncode, done.stdout, done.stderr)
        finished.append(pair)
        status = "ok" if result else f"FAILED: {error}"
        print(f"[{len(finished)}/{len(pairs)}] {model} seed {seed}: {status} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        return {"model": model, "seed": seed, "result": result, "error": error}

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, pairs))


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


# ---------------------------------------------------------------- the summary: records in sections, one table on top

def model_of(entry):
    """The model of a ``--models`` entry, without its own keys: ``LLMESR_SASRec@k=v`` -> ``LLMESR_SASRec``."""
    return entry.split("@", 1)[0]


def backbone_of(entry):
    """The model a ``--models`` entry enhances (``LLMESR_SASRec@k=v`` -> ``SASRecAP``); None for a stock model."""
    return BACKBONES.get(model_of(entry))


def group_key(metric, group):
    """The result key of ``metric`` in a long-tail group: ``ndcg@10[tail_item]``, or ``ndcg@10`` for overall."""
    return metric if group == "overall" else f"{metric}[{group}]"


def _digest(chunks):
    """The first 12 hex digits of the SHA-256 of the byte strings ``chunks``."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:12]


def _file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def code_digest(root=REPO_ROOT):
    """A digest of the package's code and property files (``CODE_TREES``), names and contents."""
    chunks = []
    for tree, suffix in CODE_TREES:
        for folder, subfolders, files in os.walk(os.path.join(root, tree)):
            subfolders.sort()
            for name in sorted(f for f in files if f.endswith(suffix)):
                path = os.path.join(folder, name)
                chunks += [os.path.relpath(path, root).encode(), b"\0", _file_bytes(path), b"\0"]
    return _digest(chunks)


def run_protocol(config_files, extra):
    """What two sections must share for their runs of one entry to be pooled by seed in the summary: the contents
    of the config files, the command-line keys of every run, and the package's code (``code_digest``)."""
    return {"config_files": {path: _digest([_file_bytes(path)]) for path in (config_files or "").split()},
            "keys": sorted(extra), "code": code_digest()}


def section_record(dataset, runs, valid_metric, protocol=None):
    """What the summary and the plot need of one section: per entry, its seeds, epochs and per-seed metric values,
    and the section's ``run_protocol``.

    The metric is the entry's own ``valid_metric`` (the section's when no run of it succeeded), lowercased as in
    RecBole's result; the values are the test results, one per successful seed, in the order of ``seeds``.
    """
    rows = []
    for name, entry in aggregate(runs).items():
        done = [run for run in runs if run["model"] == name and run["result"]]
        metric = (done[0]["result"]["protocol"].get("valid_metric") if done else None) or valid_metric
        metric = metric.lower()
        rows.append({"model": name, "metric": metric, "seeds": [run["seed"] for run in done],
                     "failed_seeds": [seed for seed, _ in entry["failed"]], "epochs": entry["cost"]["epochs"],
                     "values": {g: entry["test"].get(group_key(metric, g), []) for g in LONG_TAIL_GROUPS}})
    return {"dataset": dataset, "rows": rows, "protocol": protocol}


def record_comment(record):
    """The record as a one-line HTML comment; ``>`` is escaped so that no value can close the comment early."""
    payload = json.dumps(record).replace(">", "\\u003e")  # JSON reads the escape back as ">"
    return f"<!-- compare-rows: {payload} -->"


def read_records(text):
    """``(records, sections without one)`` of a results file; a section of the older format or with an unreadable
    record is counted, not fatal, so that appending to an old file still works."""
    records = []
    for match in RECORD.finditer(text):
        try:
            records.append(json.loads(match.group(1)))
        except json.JSONDecodeError:
            pass
    return records, max(text.count(f"\n{SECTION_HEADING}\n") - len(records), 0)


def summary_rows(records):
    """Every record's rows in file order, each with its dataset, section index and protocol, those of one entry
    under one protocol pooled (``pooled_rows``)."""
    return pooled_rows([{**row, "dataset": record["dataset"], "section": index, "protocol": record.get("protocol")}
                        for index, record in enumerate(records) for row in record["rows"]])


def _pool_key(row):
    """Rows with the same key are runs of one entry, dataset and metric under one protocol; None: pooled with none
    (a record written before protocols were recorded)."""
    if not row.get("protocol"):
        return None
    return row["dataset"], row["model"], row["metric"], json.dumps(row["protocol"], sort_keys=True)


def merge_by_seed(members):
    """One row of the seeds of ``members`` (in file order): a seed measured in several keeps its latest values, and
    a seed that failed counts as failed only if it never succeeded. The row has the place of the last member."""
    by_seed = {}
    for row in members:
        for i, seed in enumerate(row["seeds"]):
            by_seed[seed] = {"epochs": row["epochs"][i:i + 1],
                             "values": {g: v[i:i + 1] for g, v in row["values"].items()}}
    seeds = sorted(by_seed)
    failed = sorted({seed for row in members for seed in row["failed_seeds"]} - set(seeds))
    return {**members[-1], "seeds": seeds, "failed_seeds": failed,
            "epochs": [e for seed in seeds for e in by_seed[seed]["epochs"]],
            "values": {g: [v for seed in seeds for v in by_seed[seed]["values"].get(g, [])]
                       for g in members[-1]["values"]}}


def pooled_rows(rows):
    """``rows`` with the runs of one entry under one protocol (``_pool_key``), from any number of sections, merged
    into one row by seed, so that seeds run at different times make one mean ± std."""
    keys = [_pool_key(row) for row in rows]
    groups = {}
    for key, row in zip(keys, rows):
        if key is not None:
            groups.setdefault(key, []).append(row)
    out = []
    for key, row in zip(keys, rows):
        if key is None:
            out.append(row)
        elif row is groups[key][-1]:
            out.append(merge_by_seed(groups[key]) if len(groups[key]) > 1 else row)
    return out


def protocol_overrides(entry):
    """The keys of a ``--models`` entry that change the protocol (``PROTOCOL_KEYS``), e.g. llm_exclude_history."""
    return sorted(key for key in split_variant(entry)[1] if key[2:].split("=", 1)[0] in PROTOCOL_KEYS)


def _settings(protocol):
    """A recorded protocol without its code digest: the config files' contents and the command-line keys."""
    return protocol and {key: value for key, value in protocol.items() if key != "code"}


def backbone_row(row, rows):
    """The row to measure ``row`` against: its backbone's, with the same dataset and metric, under the same recorded
    protocol (``run_protocol``) if there is one, else from the same section, else under the same config files and
    command-line keys at another code version, else the latest at or before ``row``'s section (so that a later run
    under other keys, ``--loss_type=BPR``, never becomes an older row's reference), else the latest in the file; one
    run under the same protocol keys as ``row`` first (``HLLM@llm_exclude_history=False`` against
    ``SASRecAP@llm_exclude_history=False``), and among those the one with no other keys of its own."""
    backbone, protocol = backbone_of(row["model"]), protocol_overrides(row["model"])
    candidates = [r for r in rows if model_of(r["model"]) == backbone and r["values"]["overall"]
                  and (r["dataset"], r["metric"]) == (row["dataset"], row["metric"])]
    settings = _settings(row.get("protocol"))
    pool = ([r for r in candidates if row.get("protocol") and r.get("protocol") == row["protocol"]]
            or [r for r in candidates if r["section"] == row["section"]]
            or [r for r in candidates if settings and _settings(r.get("protocol")) == settings]
            or [r for r in candidates if r["section"] <= row["section"]] or candidates)
    same_protocol = [r for r in pool if protocol_overrides(r["model"]) == protocol] or pool
    plain = [r for r in same_protocol if len(split_variant(r["model"])[1]) == len(protocol_overrides(r["model"]))]
    return (plain or same_protocol or [None])[-1]


def relative_change(values, reference):
    """``'+4.1%'``: the change of the mean of ``values`` against the mean of ``reference``; ``—`` if undefined."""
    if not values or not reference or not statistics.mean(reference):
        return "—"
    return f"{(statistics.mean(values) / statistics.mean(reference) - 1) * 100:+.1f}%"


def _range_cell(values):
    """``'20'``, or ``'18–20'`` when the seeds stopped at different epochs; ``—`` when none was measured."""
    if not values:
        return "—"
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}–{high:g}"


def _seeds_cell(row):
    """``'42, 43'``, with the seeds whose run failed after them: ``'42 (43 failed)'``."""
    failed = f" ({', '.join(map(str, row['failed_seeds']))} failed)" if row["failed_seeds"] else ""
    return (", ".join(map(str, row["seeds"])) or "none") + failed


def shared_config_files(rows):
    """The config files that every row with a recorded protocol ran with."""
    files = [set(row["protocol"]["config_files"]) for row in rows if row.get("protocol")]
    return set.intersection(*files) if files else set()


def keys_cell(row, shared_files):
    """The config files of the row's section beyond ``shared_files`` (by name), then its command-line keys;
    ``—``: not recorded."""
    if not row.get("protocol"):
        return "—"
    extra_files = [os.path.basename(path) for path in row["protocol"]["config_files"] if path not in shared_files]
    return " ".join(extra_files + row["protocol"]["keys"]) or "(none)"


def summary_table(rows):
    """One line per row: the command-line keys its section ran with, after the config files that not every row ran
    with (``—``: not recorded), the test metric overall and on tail items, their change against the backbone, the
    epochs run and the seeds."""
    header = ["model", "keys", "backbone", "metric", "test overall", "test tail_item", "vs backbone",
              "tail_item vs backbone", "epochs run", "seeds"]
    shared_files = shared_config_files(rows)
    lines = []
    for row in rows:
        overall, tail = row["values"]["overall"], row["values"]["tail_item"]
        reference = backbone_row(row, rows) if row["seeds"] else None
        changes = [relative_change(v, reference["values"][g]) if reference else "—"
                   for v, g in ((overall, "overall"), (tail, "tail_item"))]
        metric_cells = [format_mean_std(overall), format_mean_std(tail)] if row["seeds"] else ["failed", "—"]
        lines.append([row["model"], keys_cell(row, shared_files), backbone_of(row["model"]) or "—", row["metric"],
                      *metric_cells, *changes, _range_cell(row["epochs"]), _seeds_cell(row)])
    return markdown_table(header, lines)


def render_summary(text):
    """The summary block for a results file whose sections are ``text``: a table over every record's rows."""
    records, without = read_records(text)
    rows = summary_rows(records)
    out = [SUMMARY_START, "## Summary", ""]
    if rows:
        out += [summary_table(rows), "",
                "Test results at the best validation epoch, mean ± std over the seeds; the metric is each run's "
                "valid_metric; keys are the command-line keys, after any config file that not every row ran with. "
                "The runs of one entry in sections with the same protocol (the config files' contents, "
                "the command-line keys and the package's code) are pooled by seed into one row, a seed run twice "
                "counting once, with its latest run. The change is that of the mean against the backbone's row "
                "under the same protocol, else of the same section, else under the same config files and "
                "command-line keys at another code version, else against its latest row at or before the section, "
                "else its latest in this file."]
    else:
        out.append("No section of this file carries a record of its rows.")
    if without:
        out += ["", f"{without} section(s) of this file were written before these records existed and are not in "
                "the table."]
    return "\n".join(out + [SUMMARY_END])


def with_summary(text):
    """``text`` with its summary regenerated: removed if present, then put back under the title line."""
    body = re.sub(rf"{re.escape(SUMMARY_START)}.*?{re.escape(SUMMARY_END)}\n*", "", text, flags=re.DOTALL)
    title, _, rest = body.partition("\n") if body.startswith("# ") else ("", "", body)
    return (f"{title}\n\n" if title else "") + render_summary(rest) + "\n\n" + rest.lstrip("\n")


# ---------------------------------------------------------------- the plot (matplotlib, an optional extra)

def import_pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display); ImportError when it is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def command_keys(row):
    """The command-line keys of the row's section, () when not recorded."""
    return tuple(row["protocol"]["keys"]) if row.get("protocol") else ()


def plot_label(row, rows):
    """The row's entry, with its command-line keys when another drawn row has the same entry."""
    repeated = sum(other["model"] == row["model"] for other in rows) > 1
    return " ".join([row["model"], *command_keys(row)]) if repeated else row["model"]


def plot_rows(rows):
    """The rows to draw: the latest of each entry and command-line keys that has results (an entry run with
    ``--epochs=30`` and with ``--epochs=50`` draws twice), each backbone before the models it enhances."""
    latest = list({(row["model"], command_keys(row)): row for row in rows if row["seeds"]}.values())

    def family(row):  # the backbone a row is drawn beside: its own, or itself
        return backbone_of(row["model"]) or model_of(row["model"])
    families = list(dict.fromkeys(map(family, latest)))
    return sorted(latest, key=lambda row: (families.index(family(row)), backbone_of(row["model"]) is not None))


def plot_summary(rows, path):
    """A grouped bar chart at ``path``: per long-tail group, one bar per model (mean, std over the seeds as error
    bar), backbones hatched; one panel per metric. Returns the panels' Axes, [] (and no file) if nothing to draw."""
    rows = plot_rows(rows)
    if not rows:
        return []
    plt = import_pyplot()
    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    figure, axes = plt.subplots(len(metrics), 1, squeeze=False, figsize=(10, 4 * len(metrics)))
    for ax, metric in zip(axes[:, 0], metrics):
        series = [row for row in rows if row["metric"] == metric]
        backbones = {backbone_of(row["model"]) for row in series}
        width = 0.8 / len(series)
        for index, row in enumerate(series):
            stats = [mean_std(row["values"][g]) if row["values"][g] else (float("nan"), 0.0) for g in LONG_TAIL_GROUPS]
            is_backbone = model_of(row["model"]) in backbones
            ax.bar([x + (index - (len(series) - 1) / 2) * width for x in range(len(LONG_TAIL_GROUPS))],
                   [mean for mean, _ in stats], width, yerr=[std for _, std in stats], capsize=2,
                   hatch="//" if is_backbone else None,
                   label=plot_label(row, series) + (" (backbone)" if is_backbone else ""))
        ax.set_xticks(range(len(LONG_TAIL_GROUPS)), LONG_TAIL_GROUPS)
        ax.set_ylabel(f"test {metric}")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return list(axes[:, 0])


def plot_path(results_path):
    """The PNG beside a results file: ``results/x.md`` -> ``results/x.png``."""
    return os.path.splitext(results_path)[0] + ".png"


def plot_results_file(results_path):
    """Draw the plot of an existing results file from its records; the PNG path, or None with nothing to draw."""
    with open(results_path, encoding="utf-8") as f:
        rows = summary_rows(read_records(f.read())[0])
    path = plot_path(results_path)
    return path if plot_summary(rows, path) else None


def render_section(args, command, runs, protocol=None, now=None):
    """The Markdown section of one comparison: context, protocol, the three tables and the failures. ``protocol`` is
    the ``run_protocol`` taken before the runs (by default, now)."""
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
           record_comment(section_record(args.dataset, runs, valid_metric,
                                         protocol or run_protocol(args.config_files, args.extra))), "",
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


def write_text_atomic(path, text):
    """Replace the UTF-8 file ``path`` by ``text`` in one rename (the scripts here do not import the package, whose
    ``recbole_llm.utils.atomic_target`` does the same, so that they start without torch)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_report(path, dataset, section, append):
    """Overwrite ``path`` with a title and the section, or with ``append`` add the section to it; either way the
    summary on top is regenerated from every section's record.

    The file is replaced in one rename, so that a failed write cannot lose the sections already in it.
    """
    if append and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read() + "\n" + section
    else:
        text = f"# Model comparison on {dataset}\n\n{section}"
    write_text_atomic(path, with_summary(text))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Any other --key=value is passed to every run's RecBole Config.")
    parser.add_argument("--dataset")
    parser.add_argument("--models", help="comma-separated, e.g. SASRec,GRU4Rec,BERT4Rec")
    parser.add_argument("--config_files", default=None, help="space-separated YAML files given to every run")
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated seeds (default 42,43,44)")
    parser.add_argument("--out", default=None, help="Markdown file (default results/<dataset>.md)")
    parser.add_argument("--append", action="store_true", help="add a section to --out instead of overwriting it")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep each run's best-model checkpoint")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each with an equal share of the CPU threads (default 1; the cost "
                             "columns of parallel runs share the machine)")
    parser.add_argument("--plot", action="store_true",
                        help="also draw each model against its backbone per long-tail group, into <out>.png")
    parser.add_argument("--from_results", default=None, metavar="FILE.md",
                        help="with --plot: re-draw the plot of an existing results file, run nothing")
    args, extra = parser.parse_known_args(argv)
    if args.from_results:
        if not args.plot:
            parser.error("--from_results only re-draws the plot: add --plot")
        if not os.path.isfile(args.from_results):
            parser.error(f"results file {args.from_results!r} does not exist")
        return args
    if not args.dataset or not args.models:
        parser.error("the following arguments are required: --dataset, --models")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give at least 1")
    for arg in extra:
        require_key_values(parser, [arg])
        key = arg[2:].split("=", 1)[0]
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


def plot_available():
    """Whether matplotlib imports; if not, print the one line that says how to install it."""
    try:
        import_pyplot()
    except ImportError:
        print(PLOT_MISSING, file=sys.stderr)
        return False
    return True


def report_plot(path):
    """Say where the plot went, or that the file had no run to draw; True when it was drawn."""
    print(f"plot written to {path}" if path else "no run with results to plot")
    return path is not None


def main(argv):
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    if argv[:1] == ["--check"]:
        return check_main(argv[1:])
    args = parse_args(argv)
    if args.plot and not plot_available():  # before any run: the picture must not fail hours in
        return 2
    if args.from_results:
        return 0 if report_plot(plot_results_file(args.from_results)) else 1
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    problems = check_entries(models, args.dataset, args.config_files, args.extra)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    protocol = run_protocol(args.config_files, args.extra)  # what the runs start from, whatever changes meanwhile
    runs = run_all(models, seeds, args.dataset, args.config_files, args.extra, args.keep_checkpoints, args.jobs)
    section = render_section(args, shlex.join(["python", "benchmarks/compare.py", *argv]), runs, protocol)
    print("\n" + section)
    write_report(args.out, args.dataset, section, args.append)
    print(f"written to {args.out}")
    if args.plot:
        report_plot(plot_results_file(args.out))
    return 1 if any(run["result"] is None for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
