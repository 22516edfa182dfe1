"""Our LLM-ESR next to the official code (github liuqidong07/LLM-ESR), on the same inputs, epoch by epoch.

    python benchmarks/official_llmesr.py --official_dir <clone of liuqidong07/LLM-ESR> --dataset ml-1m-half \
        [--models DualLLMSASRec,SASRec_seq,LLMESR_SASRec] [--epochs 3] [--seed 42] \
        [--out results/ml-1m-half-official.md] [--workdir saved/official-llmesr/ml-1m-half] [--key=value ...]

1. **Inputs.** From our side-data cache (recbole_llm.text; built on first use), into
   ``<workdir>/data/<dataset>/handled/``, where the official code looks for them:
   - ``inter.txt``: ``"<user> <item>"`` lines, each user's whole history in RecBole's time order, users in id order.
     The numbers ARE RecBole's internal ids: official user ``u`` and item ``i`` are RecBole's ``u`` and ``i``. The
     official loader numbers both from 1 (0 is padding) and takes the largest item in the file as the item count;
     RecBole numbers the ids of the ``.inter`` file first, from 1, so the interacted items are ``1..K``.
   - ``itm_emb_np.pkl`` ``[K, d]`` and ``pca64_itm_emb_np.pkl`` ``[K, hidden_size]`` (float32; the name keeps the
     official 64 whatever the width): row ``r`` is RecBole item ``r + 1``, because the official models insert the
     zero padding row at 0 themselves. Items of the ``.item`` file that no one rated (ids above K) are not written.
   - ``usr_emb_np.pkl`` ``[U, d]``: row ``r`` is RecBole user ``r + 1`` (the official notebooks find the similar
     users from it; its training code does not read it).
   - ``sim_user_100.pkl`` ``[U, k]`` int64: row ``r`` holds the neighbours of RecBole user ``r + 1`` as 0-based rows
     (internal id − 1), most similar first, the ``llm_similar_users`` our cache keeps; both sides use the first 10.
   So both implementations read the same vectors and the same neighbours.
2. **Runs**, each in its own process, ``--epochs`` epochs each, for every ``--models`` name (an official class):
   - ours through ``benchmarks/compare.py``'s worker, with ``--config_files benchmarks/protocols/llmesr_paper.yaml
     --loss_type=BCE --epochs=N --seed=S`` and any ``--key=value`` given here; the entries are in ``PAIRS``;
   - the official class through the official generator and trainer, imported from the clone (``sys.path``), with
     the official ``main.py``'s own parser and defaults and the flags of its scripts (``official_flags``); the
     protocol values (width, batch, sequence length, lr, patience, epochs, seed) are taken from our config. The
     clone is never modified, nor its code copied. What its ``main.py`` cannot do is done from outside:
     - its argparse ``choices`` admit neither our dataset nor the two classes its trainer never builds
       (``SASRec_seq``, ``DualLLMSASRec``): the worker relaxes the choices and builds the class through a
       subclass of its ``SeqTrainer``;
     - ``torch.autograd.set_detect_anomaly(True)`` at import is switched off again (same numbers, much faster);
     - ``numpy.Inf``, gone in numpy 2, is restored as an alias of ``numpy.inf`` for its early stopper.
     The official ``LLMESR_SASRec`` runs as shipped: minutes per epoch and about 11 GB on ml-1m-half.
3. **Report.** Per model, the validation NDCG@10 (uni100) of each epoch, ours against the official one, the test
   NDCG@10 of each side's best validation epoch, and each side's training seconds per epoch and peak RSS, into
   ``--out`` (default ``results/<dataset>-official.md``), written to a temporary file and renamed. Every run is a
   process of its own, so ``OMP_NUM_THREADS=1`` in the environment compares the two on one thread each.
"""
import argparse
import datetime
import importlib.util
import json
import os
import pickle
import platform
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import (_timed, config_argv, last_error_line, markdown_table, parse_worker_output,  # noqa: E402
                     peak_rss_mb, require_key_values, worker_command, write_text_atomic)

PROTOCOL = "benchmarks/protocols/llmesr_paper.yaml"
OUR_EXTRA = ("--loss_type=BCE",)  # the official loss, on top of the protocol file
# Official class -> (its module in the clone, our compare.py entry that builds the same model).
PAIRS = {
    "DualLLMSASRec": ("models.DualLLMSRS", "DualLLMSASRec@llmesr_setting=faithful"),
    "SASRec_seq": ("models.SASRec", "DualLLMSASRec@llmesr_use_llm_view=False@llmesr_cross_attention=False"
                                    "@llmesr_id_init=random"),
    "LLMESR_SASRec": ("models.LLMESR", "LLMESR_SASRec@llmesr_setting=faithful"),
}
# What identifies a clone of the official code: its entry point and the files the worker imports.
OFFICIAL_FILES = ("main.py", "models/SASRec.py", "models/DualLLMSRS.py", "models/LLMESR.py",
                  "generators/generator.py", "trainers/sequence_trainer.py", "utils/logger.py")
