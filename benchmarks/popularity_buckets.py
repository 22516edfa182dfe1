"""Test metrics of saved checkpoints by the popularity of the target item, in buckets.

The long-tail groups of every run split the items in two at one threshold (``llm_head_ratio``: on ml-1m-half,
items with fewer than 213 training users are "tail"). That tail still holds well-trained items. This script
re-evaluates best-model checkpoints on the test targets of several popularity buckets, so that one sees where
an LLM-enhanced model gains or loses against its backbone, down to the items with a handful of users.

    python benchmarks/popularity_buckets.py --bounds 20,50,100,213 --metric ndcg@10 \\
        --checkpoints SASRecAP=saved/a.pth SASRecAP=saved/b.pth LLMESR_SASRec=saved/c.pth \\
        --baseline SASRecAP --out results/ml-1m-half-popularity.md

Each ``LABEL=path`` is one checkpoint (``compare.py --keep_checkpoints`` keeps them); checkpoints under one label
(seeds) give mean ± std. A bucket ``[a, b)`` holds the test rows whose target has at least ``a`` and fewer than
``b`` distinct training users (the same count as the long-tail groups). Each checkpoint is evaluated as its run
was: the same loaders, the same history exclusion, full ranking or sampled.

``--views`` also ranks with each view of every LLM-ESR checkpoint alone (the ID view's dot product, or the
semantic view's), one row each, to show which view places the targets of each bucket; other checkpoints keep one
row. The trained model is not changed: the other view's item columns are zeroed at scoring, so its term is 0.

``--rank_adjustment 0.1,0.2`` also ranks every checkpoint by ``score - tau * log(share of the item among the
training targets)``, one row per tau: the post-hoc logit adjustment of Menon et al. (ICLR 2021, "Long-tail learning
via logit adjustment"), which trades head accuracy for tail accuracy without retraining. The shares are those of
``llm_logit_adjustment`` (``layers.log_target_shares``), counted over the targets the run trained on. With
``--bounds 213`` (ml-1m-half's tail-item threshold) the buckets are exactly the runs' tail and head items, so the rows
trace each model's overall/tail trade-off curve.
"""
import argparse
import contextlib
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import format_mean_std, markdown_table, relative_change, write_text_atomic  # noqa: E402


class PopularityBuckets:
    """Long-tail groups of the evaluator, one per bucket ``[low, high)`` of training popularity."""

    def __init__(self, item_popularity, bounds):
        self.item_popularity = item_popularity
        self.edges = [0, *bounds, None]

    def names(self):
        return [bucket_name(low, high) for low, high in zip(self.edges, self.edges[1:])]

    def masks(self, users, items):
        popularity = self.item_popularity[items]
        return {bucket_name(low, high): (popularity >= low) & (True if high is None else popularity < high)
                for low, high in zip(self.edges, self.edges[1:])}


def bucket_name(low, high):
    return f"{low}+" if high is None else f"{low}-{high - 1}"


VIEWS = ("ID view", "semantic view")  # LLM-ESR's item matrix is [ID view; semantic view], view_size columns each


@contextlib.contextmanager
def one_view(model, view):
    """Within the block, ``model`` (an LLM-ESR model with both views) scores with ``view`` alone: the other view's
    columns of its item matrix are zeroed, so that view adds nothing to any item's score, and BERT4Rec's per-item
    output bias, which belongs to neither view, is left out."""
    kept = slice(0, model.view_size) if view == VIEWS[0] else slice(model.view_size, 2 * model.view_size)
    full_matrix = model.item_matrix

    def view_matrix():
        matrix = full_matrix()
        masked = torch.zeros_like(matrix)
        masked[:, kept] = matrix[:, kept]
        return masked

    model.item_matrix = view_matrix  # instance attributes: they shadow the methods until deleted
    model.item_bias = lambda items: 0.0
    model._eval_item_matrix = None  # the evaluation's cached matrix is rebuilt from the scoring in force
    try:
        yield
    finally:
        del model.item_matrix, model.item_bias
        model._eval_item_matrix = None


@contextlib.contextmanager
def rank_adjusted(model, shift):
    """Within the block, ``model`` scores every item ``i`` as its own score minus ``shift[i]`` (``[n_items]``), in
    full ranking (``full_sort_predict``) and in sampled evaluation (``predict``)."""
    full_sort_predict, predict = model.full_sort_predict, model.predict
    model.full_sort_predict = lambda interaction: full_sort_predict(interaction) - shift
    model.predict = lambda interaction: predict(interaction) - shift[interaction[model.ITEM_ID]]
    try:
        yield
    finally:
        del model.full_sort_predict, model.predict  # the instance attributes shadowed the methods


ADJUSTED = "rank adjustment"


def adjustment_name(tau):
    return f"{ADJUSTED} {tau:g}"


def evaluate_buckets(model_file, bounds, metric, views=False, taus=()):
    """``({scoring: {'all': value, bucket: value}}, {bucket: test rows})`` of one checkpoint, where the scorings
    are the model's own (``'model'``), with ``views`` and a model with both LLM-ESR views each of ``VIEWS`` alone,
    and for each ``tau`` of ``taus`` the model's scores post-hoc adjusted by ``tau`` (``adjustment_name``)."""
    from recbole_llm.data.dataset import training_target_field
    from recbole_llm.model.layers import log_target_shares
    from recbole_llm.quick_start import _build_trainer, load_data_and_model

    config, model, dataset, train_data, valid_data, test_data = load_data_and_model(model_file, console_log=False)
    config["llm_group_metrics"] = True
    trainer = _build_trainer(config, model, dataset, valid_data, test_data)
    buckets = PopularityBuckets(trainer.evaluator.groups.item_popularity, bounds)
    trainer.evaluator.groups = buckets

    def evaluate():
        with torch.no_grad():
            result = trainer.evaluate(test_data, load_best_model=False)
        return {"all": result[metric], **{name: result.get(f"{metric}[{name}]") for name in buckets.names()}}

    scorings = {"model": evaluate()}
    for view in VIEWS if views and getattr(model, "has_both_views", False) else ():
        with one_view(model, view):
            scorings[view] = evaluate()
    if taus:
        log_shares = log_target_shares(train_data.dataset, training_target_field(config)).to(model.device)
        for tau in taus:
            with rank_adjusted(model, tau * log_shares):
                scorings[adjustment_name(tau)] = evaluate()
    return scorings, {name: trainer.evaluator.row_counts.get(name, 0) for name in buckets.names()}


