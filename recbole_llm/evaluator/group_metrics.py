"""Long-tail group metrics: every configured metric, also for tail/head users and tail/head target items.

Groups are fixed once, before training, from the training split (every interaction but the valid and test targets):

- a user's history is the number of its training interactions; the user is ``tail_user`` when its history is
  shorter than ``llm_tail_user_threshold``, else ``head_user``;
- an item's popularity is the number of distinct users with it among their training interactions; an evaluated
  row is ``tail_item`` when its target's popularity is below ``llm_tail_item_threshold``, else ``head_item``.

A threshold set to ``~`` comes from ``llm_head_ratio`` (see :func:`head_threshold`). Users and items absent from
training have 0 and are tail. (LLM-ESR's code counts popularity over train+valid+test and a user's length on the
test input; here no evaluation target informs a group.)

Each metric key of RecBole's result (``ndcg@10``) gains one key per non-empty group, ``ndcg@10[tail_user]``,
``ndcg@10[head_user]``, ``ndcg@10[tail_item]``, ``ndcg@10[head_item]``, computed by RecBole's own metric classes
on that group's evaluated rows. A group without rows gives no key. The overall keys are RecBole's values, untouched.
For metrics that average per row (Hit, Recall, NDCG, MRR, Precision, MAP) the overall value is the row-weighted
mean of tail and head; set-level metrics (ItemCoverage, GiniIndex, ...) are recomputed on each group's rows.

The groups ride on RecBole's evaluation flow: :class:`GroupCollector` wraps the trainer's ``eval_collector`` to
note each row's user and target item, and :class:`GroupEvaluator` wraps ``trainer.evaluator`` to add the group
keys to the result of ``evaluator.evaluate(struct)``. Under DDP each group key is the row-weighted mean over all
ranks' shards (padded by the DistributedSampler, like RecBole's overall keys).
"""
import math
from logging import getLogger

import numpy as np
import torch
import torch.distributed as dist
from recbole.evaluator.collector import DataStruct
from recbole.utils import EvaluatorType

from recbole_llm.utils import RecBoleLLMError

GROUPS = ("tail_user", "head_user", "tail_item", "head_item")
# DataStruct entries with one row per evaluated row; the others (item counts, model data) hold for every group.
ROW_KEYS = ("rec.topk", "rec.items", "rec.meanrank", "rec.score")
ROW_USER, ROW_ITEM = "llm.row_user", "llm.row_item"


def group_key(metric_key, group):
    """The result key of ``metric_key`` (``ndcg@10``) on ``group`` (``tail_user``): ``ndcg@10[tail_user]``."""
    return f"{metric_key}[{group}]"


def head_threshold(counts, head_ratio):
    """The count that makes the ``head_ratio`` share with the largest counts head, where head = count >= it.

    Only positive counts form the population (users and items seen in training). With ``k = ceil(head_ratio * n)``
    the threshold is the k-th largest count. Ties at the threshold all go to head, so head may hold more than
    ``head_ratio`` of the population; tail = count < threshold.
    """
    if not 0 < head_ratio <= 1:
        raise RecBoleLLMError(f"config key 'llm_head_ratio' must lie in (0, 1], got {head_ratio}.")
    seen = np.sort(np.asarray(counts)[np.asarray(counts) > 0])[::-1]
    if len(seen) == 0:
        return 1
    k = max(1, math.ceil(round(head_ratio * len(seen), 9)))  # round: 0.3 * 10 is 3.0000000000000004
    return int(seen[k - 1])


def dataset_interactions(dataset):
    """``(users, items)`` of every interaction a sequential dataset holds, one entry per interaction.

    A dataset whose augmentation keeps only some rows (``AllPositionsDataset``) keeps its interactions in
    ``source_interactions``. Otherwise each row of RecBole's prefix augmentation contributes its target, and each
    user's shortest row also contributes its input: the interactions before the user's first target (its first item).
    """
    if getattr(dataset, "source_interactions", None) is not None:
        return dataset.source_interactions
    inter = dataset.inter_feat
    users, targets = inter[dataset.uid_field], inter[dataset.iid_field]
    lengths, sequences = inter[dataset.item_list_length_field], inter[dataset.item_id_list_field]
    order = torch.from_numpy(np.lexsort((lengths.numpy(), users.numpy())))
    sorted_users = users[order]
    first = order[torch.cat([torch.tensor([True]), sorted_users[1:] != sorted_users[:-1]])]
    in_input = torch.arange(sequences.shape[1]) < lengths[first].unsqueeze(1)
    input_users = users[first].unsqueeze(1).expand_as(in_input)[in_input]
    return torch.cat([input_users, users]), torch.cat([sequences[first][in_input], targets])