# The method flags of the official scripts (experiments/*.bash), the same as our LLMESR defaults.
PAPER_FLAGS = ("--freeze", "--use_cross_att", "--user_sim_func", "kd", "--alpha", "0.1", "--sim_user_num", "10")
OFFICIAL_MARKER = "OFFICIAL_RESULT "
# One line of the official log: the file handler's "<asctime>-" prefix, when present, then the message.
LOG_LINE = re.compile(r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+-)?(?P<message>.*)$")
EPOCH_EVAL = re.compile(r"\*+ Epoch: (\d+) eval \*+")
NDCG = re.compile(r"^\s*NDCG@10: ([0-9.]+)\s*$")  # the overall line, not "Short NDCG@10" of the groups


# ---------------------------------------------------------------- the official code's inputs, from our cache

def _contiguous_count(ids, what):
    """``len(ids)``, once checked to be ``1..len(ids)``, the only numbering the official loader reads right."""
    import numpy as np

    from recbole_llm.utils import RecBoleLLMError

    unique = np.unique(ids)
    if unique[0] != 1 or unique[-1] != len(unique):
        raise RecBoleLLMError(f"the {what} ids of the interactions are not 1..{len(unique)}, which the official "
                              f"loader needs; load the dataset without {what}s that have no interaction.")
    return len(unique)


def _dump(path, array):
    with open(path, "wb") as f:
        pickle.dump(array, f)


