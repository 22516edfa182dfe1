"""RecLoRA under ReLLa's CTR protocol: DIN (the CRM) against plain LoRA (``reclora_mode: origin``) and RecLoRA.

    python benchmarks/reclora_ctr.py [--dataset ml-1m-half] [--llm_layers 2] [--train_samples 500]
        [--test_samples 2000] [--history recent] [--crm small] [--seed 42] [--out results/ml-1m-half-ctr.md] [--reuse]
        [--key=value ...]

1. Builds the CTR samples once and reports their row counts (all rows, before the valid/test subsets).
2. Trains DIN, the CRM, on the FULL training split (a ``compare.py`` worker; its checkpoint is kept in saved/).
3. Trains RecLoRA twice on the same Few2Many subset with the same LLM, once as one shared LoRA (``origin``) and once
   with the DIN-gated meta-LoRA bank, both reading the DIN checkpoint.
4. Prints and writes the table (test AUC with its standard error, LogLoss, training samples, seconds per 1,000
   training samples, test evaluation seconds, trainable parameters) and the AUC difference of RecLoRA and plain LoRA
   with its standard error, with the command, date, machine and every config file and key; a hand-written
   "## Reading" section of the previous report is kept.

The protocol is ``benchmarks/protocols/ctr_rella.yaml`` + ``ctr_rella_cpu.yaml``; ``--crm official`` adds
``ctr_crm_official.yaml``, the official CRM's size. ``--llm_layers N`` keeps the first N layers of the bundled
all-MiniLM-L6-v2 (saved once under saved/reclora_llm/), to fit a small CPU. ``--test_samples`` rows of the test split
score every model; ``--history`` is ``reclora_history``. Any other ``--key=value`` goes to both LLM runs. ``--reuse``
takes a model's result from saved/reclora_ctr/ when an earlier run with the same files and keys left it there.
"""
import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys

import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL = ["benchmarks/protocols/ctr_rella.yaml", "benchmarks/protocols/ctr_rella_cpu.yaml"]
CRM_SIZES = {"small": [], "official": ["benchmarks/protocols/ctr_crm_official.yaml"]}
STATE = os.path.join("saved", "reclora_ctr")
MODEL_DEFAULTS = "properties/model/RecLoRA.yaml"
NOTES = "## Reading"  # a hand-written section of the report, kept when the script rewrites it
# Per-model keys on top of the protocol. DIN: the CRM, on all training samples. RecLoRA: one epoch on the subset
# (the official run stops after one), validated on 100 rows only: with one epoch there is nothing to select.
MODEL_KEYS = {
    "DIN": ["--epochs=1", "--train_batch_size=2048", "--eval_batch_size=4096", "--learning_rate=0.001"],
    "RecLoRA": ["--epochs=1", "--reclora_valid_samples=100", "--train_batch_size=16", "--eval_batch_size=64",
                "--reclora_llm_hist_len=5", "--reclora_loss=bce"],
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-1m-half")
    parser.add_argument("--llm_layers", type=int, default=2, help="first layers of all-MiniLM-L6-v2 kept; 0 = all")
    parser.add_argument("--train_samples", type=int, default=500, help="reclora_train_samples (Few2Many subset)")
    parser.add_argument("--test_samples", type=int, default=2000, help="reclora_test_samples of every model")
    parser.add_argument("--history", choices=["recent", "retrieved"], default="recent", help="reclora_history")
    parser.add_argument("--crm", choices=sorted(CRM_SIZES), default="small",
                        help="DIN's size: small (ctr_rella_cpu.yaml) or official (ctr_crm_official.yaml)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="default results/<dataset>-ctr.md")
    parser.add_argument("--reuse", action="store_true", help="reuse results left in saved/reclora_ctr/")
    args, extra = parser.parse_known_args(argv)
    compare.require_key_values(parser, extra)
    args.extra = extra
    args.protocol = PROTOCOL + CRM_SIZES[args.crm]
    return args


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


def row_counts(dataset, test_samples):
    """Samples and split sizes of the CTR data, and the positive and negative labels of the first
    ``test_samples`` test rows, those every model is scored on."""
    from recbole_llm.config import Config
    from recbole_llm.utils import create_dataset

    config = Config(model="DIN", dataset=dataset, config_file_list=PROTOCOL[:1],
                    config_dict={"state": "ERROR", "reclora_valid_samples": None, "reclora_test_samples": None})
    data = create_dataset(config)
    interactions = data.inter_num
    train, valid, test = data.build()
    labels = test.inter_feat[data.label_field][:test_samples]
    positives = int((labels > 0.5).sum())
    return {"interactions": interactions, "samples": len(train) + len(valid) + len(test), "train": len(train),
            "valid": len(valid), "test": len(test), "test_positives": positives,
            "test_negatives": len(labels) - positives}


def auc_standard_error(auc, positives, negatives):
    """Hanley and McNeil's (1982) standard error of an AUC measured on ``positives`` and ``negatives`` rows."""
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc ** 2) + (negatives - 1) * (q2 - auc ** 2))
    return math.sqrt(variance / (positives * negatives))


