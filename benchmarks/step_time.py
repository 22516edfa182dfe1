"""Training-step time and peak RSS of stock models on ml-100k, with and without the launcher's two CPU fixes.

    python benchmarks/step_time.py [--models SASRec,GRU4Rec] [--steps 10] [--out results/step_time.md]

Each setting runs in its own process: 'stock' is RecBole as shipped (autograd anomaly detection on, glibc's
default malloc), then anomaly detection off, then both fixes as run_recbole_llm.py applies them.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import peak_rss_mb  # noqa: E402

SETTINGS = {  # name: (anomaly detection, keep freed memory)
    "stock (anomaly on, glibc default)": (True, False),
    "anomaly off": (False, False),
    "anomaly off + malloc kept (launcher)": (False, True),
}


def measure(model_name, anomaly, keep_memory, steps, batch_size):
    """Median seconds per train step over ``steps`` steps after 2 warm-up steps, and peak RSS in MB."""
    import torch

    import recbole_llm  # noqa: F401  (compat fixes; turns anomaly detection off)
    from recbole.data import data_preparation
    from recbole_llm import compat
    from recbole_llm.config import Config
    from recbole_llm.utils import create_dataset, get_model

    if keep_memory:
        compat.keep_freed_memory()
    torch.autograd.set_detect_anomaly(anomaly)
    config = Config(model=model_name, dataset="ml-100k", config_dict={
        "train_neg_sample_args": None, "state": "ERROR", "show_progress": False, "train_batch_size": batch_size})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = get_model(model_name)(config, train_data._dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for batch in train_data:
        start = time.perf_counter()
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        if len(times) == steps + 2:
            break
    peak_mb = peak_rss_mb()
    return {"s_per_step": statistics.median(times[2:]), "peak_rss_mb": peak_mb, "steps": len(times) - 2}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="SASRec,GRU4Rec")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=2048)
    parser.add_argument("--out", default="results/step_time.md")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "ANOMALY", "KEEP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, anomaly, keep = args.worker
        print(json.dumps(measure(model, anomaly == "1", keep == "1", args.steps, args.batch_size)))
        return

    rows = []
    for model in args.models.split(","):
        for name, (anomaly, keep) in SETTINGS.items():
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--batch_size", str(args.batch_size),
                   "--worker", model, str(int(anomaly)), str(int(keep))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append((model, name, json.loads(out)))
            print(model, name, rows[-1][2], flush=True)

    command = "python benchmarks/step_time.py " + " ".join(sys.argv[1:])
    lines = [f"# Training-step time on ml-100k (batch {args.batch_size}, median of {args.steps} steps)", "",
             f"Command: `{command.strip()}`  ", f"Machine: {platform.machine()}, {platform.python_version()}", "",
             "| model | setting | s/step | peak RSS (MB) |", "|---|---|---|---|"]
    lines += [f"| {m} | {n} | {r['s_per_step']:.2f} | {r['peak_rss_mb']:.0f} |" for m, n, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