def export_inputs(dataset, config, handled):
    """Write the official input files (module docstring) into the folder ``handled`` from our side-data cache, for
    ``dataset`` before ``build()``; return what was written: ``{users, items, interactions, dim, pca_dim,
    neighbours}``."""
    import numpy as np

    from recbole_llm.text import item_vectors, pca_item_vectors, similar_users, time_ordered_histories, user_vectors

    histories = time_ordered_histories(dataset, config)
    users = _contiguous_count(list(histories), "user")
    items = _contiguous_count(np.concatenate(list(histories.values())), "item")
    os.makedirs(handled, exist_ok=True)
    with open(os.path.join(handled, "inter.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{user} {item}\n" for user, sequence in histories.items() for item in sequence.tolist())
    item_rows = item_vectors(dataset, config)[1:items + 1].numpy()
    pca_rows = pca_item_vectors(dataset, config, config["hidden_size"])[1:items + 1].numpy()
    neighbours = similar_users(dataset, config)[1:users + 1].numpy().astype(np.int64) - 1
    _dump(os.path.join(handled, "itm_emb_np.pkl"), item_rows)
    _dump(os.path.join(handled, "pca64_itm_emb_np.pkl"), pca_rows)
    _dump(os.path.join(handled, "usr_emb_np.pkl"), user_vectors(dataset, config)[1:users + 1].numpy())
    _dump(os.path.join(handled, "sim_user_100.pkl"), neighbours)
    return {"users": users, "items": items, "interactions": sum(map(len, histories.values())),
            "dim": item_rows.shape[1], "pca_dim": pca_rows.shape[1], "neighbours": neighbours.shape[1]}


def our_config(dataset, extra):
    """Our effective config of the protocol (DualLLMSASRec's: the side data and the protocol values are the same for
    the three models). RecBole's Config reads ``--key=value`` from ``sys.argv``, so ``extra`` is put there."""
    from recbole_llm.config import Config

    with config_argv(extra):
        return Config(model="DualLLMSASRec", dataset=dataset, config_file_list=[PROTOCOL])


def official_flags(config, model, dataset, epochs, seed):
    """The official ``main.py`` flags of one run: the protocol values of our config, then its scripts' method flags."""
    return ["--model_name", model, "--dataset", dataset, "--hidden_size", str(config["hidden_size"]),
            "--train_batch_size", str(config["train_batch_size"]), "--max_len", str(config["MAX_ITEM_LIST_LENGTH"]),
            "--lr", str(config["learning_rate"]), "--patience", str(config["stopping_step"]),
            "--num_train_epochs", str(epochs), "--seed", str(seed), *PAPER_FLAGS]


# ---------------------------------------------------------------- official worker: one class in this process

def _official_parser(official_dir):
    """The official ``main.py``'s parser, its ``choices`` of model and dataset relaxed. Importing main.py parses
    this process's argv and turns anomaly detection on; both are undone here."""
    import torch

    argv = sys.argv
    sys.argv = [os.path.join(official_dir, "main.py")]  # its defaults pass its own choices
    try:
        spec = importlib.util.spec_from_file_location("llmesr_official_main", sys.argv[0])
        main = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(main)
    finally:
        sys.argv = argv
    torch.autograd.set_detect_anomaly(False)
    for action in main.parser._actions:
        if action.dest in ("model_name", "dataset"):
            action.choices = None
    return main.parser


def run_official(official_dir, model, flags):
    """Train and validate the official class ``model`` as its ``main.py`` would, in the current folder (which holds
    ``data/<dataset>/handled/``); return ``{train_s, threads, peak_rss_mb}``. Its log goes to
    ``log/<dataset>/<model>/``."""
    import numpy
    import torch

    if not hasattr(numpy, "Inf"):
        numpy.Inf = numpy.inf  # numpy 2 dropped the alias that its early stopper uses
    sys.path.insert(0, official_dir)
    args = _official_parser(official_dir).parse_args(flags)
    from generators.generator import Seq2SeqGeneratorAllUser
    from trainers.sequence_trainer import SeqTrainer
    from utils.logger import Logger
    from utils.utils import set_seed

    model_class = getattr(importlib.import_module(PAIRS[model][0]), model)

    class Trainer(SeqTrainer):  # the official trainer builds only the LLMESR_* classes
        def _create_model(self):
            self.model = model_class(self.user_num, self.item_num, self.device, self.args).to(self.device)

    set_seed(args.seed)
    args.output_dir = os.path.join(args.output_dir, args.dataset, args.model_name, args.check_path)
    os.makedirs(args.output_dir, exist_ok=True)
    log_manager = Logger(args)
    logger, writer = log_manager.get_logger()
    args.now_str = log_manager.get_now_str()
    device = torch.device(f"cuda:{args.gpu_id}" if torch.cuda.is_available() and not args.no_cuda else "cpu")
    trainer = Trainer(args, logger, writer, device, Seq2SeqGeneratorAllUser(args, logger, device))
    train_s = []
    trainer._train_one_epoch = _timed(trainer._train_one_epoch, train_s)
    trainer.train()
    log_manager.end_log()
    return {"train_s": train_s, "threads": torch.get_num_threads(),
            "peak_rss_mb": peak_rss_mb()}


def official_worker_main(argv):
    """``--official_worker --official_dir=D --workdir=W --model=M -- <official main.py flags>``."""
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    for name in ("--official_dir", "--workdir", "--model"):
        parser.add_argument(name, required=True)
    args, flags = parser.parse_args(argv[:split]), argv[split + 1:]
    os.chdir(args.workdir)
    print(OFFICIAL_MARKER + json.dumps(run_official(os.path.abspath(args.official_dir), args.model, flags)),
          flush=True)


# ---------------------------------------------------------------- the two sides' curves

def parse_official_log(text):
    """``({epoch: validation NDCG@10}, test NDCG@10 or None)`` from the official trainer's log (its file, with the
    time prefix, or its console output, without)."""
    curve, test, epoch, after_test = {}, None, None, False
    for line in text.splitlines():
        message = LOG_LINE.match(line)["message"]
        started = EPOCH_EVAL.search(message)
        if started:
            epoch = int(started[1])
        elif "Running test" in message:
            epoch, after_test = None, True
        found = NDCG.match(message)
        if found and epoch is not None and epoch not in curve:
            curve[epoch] = float(found[1])
        elif found and after_test and test is None:
            test = float(found[1])
    return curve, test


def official_log_path(workdir, dataset, model):
    """Where the official Logger writes a run without ``--log``."""
    return os.path.join(workdir, "log", dataset, model, "default", "log.txt")


def run_official_side(args, model, flags):
    """``{curve, test, train_s_per_epoch, threads, peak_rss_mb}`` of the official class, or ``{error}``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--official_worker", f"--official_dir={args.official_dir}",
           f"--workdir={args.workdir}", f"--model={model}", "--", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(OFFICIAL_MARKER)]
    if done.returncode != 0 or not lines:
        return {"error": last_error_line(done.returncode, done.stderr, done.stdout)}
    result = json.loads(lines[-1][len(OFFICIAL_MARKER):])
    with open(official_log_path(args.workdir, args.dataset, model), encoding="utf-8") as f:
        curve, test = parse_official_log(f.read())
    return {"curve": [curve.get(epoch) for epoch in range(args.epochs)], "test": test,
            "train_s_per_epoch": sum(result["train_s"]) / len(result["train_s"]), "threads": result["threads"],
            "peak_rss_mb": result["peak_rss_mb"]}


def run_our_side(args, entry, metric):
    """``{curve, test, train_s_per_epoch, threads, peak_rss_mb}`` of our entry through compare.py's worker, or
    ``{error}``."""
    extra = [*OUR_EXTRA, f"--epochs={args.epochs}", *args.extra]
    done = subprocess.run(worker_command(entry, args.dataset, args.seed, PROTOCOL, extra),
                          capture_output=True, text=True)
    summary, error = parse_worker_output(done.returncode, done.stdout, done.stderr)
    if summary is None:
        return {"error": error}
    curve = [result.get(metric) for result in summary["valid_curve"]]
    return {"curve": (curve + [None] * args.epochs)[:args.epochs], "test": summary["test"].get(metric),
            "train_s_per_epoch": summary["train_s_per_epoch"], "threads": summary["env"]["threads"],
            "peak_rss_mb": summary["peak_rss_mb"]}


# ---------------------------------------------------------------- the report

def _cell(value):
    return "—" if value is None else f"{value:.4f}"


def _difference(ours, official):
    return "—" if ours is None or official is None else f"{ours - official:+.4f}"


def cost_line(ours, official):
    """Each side's training seconds per epoch, torch threads and peak RSS of its whole process, and how many times
    faster ours trains."""
    sides = [f"{name} {side['train_s_per_epoch']:.1f} s/epoch on {side['threads']} torch thread(s), peak RSS "
             f"{side['peak_rss_mb']:,.0f} MB" for name, side in (("ours", ours), ("official", official))]
    return (f"Training cost: {'; '.join(sides)}; ours is "
            f"{official['train_s_per_epoch'] / ours['train_s_per_epoch']:.1f}× as fast.")


def pair_section(model, ours, official):
    """One model's section: the entries, then epoch rows of ours, the official value and their difference."""
    out = [f"## {model}", "", f"Ours: `{PAIRS[model][1]}`; official: `{PAIRS[model][0]}.{model}`.", ""]
    failed = [f"- {side} failed: {result['error']}" for side, result in (("ours", ours), ("official", official))
              if "error" in result]
    if failed:
        return "\n".join(out + failed + [""])
    rows = [[epoch, _cell(a), _cell(b), _difference(a, b)]
            for epoch, (a, b) in enumerate(zip(ours["curve"], official["curve"]))]
    rows.append(["test, best valid epoch", _cell(ours["test"]), _cell(official["test"]),
                 _difference(ours["test"], official["test"])])
    out += [markdown_table(["epoch", "ours valid NDCG@10", "official valid NDCG@10", "ours − official"], rows), "",
            cost_line(ours, official), ""]
    return "\n".join(out)


def official_commit(official_dir):
    """The clone's commit, or 'unknown' when it is not a git checkout."""
    done = subprocess.run(["git", "-C", official_dir, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def render_report(args, config, command, inputs, n_items, sections, now=None):
    """The whole results file: context, inputs, protocol notes, then one section per model."""
    import torch

    now = now or datetime.datetime.now().astimezone()
    unrated = n_items - inputs["items"]
    workdir = os.path.relpath(args.workdir)
    workdir = args.workdir if workdir.startswith("..") else workdir
    out = [f"# LLM-ESR on {args.dataset}: ours next to the official code", "",
           f"- Date: {now:%Y-%m-%d %H:%M %Z}",
           f"- Machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
           f"torch {torch.__version__}",
           f"- Command: `{command}`",
           f"- Official code: liuqidong07/LLM-ESR at {official_commit(args.official_dir)}, driven from its clone "
           f"(see the docstring of benchmarks/official_llmesr.py for what is done from outside it).",
           f"- Inputs, both sides: {inputs['users']:,} users, {inputs['items']:,} items, {inputs['interactions']:,} "
           f"interactions; {inputs['dim']}-d item vectors, their PCA to {inputs['pca_dim']}, {inputs['neighbours']} "
           f"similar users each, from our side-data cache, written to `{workdir}/data/{args.dataset}/handled/` "
           f"with RecBole's internal ids.", "",
           "Protocol:",
           f"- Ours: `--config_files {PROTOCOL} {' '.join(OUR_EXTRA)} --epochs={args.epochs} --seed={args.seed}"
           f"{''.join(' ' + a for a in args.extra)}`. Official: the flags of its scripts, `{' '.join(PAPER_FLAGS)}`, "
           f"with the width, batch, sequence length, lr, patience, epochs and seed of our config.",
           "- Validation NDCG@10 against 100 uniform negatives outside the user's history, resampled at each "
           "evaluation, on both sides. The test row is each side's best validation epoch on the test items.",
           "- The official SASRec backbone attends both ways (its causal mask is commented out), with its defaults' "
           "1 head and a ReLU FFN as wide as the model; ours is RecBole's causal SASRec, with "
           f"{config['n_heads']} heads and a {config['inner_size']}-wide {config['hidden_act']} FFN. The dual-view "
           "models run the faithful cross-attention, whose output replaces each view."]
    if "LLMESR_SASRec" in args.models:
        out.append("- Our self-distillation teacher is the running table of the users' features (`llmesr_teacher: "
                   "running`); the official one re-encodes the 10 similar users at every step.")
    if unrated:
        out.append(f"- The official code draws negatives from the {inputs['items']:,} rated items; RecBole draws "
                   f"them from all {n_items:,} items of the .item file, {unrated:,} of them rated by no one.")
    return "\n".join(out + [""] + sections)


def shown_argv(argv, official_dir):
    """``argv`` with the clone's folder, a local path, replaced by a placeholder."""
    return [arg.replace(official_dir, "<clone of liuqidong07/LLM-ESR>") for arg in argv]


# ---------------------------------------------------------------- command line

def _check_official_dir(parser, official_dir):
    missing = [name for name in OFFICIAL_FILES if not os.path.isfile(os.path.join(official_dir, name))]
    if missing:
        parser.error(f"--official_dir {official_dir!r} is not a clone of liuqidong07/LLM-ESR (no {missing[0]}); pass "
                     f"the folder of `git clone https://github.com/liuqidong07/LLM-ESR`.")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Any other --key=value reaches our runs' RecBole Config.")
    parser.add_argument("--official_dir", required=True, help="a clone of github.com/liuqidong07/LLM-ESR")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--models", default=",".join(PAIRS), help=f"official classes, of {', '.join(PAIRS)}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="Markdown file (default results/<dataset>-official.md)")
    parser.add_argument("--workdir", default=None,
                        help="the official code's working folder (default saved/official-llmesr/<dataset>)")
    args, extra = parser.parse_known_args(argv)
    _check_official_dir(parser, args.official_dir)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in PAIRS]
    if unknown:
        parser.error(f"--models: {unknown[0]!r} is not one of {', '.join(PAIRS)}")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    require_key_values(parser, extra)
    args.extra = extra
    args.out = args.out or os.path.join("results", f"{args.dataset}-official.md")
    args.workdir = os.path.abspath(args.workdir or os.path.join("saved", "official-llmesr", args.dataset))
    return args


def prepare(args):
    """Our config, the dataset, and the official inputs written from our cache: ``(config, inputs, n_items)``; one
    line on stderr and None when they cannot be built."""
    from recbole_llm.utils import create_dataset

    try:
        config = our_config(args.dataset, [*OUR_EXTRA, f"--epochs={args.epochs}", f"--seed={args.seed}",
                                           *args.extra])
        dataset = create_dataset(config)
        inputs = export_inputs(dataset, config, os.path.join(args.workdir, "data", args.dataset, "handled"))
    except Exception as error:  # any cause stops the tool before a run: say which flag, and the error
        print(f"--dataset {args.dataset}: its side data for the official code cannot be built: {error} (check the "
              f"dataset's atomic files under data_path, and the --key=value arguments)", file=sys.stderr)
        return None
    return config, inputs, dataset.item_num - 1


def main(argv):
    if argv[:1] == ["--official_worker"]:
        return official_worker_main(argv[1:])
    args = parse_args(argv)
    prepared = prepare(args)
    if prepared is None:
        return 2
    config, inputs, n_items = prepared
    metric = config["valid_metric"].lower()
    sections, failed = [], False
    for model in args.models:
        start = time.perf_counter()
        ours = run_our_side(args, PAIRS[model][1], metric)
        official = run_official_side(args, model, official_flags(config, model, args.dataset, args.epochs,
                                                                 args.seed))
        failed = failed or "error" in ours or "error" in official
        sections.append(pair_section(model, ours, official))
        print(f"{model}: ours {ours.get('curve', ours.get('error'))}, official "
              f"{official.get('curve', official.get('error'))} ({time.perf_counter() - start:.0f} s)", flush=True)
    command = shlex.join(["python", "benchmarks/official_llmesr.py", *shown_argv(argv, args.official_dir)])
    write_text_atomic(args.out, render_report(args, config, command, inputs, n_items, sections))
    print(f"written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