def run_model(name, model, keys, args):
    """A compare.py worker for ``model`` with ``keys``; its summary, cached in saved/reclora_ctr/ under a digest of
    the model, the config files' contents and the keys."""
    tag = compare._digest([model.encode(), *(compare._file_bytes(path) for path in args.protocol),
                           *(key.encode() for key in keys), str(args.seed).encode()])
    cache = os.path.join(STATE, f"{name}-{tag}.json")
    if args.reuse and os.path.isfile(cache):
        with open(cache, encoding="utf-8") as f:
            return json.load(f)
    command = compare.worker_command(model, args.dataset, args.seed, " ".join(args.protocol), keys,
                                     keep_checkpoints=model == "DIN")
    print("running", shlex.join(command[2:]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    summary, error = compare.parse_worker_output(done.returncode, done.stdout, done.stderr)
    if error:
        raise SystemExit(f"{name} failed: {error}")
    summary["keys"] = keys
    os.makedirs(STATE, exist_ok=True)
    compare.write_text_atomic(cache, json.dumps(summary, indent=1))
    return summary


def runs(args):
    llm = small_llm(args.llm_layers)
    crm_file = f"DIN-ctr-{args.crm}-seed{args.seed}.pth"
    test_rows = [f"--reclora_test_samples={args.test_samples}"]
    reclora = MODEL_KEYS["RecLoRA"] + test_rows + [
        f"--reclora_train_samples={args.train_samples}", f"--reclora_history={args.history}",
        f"--reclora_crm_checkpoint={os.path.join('saved', crm_file)}"]
    reclora += ([f"--reclora_llm={llm}"] if llm else []) + args.extra
    plan = [("DIN (CRM)", "DIN", MODEL_KEYS["DIN"] + test_rows + [f"--llm_checkpoint_name={crm_file}"]),
            ("LoRA (origin)", "RecLoRA", reclora + ["--reclora_mode=origin"]),
            ("RecLoRA", "RecLoRA", reclora + ["--reclora_mode=reclora"])]
    return [(name, run_model(name.split()[0], model, keys, args)) for name, model, keys in plan]


def table(results, counts, train_samples):
    lines = ["| model | test AUC | AUC std. error | test LogLoss | training samples | train s / 1,000 samples | "
             "test eval s | trainable params |", "|---|---|---|---|---|---|---|---|"]
    for name, summary in results:
        trained = counts["train"] if name.startswith("DIN") else min(train_samples, counts["train"])
        per_1000 = summary["train_s_per_epoch"] / trained * 1000
        error = auc_standard_error(summary["test"]["auc"], counts["test_positives"], counts["test_negatives"])
        lines.append(f"| {name} | {summary['test']['auc']:.4f} | {error:.4f} | {summary['test']['logloss']:.4f} | "
                     f"{trained:,} x {summary['epochs']} epoch(s) | {per_1000:.2f} | {summary['test_eval_s']:.1f} | "
                     f"{summary['params']:,} |")
    return "\n".join(lines)


def difference_line(results, counts):
    """RecLoRA's AUC minus plain LoRA's, with the standard error of the difference of two independent AUCs (an
    upper bound here: both score the same rows, and their errors are positively correlated)."""
    auc = {name: summary["test"]["auc"] for name, summary in results}
    errors = [auc_standard_error(auc[name], counts["test_positives"], counts["test_negatives"])
              for name in ("RecLoRA", "LoRA (origin)")]
    return (f"RecLoRA - LoRA: {auc['RecLoRA'] - auc['LoRA (origin)']:+.4f} AUC; standard error of the difference "
            f"{math.hypot(*errors):.4f} (Hanley-McNeil for each AUC, as if independent: an upper bound for two "
            f"models scored on the same rows).")


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
                        for path in args.protocol + [MODEL_DEFAULTS])
    keys = "\n".join(f"- {name}: `{' '.join(summary['keys'])}`" for name, summary in results)
    return f"""# {args.dataset}: CTR (ReLLa/RecLoRA protocol)

Command: `python benchmarks/reclora_ctr.py {shlex.join(argv)}`
Date: {datetime.date.today().isoformat()}; machine: {env['platform']}, {env['cpus']} CPUs (load average
{args.load:.1f} at the start), Python {env['python']}, torch {env['torch']}, RecBole {env['recbole']}, device
{env['device']}; seed {args.seed}.

CTR samples of {args.dataset}: {counts['interactions']:,} ratings -> {counts['samples']:,} samples (>= 5 earlier
ratings of the user) -> train {counts['train']:,} / valid {counts['valid']:,} / test {counts['test']:,}
(ReLLa's rounding). Evaluation: the first rows of valid (ctr_rella_cpu.yaml) and the first
{counts['test_positives'] + counts['test_negatives']:,} of test ({counts['test_positives']:,} positive,
{counts['test_negatives']:,} negative) in time order.

{table(results, counts, args.train_samples)}

{difference_line(results, counts)}

Train s / 1,000 samples: training seconds of one epoch over the samples it trained on, times 1,000.

{notes}## Config
DIN also takes RecBole's own DIN defaults (properties/model/DIN.yaml of RecBole 1.2.1) under these files.
{files}

Keys per model (on the command line of each run, after the files):
{keys}
"""


def main(argv):
    args = parse_args(argv)
    args.load = os.getloadavg()[0]
    os.chdir(REPO)
    counts = row_counts(args.dataset, args.test_samples)
    print(json.dumps(counts), flush=True)
    results = runs(args)
    print(table(results, counts, args.train_samples))
    out = args.out or os.path.join("results", f"{args.dataset}-ctr.md")
    text = report(results, counts, args, argv, hand_notes(out))
    compare.write_text_atomic(out, text)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1:])
