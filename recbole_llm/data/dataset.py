"""Training-sample modes of sequential models (DESIGN.md §6) and the dataset of the ``all_positions`` mode.

- ``prefix`` (RecBole's default): every prefix of every user is a training sample, with the loss at its end.
- ``all_positions``: one training sequence per user, with a target at every position; a model that supports the
  mode puts the loss at every position under a causal mask (a BERT4Rec model, bidirectional, at the masked
  positions of two cloze rows per user instead: ``model.layers.cloze_rows``). Validation and test are RecBole's in both modes.
"""
import numpy as np
import torch
from recbole.data.dataset import SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils.enum_type import FeatureSource, FeatureType

from recbole_llm.utils import RecBoleLLMError

TRAIN_MODES = ("prefix", "all_positions")


def train_modes(model_class):
    """The ``llm_train_mode`` values ``model_class`` trains with: its ``llm_train_modes``, else prefix only."""
    return getattr(model_class, "llm_train_modes", ("prefix",))


def target_list_field(config):
    """Name of the field holding the next item at every position of ``item_id_list``: ``item_id_target_list``."""
    return config["ITEM_ID_FIELD"] + "_target" + config["LIST_SUFFIX"]


def training_target_field(config):
    """The field of the targets a sequential model trains on: every position's next item (``target_list_field``)
    in ``all_positions`` mode, the single next item (``ITEM_ID_FIELD``) in ``prefix`` mode."""
    return target_list_field(config) if config["llm_train_mode"] == "all_positions" else config["ITEM_ID_FIELD"]


class AllPositionsDataset(SequentialDataset):
    """RecBole's SequentialDataset whose TRAIN split holds one row per user, for ``llm_train_mode: all_positions``.

    ``build()`` runs RecBole's own (prefix augmentation, ordering, split), so valid and test are RecBole's
    unchanged; under a leave-one-out split the augmentation makes only the rows the split keeps
    (``data_augmentation``). Of each user's training rows it keeps the last one: its ``item_id_list`` holds the (up to)
    MAX_ITEM_LIST_LENGTH items before the user's last training item ``item_id``. It adds the field
    ``item_id_target_list`` (see ``target_list_field``): at position p < ``item_length`` the item that follows
    position p (``item_id_list`` shifted left, ``item_id`` at position ``item_length - 1``), and 0 (padding)
    elsewhere. A user's row thus covers the last MAX_ITEM_LIST_LENGTH + 1 training items; earlier items of longer
    histories are not trained on, as in the official SASRec code, which keeps the last ``maxlen`` items.
    """

    @classmethod
    def adopt(cls, dataset):
        """Make an unbuilt SequentialDataset this class, in place, and return it.

        The class adds no state, only ``build()``, so the dataset that RecBole's ``create_dataset`` returns (new,
        or loaded from its ``save_dataset`` cache, which holds the same unbuilt dataset in both modes) serves as is.
        """
        if type(dataset) is not SequentialDataset:
            raise RecBoleLLMError(
                f"llm_train_mode 'all_positions' needs RecBole's SequentialDataset, got {type(dataset).__name__}; "
                f"use a sequential model that supports the mode."
            )
        dataset.__class__ = cls
        return dataset

    def data_augmentation(self):
        """RecBole's prefix augmentation, restricted to the rows that a leave-one-out split keeps.

        RecBole's makes one row per interaction, each with a MAX_ITEM_LIST_LENGTH-wide list of every interaction
        field: 1.5 GB on ml-1m-half at length 200, though this class keeps one training row per user. Under
        ``split: {LS: ...}`` only each user's last training row and its evaluation rows are used, so only those
        (and the user's first row, for the order) are made, with the same contents. Other splits keep every row:
        RecBole's augmentation runs unchanged. The interactions themselves stay in ``source_interactions`` for the
        counts that need all of them.
        """
        rows_per_user = self._rows_kept_per_user()
        if rows_per_user is None:
            return super().data_augmentation()
        self._aug_presets()
        self._check_field("uid_field", "time_field")
        self.sort(by=[self.uid_field, self.time_field], ascending=True)
        inter = self.inter_feat
        users = inter[self.uid_field]
        self.source_interactions = (users.clone(), inter[self.iid_field].clone())
        position, count = _positions_in_group(users)
        # Each user's first row is kept too: the split orders users by the time of their first row, so with it the
        # evaluation splits list their rows in RecBole's order. The training split drops it (one row per user).
        kept = (position == 1) | ((position >= 1) & (position >= count - rows_per_user))
        targets = torch.nonzero(kept).squeeze(1)
        starts = torch.maximum(targets - position[targets], targets - self.max_item_list_len)
        lengths = targets - starts
        offsets = torch.arange(self.max_item_list_len)
        sources = (starts.unsqueeze(1) + offsets).clamp(max=len(users) - 1)  # [rows, L]; past the length: masked
        past_length = offsets >= lengths.unsqueeze(1)
        lists = {self.item_list_length_field: lengths}
        for field in inter.columns:
            if field != self.uid_field:
                values = inter[field][sources]
                values[past_length] = 0
                lists[getattr(self, f"{field}_list_field")] = values
        augmented = inter[targets]
        augmented.update(Interaction(lists))
        self.inter_feat = augmented

    def _rows_kept_per_user(self):
        """How many of a user's last rows a leave-one-out split keeps: the last training row and the ones it leaves
        out (``valid_and_test``: 2, else 1); None for the other splits."""
        split = self.config["eval_args"]["split"]
        if not isinstance(split, dict) or "LS" not in split:
            return None
        return 1 + (2 if split["LS"] == "valid_and_test" else 1)

    def build(self):
        """RecBole's splits, with the train split replaced by one row per user (see the class docstring)."""
        train, *evaluation = super().build()
        return [self._one_row_per_user(train), *evaluation]

    def _one_row_per_user(self, train):
        """A copy of the train split holding each user's last row, with the target list added."""
        uids = train.inter_feat[self.uid_field].numpy()
        # The split keeps each user's rows in time order (sequential models require order TO), so the user's
        # last row is wanted: the first occurrence in the reversed array. Rows come out sorted by user id.
        _, first_in_reversed = np.unique(uids[::-1], return_index=True)
        rows = train.inter_feat[len(uids) - 1 - first_in_reversed]
        field = target_list_field(self.config)
        self.set_field_property(field, FeatureType.TOKEN_SEQ, FeatureSource.INTERACTION, self.max_item_list_len)
        rows.update(Interaction({field: self._next_items(rows)}))
        return train.copy(rows)

    def _next_items(self, rows):
        """[rows, MAX_ITEM_LIST_LENGTH]: the item after each position of ``item_id_list``, 0 past the sequence."""
        items = rows[self.iid_field + self.config["LIST_SUFFIX"]]
        lengths = rows[self.item_list_length_field]
        targets = torch.zeros_like(items)
        targets[:, :-1] = items[:, 1:]  # position p < length - 1 -> item p + 1; beyond the sequence this copies 0s
        targets[torch.arange(len(items)), lengths - 1] = rows[self.iid_field]
        return targets


def _positions_in_group(groups):
    """``(position, count)`` per entry of a sorted 1-d tensor: its index within its run of equal values, and the
    run's length."""
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    run_starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(groups)) - torch.repeat_interleave(run_starts, counts)
    return position, torch.repeat_interleave(counts, counts)
