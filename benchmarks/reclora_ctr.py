"""RecLoRA under ReLLa's CTR protocol: DIN (the CRM) against plain LoRA (``reclora_mode: origin``) and RecLoRA.

    python benchmarks/reclora_ctr.py [--dataset ml-1m-half] [--llm_layers 2] [--train_samples 500] [--seed 42]
        [--out results/ml-1m-half-ctr.md] [--reuse]

1. Builds the CTR samples once and reports their row counts (all rows, before the valid/test subsets).
2. Trains DIN, the CRM, on the FULL training split (a ``compare.py`` worker; its checkpoint is kept in saved/).
3. Trains RecLoRA twice on the same Few2Many subset with the same LLM, once as one shared LoRA (``origin``) and once
   with the DIN-gated meta-LoRA bank, both reading the DIN checkpoint.
4. Prints and writes the table (test AUC and LogLoss, training samples, seconds per 1,000 training samples, test
   evaluation seconds, trainable parameters) with the command, date, machine and every config file and key; a
   hand-written "## Reading" section of the previous report is kept.

The protocol is ``benchmarks/protocols/ctr_rella.yaml`` + ``ctr_rella_cpu.yaml``. ``--llm_layers N`` keeps the first
N layers of the bundled all-MiniLM-L6-v2 (saved once under saved/reclora_llm/), to fit a small CPU. ``--reuse``
takes a model's result from saved/reclora_ctr/ when an earlier run of the same command left it there.
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys

import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL = ["benchmarks/protocols/ctr_rella.yaml", "benchmarks/protocols/ctr_rella_cpu.yaml"]
STATE = os.path.join("saved", "reclora_ctr")
MODEL_DEFAULTS = "properties/model/RecLoRA.yaml"
CRM_FILE = "DIN-ctr-cpu.pth"
NOTES = "## Reading"  # a hand-written section of the report, kept when the script rewrites it
# Per-model keys on top of the protocol. DIN: the CRM, on all training samples. RecLoRA: one epoch on the subset
# (the official run stops after one), validated on 100 rows only: with one epoch there is nothing to select.
MODEL_KEYS = {
    "DIN": ["--epochs=1", "--train_batch_size=2048", "--eval_batch_size=4096", "--learning_rate=0.001",
            f"--llm_checkpoint_name={CRM_FILE}"],
    "RecLoRA": ["--epochs=1", "--reclora_valid_samples=100", "--train_batch_size=16", "--eval_batch_size=64",
                "--reclora_llm_hist_len=5", "--reclora_loss=bce"],
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-1m-half")
    parser.add_argument("--llm_layers", type=int, default=2, help="first layers of all-MiniLM-L6-v2 kept; 0 = all")
    parser.add_argument("--train_samples", type=int, default=500, help="reclora_train_samples (Few2Many subset)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="default results/<dataset>-ctr.md")
    parser.add_argument("--reuse", action="store_true", help="reuse results left in saved/reclora_ctr/")
    return parser.parse_args(argv)


def small_llm(layers):
    """The folder of all-MiniLM-L6-v2 cut to its first ``layers`` layers (``0``: ~, the whole bundled model)."""
    if not layers:
        return None
    folder = os.path.join("saved", "reclora_llm", f"all-MiniLM-L6-v2-{layers}layers")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        from transformers import AutoModel, AutoTokenizer

        from recbole_llm.text.encoders import encoder_path

        source = encoder_path({"llm_encoder": None})
        AutoModel.from_pretrained(source, num_hidden_layers=layers).save_pretrained(folder)
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def row_counts(dataset):
    """Samples and split sizes of the CTR data, without the valid/test subsets."""
    from recbole_llm.config import Config
    from recbole_llm.utils import create_dataset

    config = Config(model="DIN", dataset=dataset, config_file_list=PROTOCOL[:1],
                    config_dict={"state": "ERROR", "reclora_valid_samples": None, "reclora_test_samples": None})
    data = create_dataset(config)
    interactions = data.inter_num
    train, valid, test = data.build()
    return {"interactions": interactions, "samples": len(train) + len(valid) + len(test), "train": len(train),
            "valid": len(valid), "test": len(test)}


def run_model(name, model, keys, args):
    """A compare.py worker for ``model`` with ``keys``; its summary, cached in saved/reclora_ctr/<name>.json."""
    cache = os.path.join(STATE, f"{name}.json")
    if args.reuse and os.path.isfile(cache):
        with open(cache, encoding="utf-8") as f:
            return json.load(f)
    command = compare.worker_command(model, args.dataset, args.seed, " ".join(PROTOCOL), keys,
                                     keep_checkpoints=model == "DIN")
    print("running", shlex.join(command[2:]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    summary, error = compare.parse_worker_output(done.returncode, done.stdout, done.stderr)
    if error:
        raise SystemExit(f"{name} failed: {error}")
    summary["keys"] = keys
    os.makedirs(STATE, exist_ok=True)
    with open(cache, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def runs(args):
    llm = small_llm(args.llm_layers)
    reclora = MODEL_KEYS["RecLoRA"] + [f"--reclora_train_samples={args.train_samples}",
                                       f"--reclora_crm_checkpoint={os.path.join('saved', CRM_FILE)}"]
    reclora += [f"--reclora_llm={llm}"] if llm else []
    plan = [("DIN (CRM)", "DIN", MODEL_KEYS["DIN"]),
            ("LoRA (origin)", "RecLoRA", reclora + ["--reclora_mode=origin"]),
            ("RecLoRA", "RecLoRA", reclora + ["--reclora_mode=reclora"])]
    return [(name, run_model(name.split()[0], model, keys, args)) for name, model, keys in plan]


def table(results, counts, train_samples):
    lines = ["| model | test AUC | test LogLoss | training samples | train s / 1,000 samples | test eval s | "
             "trainable params |", "|---|---|---|---|---|---|---|"]
    for name, summary in results:
        trained = counts["train"] if name.startswith("DIN") else min(train_samples, counts["train"])
        per_1000 = summary["train_s_per_epoch"] / trained * 1000
        lines.append(f"| {name} | {summary['test']['auc']:.4f} | {summary['test']['logloss']:.4f} | "
                     f"{trained:,} x {summary['epochs']} epoch(s) | {per_1000:.2f} | {summary['test_eval_s']:.1f} | "
                     f"{summary['params']:,} |")
    return "\n".join(lines)


def hand_notes(out):
    """The hand-written ``## Reading`` section of an earlier report at ``out``, kept when the report is rewritten."""
    if not os.path.isfile(out):
        return ""
    with open(out, encoding="utf-8") as f:
        text = f.read()
    start = text.find(NOTES)
    if start < 0:
        return ""
    end = text.find("\n## ", start + len(NOTES))
    return text[start:end if end >= 0 else None].rstrip() + "\n\n"