def pair_keys(dataset):
    """``user * n_items + item`` of each interaction of a split dataset (its targets)."""
    inter = dataset.inter_feat
    return inter[dataset.uid_field] * dataset.item_num + inter[dataset.iid_field]


def training_pairs(dataset, evaluation_datasets):
    """``(pairs, counts)``: the sorted distinct ``user * n_items + item`` keys of ``dataset``'s interactions, and how
    often each is a training interaction (0 when its only occurrences are evaluation targets)."""
    users, items = dataset_interactions(dataset)
    pairs, counts = torch.unique(users * dataset.item_num + items, return_counts=True)
    for evaluation in evaluation_datasets:
        counts -= torch.bincount(torch.searchsorted(pairs, pair_keys(evaluation)), minlength=len(pairs))
    return pairs, counts


def training_counts(dataset, evaluation_datasets):
    """``(user_history, item_popularity)``: per user id, its number of training interactions; per item id, the
    number of distinct users with it among their training interactions.

    The training interactions are all of ``dataset``'s (the whole dataset) but the evaluation targets. This does
    not depend on how the training samples are laid out (``llm_train_mode``) nor on ``MAX_ITEM_LIST_LENGTH``.
    """
    n_items = dataset.item_num
    pairs, counts = training_pairs(dataset, evaluation_datasets)
    history = torch.zeros(dataset.user_num, dtype=torch.long).index_add_(0, pairs // n_items, counts)
    popularity = torch.bincount(pairs[counts > 0] % n_items, minlength=n_items)  # repeats of an item count once
    return history, popularity


class LongTailGroups:
    """Users' training-history lengths, items' training popularity, and the two thresholds."""

    def __init__(self, user_history, item_popularity, user_threshold, item_threshold, origin=("set", "set")):
        self.user_history, self.item_popularity = user_history, item_popularity
        self.user_threshold, self.item_threshold = user_threshold, item_threshold
        self.origin = origin  # how each threshold was chosen, for the log

    @classmethod
    def from_split(cls, config, dataset, evaluation_datasets):
        """Count the training split (see :func:`training_counts`) and take the thresholds from ``config``."""
        history, popularity = training_counts(dataset, evaluation_datasets)
        ratio = config["llm_head_ratio"]
        thresholds, origin = [], []
        for key, counts in (("llm_tail_user_threshold", history), ("llm_tail_item_threshold", popularity)):
            derived = config[key] is None
            thresholds.append(head_threshold(counts, ratio) if derived else config[key])
            origin.append(f"from llm_head_ratio {ratio}" if derived else key)
        return cls(history, popularity, *thresholds, origin=tuple(origin))

    def masks(self, users, items):
        """``{group: bool mask over the rows}`` for rows with these user and target-item ids."""
        tail_user = self.user_history[users] < self.user_threshold
        tail_item = self.item_popularity[items] < self.item_threshold
        return {"tail_user": tail_user, "head_user": ~tail_user, "tail_item": tail_item, "head_item": ~tail_item}

    def describe(self):
        """One log line stating both rules and the group sizes among the users and items seen in training."""
        users, items = self.user_history[self.user_history > 0], self.item_popularity[self.item_popularity > 0]
        return (f"long-tail groups from the training split: tail_user = history < {self.user_threshold} interactions "
                f"({self.origin[0]}; {int((users < self.user_threshold).sum())} of {len(users)} training users); "
                f"tail_item = fewer than {self.item_threshold} distinct training users "
                f"({self.origin[1]}; {int((items < self.item_threshold).sum())} of {len(items)} training items)")


class _Wrapper:
    """Forwards every attribute it does not define to the wrapped RecBole object."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def __getattr__(self, name):
        if name == "wrapped":  # not set yet (copy, unpickling): no endless lookup
            raise AttributeError(name)
        return getattr(self.wrapped, name)


class GroupCollector(_Wrapper):
    """RecBole's collector, also noting each evaluated row's user id and (first) target item id.

    Full-sort sequential batches have one row per interaction (``positive_u`` is ``arange``). Neg-sample batches
    have one row per user, whose positives and negatives sit in one contiguous block of the interaction; the
    loader sorts its users, so ``unique_consecutive`` of the user ids gives the rows' users. A row with several
    targets (a neg-sample split that leaves a user several evaluation interactions) takes its first target's group.
    """

    def __init__(self, collector, uid_field):
        super().__init__(collector)
        self.uid_field = uid_field
        self._users, self._items = [], []

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        self.wrapped.eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        rows = scores_tensor.shape[0]
        users = interaction[self.uid_field].cpu()
        if len(users) != rows:
            users = torch.unique_consecutive(users)
        positive_u = positive_u.cpu()
        first_target = torch.cat([torch.tensor([True]), positive_u[1:] != positive_u[:-1]])
        items = positive_i.cpu()[first_target]
        if len(users) != rows or len(items) != rows:
            raise RuntimeError(f"group metrics: {rows} score rows but {len(users)} users and {len(items)} targets; "
                               f"RecBole's evaluation batch layout is not the one this collector expects.")
        self._users.append(users)
        self._items.append(items)

    def get_data_struct(self):
        """RecBole's struct, plus the rows' users and target items, which are then reset like RecBole's rows."""
        struct = self.wrapped.get_data_struct()
        if self._users:
            struct.set(ROW_USER, torch.cat(self._users))
            struct.set(ROW_ITEM, torch.cat(self._items))
        self._users, self._items = [], []
        return struct


class GroupEvaluator(_Wrapper):
    """RecBole's evaluator, adding each metric on each group's rows to the overall result."""

    def __init__(self, evaluator, groups, config):
        super().__init__(evaluator)
        self.groups, self.config = groups, config
        self.row_counts = {}  # rows per group in the last evaluation (tests and logs)

    def evaluate(self, dataobject):
        if ROW_USER not in dataobject:
            return self.wrapped.evaluate(dataobject)
        users, items = dataobject[ROW_USER], dataobject[ROW_ITEM]
        del dataobject[ROW_USER], dataobject[ROW_ITEM]
        result = self.wrapped.evaluate(dataobject)
        masks = self.groups.masks(users, items)
        self.row_counts = {group: int(mask.sum()) for group, mask in masks.items()}
        # An empty group would make RecBole's metrics average nothing: it gets no key.
        group_results = {group: self.wrapped.evaluate(_select_rows(dataobject, mask))
                         for group, mask in masks.items() if mask.any()}
        if not self.config["single_spec"]:
            group_results = self._reduce_across_ranks(list(result), group_results)
        for group, values in group_results.items():
            result.update({group_key(key, group): value for key, value in values.items()})
        return result

    def _reduce_across_ranks(self, metric_keys, group_results):
        """Each group's row-weighted mean over all DDP ranks, the same on every rank.

        RecBole's ``_map_reduce`` all-gathers every result key in order, so all ranks must hold the same keys even
        where a shard has no row of a group; it then averages identical values, which keeps them.
        """
        totals = torch.zeros(len(GROUPS), 1 + len(metric_keys), dtype=torch.float64, device=self.config["device"])
        for g, group in enumerate(GROUPS):
            if group in group_results:
                totals[g, 0] = self.row_counts[group]
                totals[g, 1:] = self.row_counts[group] * torch.tensor([group_results[group][k] for k in metric_keys],
                                                                      dtype=torch.float64)
        dist.all_reduce(totals)
        places = self.config["metric_decimal_place"]
        return {group: {key: round(totals[g, 1 + m].item() / totals[g, 0].item(), places)
                        for m, key in enumerate(metric_keys)}
                for g, group in enumerate(GROUPS) if totals[g, 0] > 0}


def _select_rows(dataobject, mask):
    """A DataStruct holding only the masked rows of the per-row entries."""
    selected = DataStruct()
    for key, value in dataobject._data_dict.items():  # DataStruct offers no other way to list its entries
        selected.set(key, value[mask] if key in ROW_KEYS else value)
    return selected


def attach_group_metrics(trainer, config, dataset, evaluation_data):
    """Wrap ``trainer``'s collector and evaluator so that its results hold the group keys; log the thresholds.

    ``dataset`` is the whole dataset after ``data_preparation``; ``evaluation_data`` the valid and test loaders,
    whose targets are not training interactions.

    Ranking evaluation only: value metrics (AUC, LogLoss) have one row per interaction, not per user or target.
    """
    logger = getLogger()
    if config["eval_type"] != EvaluatorType.RANKING:
        logger.warning("llm_group_metrics: group metrics need ranking metrics; none are reported for this run.")
        return trainer
    groups = LongTailGroups.from_split(config, dataset, [data.dataset for data in evaluation_data if data])
    logger.info(groups.describe())
    trainer.eval_collector = GroupCollector(trainer.eval_collector, config["USER_ID_FIELD"])
    trainer.evaluator = GroupEvaluator(trainer.evaluator, groups, config)
    return trainer
