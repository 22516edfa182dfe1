"""History exclusion for sequential models (``llm_exclude_history``), as RecBole does for general models.

RecBole 1.2.1 passes no history to a sequential model's evaluation, so a user's own earlier items compete with the
target in full ranking, and its sampled negatives (``uniN``) may be earlier items too. With the switch on:

- full ranking: the user's training items (validation), or training and validation items (test), get -inf before
  the top-k, the phase's own targets excepted (RecBole's general models remove the positives from the history too);
- ``uniN``: the negatives are drawn from the items outside that history and the phase's targets, as the official
  LLM-ESR code draws them.

The histories come from the whole dataset minus the evaluation targets (``training_pairs``), so they do not depend on
``MAX_ITEM_LIST_LENGTH`` or ``llm_train_mode``. Every DDP rank holds them all and masks its own shard's rows; the
group metrics read the masked scores like the overall ones.
"""
import numpy as np
import torch

from recbole_llm.evaluator.group_metrics import pair_keys, training_pairs
from recbole_llm.utils import RecBoleLLMError


class PhaseHistories:
    """Each user's items to exclude, per evaluation phase, as sorted ``user * n_items + item`` keys."""

    def __init__(self, n_users, n_items, training, valid_targets, test_targets):
        self.n_users, self.n_items = n_users, n_items
        earlier = {"valid": training, "test": torch.cat([training, valid_targets])}
        targets = {"valid": valid_targets, "test": test_targets}
        # torch.unique sorts, which the per-user look-ups rely on.
        self.excluded = {phase: torch.unique(keys[~torch.isin(keys, targets[phase])]) for phase, keys in earlier.items()}
        self.used = {phase: torch.unique(torch.cat([earlier[phase], targets[phase]])) for phase in earlier}

    @classmethod
    def from_split(cls, dataset, valid_dataset, test_dataset):
        pairs, counts = training_pairs(dataset, [valid_dataset, test_dataset])
        return cls(dataset.user_num, dataset.item_num, pairs[counts > 0], pair_keys(valid_dataset),
                   pair_keys(test_dataset))

    def excluded_rows_and_items(self, users, phase):
        """``(rows, items)``: the positions in a ``[len(users), n_items]`` score matrix to set to -inf."""
        keys = self.excluded[phase].to(users.device)
        start = torch.searchsorted(keys, users * self.n_items)
        end = torch.searchsorted(keys, (users + 1) * self.n_items)
        counts = end - start
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)
        offsets = torch.arange(int(counts.sum()), device=users.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        return rows, keys[torch.repeat_interleave(start, counts) + offsets] % self.n_items

    def mask(self, scores, users, phase):
        rows, items = self.excluded_rows_and_items(users, phase)
        scores[rows, items] = -torch.inf
        return scores

    def used_ids(self, phase):
        """RecBole's sampler format: per user id, the set of items a negative must not be."""
        keys = self.used[phase].numpy()  # sorted, so each user's items are one slice
        bounds = np.searchsorted(keys // self.n_items, np.arange(self.n_users + 1))
        items = (keys % self.n_items).tolist()
        used = np.empty(self.n_users, dtype=object)
        used[:] = [set(items[start:end]) for start, end in zip(bounds[:-1], bounds[1:])]
        return used


def _exclude_from_negatives(sampler, used):
    """Make ``sampler`` draw each row's negatives outside ``used[user]`` and the row's own item. RecBole's samplers
    reject a draw that is in ``used_ids[key]``; keying by row serves its repeatable and per-user samplers alike."""

    def sample_by_user_ids(user_ids, item_ids, num):
        sampler.used_ids = np.array([used[user] | {item} for user, item in zip(user_ids, item_ids)])
        return sampler.sample_by_key_ids(np.arange(len(user_ids)), num)

    sampler.sample_by_user_ids = sample_by_user_ids


def attach_history_exclusion(trainer, dataset, valid_data, test_data):
    """Make ``trainer`` (and the two loaders' samplers, in ``uniN`` mode) exclude each user's history."""
    if valid_data is None or test_data is None:
        raise RecBoleLLMError("llm_exclude_history needs a validation and a test split (eval_args split LS: "
                              "valid_and_test); set it False for other splits.")
    histories = PhaseHistories.from_split(dataset, valid_data.dataset, test_data.dataset)
    loaders = {"valid": valid_data, "test": test_data}
    for phase, loader in loaders.items():
        sampler = getattr(loader, "_sampler", None)
        if sampler is not None:  # uniN: RecBole's sequential sampler keeps out only each row's own target
            _exclude_from_negatives(sampler, histories.used_ids(phase))
    evaluate, full_sort = trainer.evaluate, trainer._full_sort_batch_eval
    uid_field = trainer.config["USER_ID_FIELD"]

    def evaluate_phase(eval_data, *args, **kwargs):
        phases = [phase for phase, loader in loaders.items() if loader is eval_data]
        if not phases:
            raise RecBoleLLMError("llm_exclude_history knows the history of this run's valid and test loaders only; "
                                  "evaluate one of them, or set llm_exclude_history: False.")
        trainer.history_phase = phases[0]
        return evaluate(eval_data, *args, **kwargs)

    def full_sort_excluding_history(batched_data):
        interaction, scores, positive_u, positive_i = full_sort(batched_data)
        histories.mask(scores, interaction[uid_field].to(scores.device), trainer.history_phase)
        return interaction, scores, positive_u, positive_i

    trainer.evaluate, trainer._full_sort_batch_eval = evaluate_phase, full_sort_excluding_history
    trainer.histories = histories
    return trainer
