"""Time and peak RSS of one sampled (uniN) validation pass: each row encoded, against each distinct history once.

    python benchmarks/sampled_eval.py --dataset ml-1m-half [--models DualLLMSASRec,SASRecAP] \
        [--config_files benchmarks/protocols/llmesr_paper.yaml] [--out results/sampled_eval.md]

RecBole hands a sequential model one row per candidate, so with ``uni100`` a user's history comes 101 times.
``per row`` encodes every row (the path before ``layers.per_row_user_vectors``); ``once per history`` is the
plugin's path. Each (model, path) runs in its own process on an untrained model with the protocol's seed, so the
peak RSS is that path's and both paths see the same weights and negatives; the script checks that they give the
same metrics.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import peak_rss_mb  # noqa: E402

PATHS = ("per row", "once per history")


def measure(model_name, dataset, config_files, path):
    """Seconds and peak RSS (MB) of one validation pass of ``model_name``, and its metrics."""
    import torch

    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_llm.config import Config
    from recbole_llm.quick_start import _build_trainer
    from recbole_llm.utils import create_dataset, get_model

    config = Config(model=model_name, dataset=dataset, config_file_list=config_files,
                    config_dict={"state": "ERROR", "show_progress": False})
    init_seed(config["seed"], config["reproducibility"])
    dataset_obj = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset_obj)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(model_name)(config, train_data._dataset).to(config["device"])
    if path == "per row":  # every module that imported the helper now encodes every row
        for module in [m for m in list(sys.modules.values()) if getattr(m, "per_row_user_vectors", None)]:
            module.per_row_user_vectors = lambda encode, item_seq, item_seq_len: encode(item_seq, item_seq_len)
    trainer = _build_trainer(config, model, dataset_obj, valid_data, test_data)
    start = time.perf_counter()
    result = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    seconds = time.perf_counter() - start
    return {"model": model_name, "path": path, "seconds": seconds, "users": valid_data.sample_size,
            "threads": torch.get_num_threads(), "metrics": {k: float(v) for k, v in result.items()},
            "peak_rss_mb": peak_rss_mb()}


def table(rows, command, machine):
    lines = ["# Sampled evaluation: encoding each row against each distinct history once", "",
             f"Command: `{command}`", "", f"Machine: {machine}", "",
             "| model | path | validation pass s | users/s | peak RSS MB | same metrics as per row |",
             "|---|---|---|---|---|---|"]
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["path"]] = row
    for model, paths in by_model.items():
        for path in PATHS:
            row = paths.get(path)
            if row is None:
                continue
            same = row["metrics"] == paths["per row"]["metrics"] if "per row" in paths else "—"
            lines.append(f"| {model} | {path} | {row['seconds']:.1f} | {row['users'] / row['seconds']:.0f} | "
                         f"{row['peak_rss_mb']:.0f} | {same} |")
    lines += ["", "Metrics (validation, untrained model):", ""]
    lines += [f"- {row['model']}, {row['path']}: {json.dumps(row['metrics'])}" for row in rows]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m-half")
    parser.add_argument("--models", default="DualLLMSASRec,SASRecAP")
    parser.add_argument("--config_files", default="benchmarks/protocols/llmesr_paper.yaml")
    parser.add_argument("--out", default="results/sampled_eval.md")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # MODEL PATH: measure in this process
    args = parser.parse_args()
    config_files = args.config_files.split()
    if args.worker:
        print(json.dumps(measure(args.worker[0], args.dataset, config_files, args.worker[1])))
        return
    rows = []
    for model in args.models.split(","):
        for path in PATHS:
            done = subprocess.run([sys.executable, __file__, "--dataset", args.dataset, "--config_files",
                                   args.config_files, "--worker", model, path], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{model}, {path}: {done.stderr.strip().splitlines()[-1]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{model}, {path}: {rows[-1]['seconds']:.1f} s, {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    machine = f"{platform.platform()}, {rows[0]['threads']} torch threads"
    report = table(rows, "python " + " ".join(sys.argv), machine)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