def _measured(runs, column):
    """The values of ``column`` over ``runs``, leaving out a bucket that had no test row."""
    return [run[column] for run in runs if run[column] is not None]


def view_label(label, view):
    return f"{label}, {view} only"


def scoring_label(label, scoring):
    """The row of checkpoint ``label`` under ``scoring`` (a key of ``evaluate_buckets``'s result)."""
    if scoring == "model":
        return label
    return view_label(label, scoring) if scoring in VIEWS else f"{label}, {scoring}"


def view_labels(results):
    return {view_label(label, view) for label in results for view in VIEWS}


def report(results, counts, metric, baseline, command):
    """The Markdown of ``results`` (``{label: [values per checkpoint]}``) and the bucket sizes ``counts``; a row of
    one view alone (``view_label``) gets no change against the baseline."""
    columns = ["all", *counts]
    header = ["model", "checkpoints", *[f"{c}" if c == "all" else f"{c} users ({counts[c]} rows)" for c in columns]]
    rows = []
    for label, runs in results.items():
        rows.append([label, str(len(runs)), *[format_mean_std(_measured(runs, c)) for c in columns]])
        if baseline in results and label != baseline and label not in view_labels(results):
            rows.append([f"{label} vs {baseline}", "", *[relative_change(_measured(runs, c),
                                                                         _measured(results[baseline], c))
                                                         for c in columns]])
    return "\n".join([
        f"# Test {metric} by the target item's training popularity", "",
        f"Command: `{command}`", "",
        "Each bucket holds the test rows whose target item has that many distinct training users; 'all' is the "
        "whole test set. Values are mean ± std over the checkpoints of a label (one per seed)."
        + (" A row with 'rank adjustment tau' ranks by score - tau * log(the item's share of the training "
           "targets), the post-hoc logit adjustment; the model is not retrained."
           if any(ADJUSTED in label for label in results) else ""), "",
        markdown_table(header, rows), ""])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="LABEL=PATH",
                        help="best-model checkpoints, each with the label of its row")
    parser.add_argument("--bounds", default="20,50,100,213", help="ascending bucket bounds (default 20,50,100,213)")
    parser.add_argument("--metric", default="ndcg@10", help="a metric key of the runs' results (default ndcg@10)")
    parser.add_argument("--baseline", default=None, help="the label each other row is measured against")
    parser.add_argument("--views", action="store_true",
                        help="also rank with each view of LLM-ESR checkpoints alone, a row each")
    parser.add_argument("--rank_adjustment", default="", metavar="TAU,...",
                        help="also rank every checkpoint by score - tau * log(training target share), a row per "
                             "tau (comma-separated positive numbers)")
    parser.add_argument("--out", default=None, help="Markdown file to write (default: print only)")
    args = parser.parse_args(argv)
    try:
        args.bounds = [int(b) for b in args.bounds.split(",")]
    except ValueError:
        parser.error(f"--bounds {args.bounds!r}: give comma-separated integers, e.g. 20,50,100,213")
    if args.bounds != sorted(set(args.bounds)) or args.bounds[0] <= 0:
        parser.error(f"--bounds {args.bounds}: give distinct positive integers in ascending order")
    try:
        args.rank_adjustment = [float(t) for t in args.rank_adjustment.split(",")] if args.rank_adjustment else []
    except ValueError:
        parser.error(f"--rank_adjustment {args.rank_adjustment!r}: give comma-separated numbers, e.g. 0.1,0.2,0.5")
    if any(tau <= 0 for tau in args.rank_adjustment):
        parser.error(f"--rank_adjustment {args.rank_adjustment}: each tau must be positive (the model's own "
                     f"scores are always a row)")
    pairs = []
    for entry in args.checkpoints:
        label, sep, path = entry.partition("=")
        if not sep or not label or not os.path.isfile(path):
            parser.error(f"--checkpoints {entry!r}: give LABEL=PATH with an existing checkpoint file")
        pairs.append((label, path))
    args.checkpoints = pairs
    if args.baseline and args.baseline not in {label for label, _ in pairs}:
        parser.error(f"--baseline {args.baseline!r} is not one of the checkpoints' labels")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    results, counts = {}, None
    for label, path in args.checkpoints:
        scorings, counts = evaluate_buckets(path, args.bounds, args.metric, args.views, args.rank_adjustment)
        for scoring, values in scorings.items():
            row = scoring_label(label, scoring)
            results.setdefault(row, []).append(values)
            print(f"{row} {path}: " + ", ".join(f"{k} {v}" for k, v in values.items()), flush=True)
    if args.views and not view_labels(results) & set(results):
        raise SystemExit("--views: none of the checkpoints is an LLM-ESR model with both views "
                         "(llmesr_use_id_view and llmesr_use_llm_view); leave --views out")
    command = "python benchmarks/popularity_buckets.py " + " ".join(shlex.quote(a) for a in argv)
    text = report(results, counts, args.metric, args.baseline, command)
    print(text)
    if args.out:
        write_text_atomic(args.out, text)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