def report(results, counts, args, argv, notes):
    env = results[-1][1]["env"]
    files = "\n\n".join(f"`{path}`\n```yaml\n{open(os.path.join(REPO, path), encoding='utf-8').read()}```"
                        for path in PROTOCOL + [MODEL_DEFAULTS])
    keys = "\n".join(f"- {name}: `{' '.join(summary['keys'])}`" for name, summary in results)
    return f"""# {args.dataset}: CTR (ReLLa/RecLoRA protocol)

Command: `python benchmarks/reclora_ctr.py {shlex.join(argv)}`
Date: {datetime.date.today().isoformat()}; machine: {env['platform']}, {env['cpus']} CPUs (shared with other jobs),
Python {env['python']}, torch {env['torch']}, RecBole {env['recbole']}, device {env['device']}; seed {args.seed}.

CTR samples of {args.dataset}: {counts['interactions']:,} ratings -> {counts['samples']:,} samples (>= 5 earlier
ratings of the user) -> train {counts['train']:,} / valid {counts['valid']:,} / test {counts['test']:,}
(ReLLa's rounding). Evaluation: the first rows of valid and test in time order (ctr_rella_cpu.yaml).

{table(results, counts, args.train_samples)}

Train s / 1,000 samples: training seconds of one epoch over the samples it trained on, times 1,000.

{notes}## Config
DIN also takes RecBole's own DIN defaults (properties/model/DIN.yaml of RecBole 1.2.1) under these files.
{files}

Keys per model (on the command line of each run, after the files):
{keys}
"""


def main(argv):
    args = parse_args(argv)
    os.chdir(REPO)
    counts = row_counts(args.dataset)
    print(json.dumps(counts), flush=True)
    results = runs(args)
    print(table(results, counts, args.train_samples))
    out = args.out or os.path.join("results", f"{args.dataset}-ctr.md")
    text = report(results, counts, args, argv, hand_notes(out))
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1:])
