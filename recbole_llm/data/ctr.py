"""CTR samples and prompts of ReLLa and RecLoRA (Lin et al., WWW 2024; Zhu et al., arXiv 2408.03533), on RecBole.

``CTRDataset`` is RecBole's ``SequentialDataset`` with ReLLa's sample construction instead of RecBole's prefix
augmentation (select it with ``llm_dataset: CTRDataset``; DIN, the CRM, and RecLoRA both read it):

- one global stable order of all interactions by (timestamp, raw user token, raw item token), taken on the exact
  timestamps before RecBole turns them into float32 (ReLLa sorts the ids as strings, and so does this);
- a sample per interaction whose user has at least ``reclora_min_history`` earlier interactions in that order;
- ``LABEL_FIELD`` = rating > ``reclora_label_threshold`` (ReLLa: > 3); the rating field stays for the prompts;
- ``item_id_list`` / ``rating_list`` / ``item_length``: the last ``reclora_crm_hist_len`` earlier interactions
  (the CRM's history; RecBole's ``MAX_ITEM_LIST_LENGTH`` is set to it), and ``history_length``: the number of all
  earlier interactions, which with ``CTRDataset.history`` gives the full history the LLM's items are chosen from;
- a global split in that order with ReLLa's counts: train int(0.8 N), valid int(0.1 N), test the rest (RecBole
  would give valid and test int(0.1 N) each); ``reclora_valid_samples`` / ``reclora_test_samples`` keep the
  first rows of valid / test (ReLLa and RecLoRA evaluate on the first 30,000 test rows).

``CTRPrompts`` renders ReLLa's ml-1m prompt of a batch byte for byte (``render_prompt``), with the K most recent
items or the K items of the history most similar to the target (the long-short retriever), in history order.
"""
from dataclasses import dataclass

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils.enum_type import FeatureSource, FeatureType

from recbole_llm.utils import RecBoleLLMError

# ml-1m's code tables as ReLLa words them (users.dat age and occupation codes, README of MovieLens-1M).
AGE_NAMES = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55",
             "56": "above 56"}
JOB_NAMES = {
    "0": "other or not specified", "1": "academic/educator", "2": "artist", "3": "clerical/admin",
    "4": "college/grad student", "5": "customer service", "6": "doctor/health care", "7": "executive/managerial",
    "8": "farmer", "9": "homemaker", "10": "K-12 student", "11": "lawyer", "12": "programmer", "13": "retired",
    "14": "sales/marketing", "15": "scientist", "16": "self-employed", "17": "technician/engineer",
    "18": "tradesman/craftsman", "19": "unemployed", "20": "writer",
}
GENDER_NAMES = {"M": "male", "F": "female"}
ANSWERS = {1: "Yes.", 0: "No."}  # ReLLa's outputs for label 1 and 0
HISTORY_MODES = ("recent", "retrieved")
# The note line differs between ReLLa's "simple" (recent) and "sequential" (retrieved) templates.
NOTES = {
    "recent": "Note that more stars the user rated the movie, the user liked the movie more.",
    "retrieved": "Note that more stars the user rated the movie, the more the user liked the movie.",
}
ITEM_FIELDS = ("movie_title", "release_year")
USER_FIELDS = ("gender", "age", "occupation")


def render_prompt(gender, job, age, history, target, mode="recent"):
    """ReLLa's ml-1m prompt. ``history``: ``[(title with year, stars)]`` oldest first; ``target``: its title."""
    nominative, possessive = ("she", "Her") if gender == "female" else ("he", "His")
    rated = [f"{i}. {title} ({stars} {'stars' if stars > 1 else 'star'})" for i, (title, stars) in enumerate(history)]
    return (f"The user is a {gender}. {possessive} job is {job}. {possessive} age is {age}.\n"
            f"{nominative.capitalize()} watched the following movies in order in the past, and rated them:\n"
            f"{rated}\n"
            f"Based on the movies {nominative} has watched, deduce if {nominative} will like the movie ***{target}***.\n"
            f"{NOTES[mode]}\n"
            f"You should ONLY tell me yes or no.")


def rella_split_counts(total, ratios):
    """Rows per part as ReLLa splits: every part but the last gets int(ratio * total), the last the rest."""
    counts = [int(ratio * total) for ratio in ratios[:-1]]
    return counts + [total - sum(counts)]


@dataclass
class History:
    """Every user's interactions in the global order: ``items[start[u]:start[u + 1]]`` (internal ids) and
    ``ratings`` alike; a sample's history is the first ``history_length`` of its user's."""

    items: np.ndarray
    ratings: np.ndarray
    start: np.ndarray

    def of(self, user, length):
        begin = self.start[user]
        return self.items[begin:begin + length], self.ratings[begin:begin + length]


class CTRDataset(SequentialDataset):
    """RecBole's SequentialDataset with ReLLa's CTR samples and split (see the module docstring)."""

    HISTORY_LENGTH = "history_length"

    def __init__(self, config):
        if config["benchmark_filename"]:
            raise RecBoleLLMError("CTRDataset builds its own split; remove benchmark_filename from the config.")
        config["MAX_ITEM_LIST_LENGTH"] = config["reclora_crm_hist_len"]
        self.history = None
        super().__init__(config)

    def _change_feat_format(self):
        self._rella_order_and_label()
        super()._change_feat_format()  # to Interactions, then data_augmentation (ours)

    def _rella_order_and_label(self):
        """Sort the raw frame in ReLLa's global order and set the label, while timestamps are still exact."""
        frame, rating = self.inter_feat, self.config["RATING_FIELD"]
        for field in (self.time_field, rating):
            if field not in frame:
                raise RecBoleLLMError(f"CTRDataset needs the field '{field}' of the .inter file; add it to "
                                      f"load_col's inter list.")
        users = self.field2id_token[self.uid_field][frame[self.uid_field].to_numpy()]
        items = self.field2id_token[self.iid_field][frame[self.iid_field].to_numpy()]
        order = np.lexsort((items, users, frame[self.time_field].to_numpy(dtype=np.float64)))
        frame = frame.iloc[order].reset_index(drop=True)
        frame[self.label_field] = (frame[rating] > self.config["reclora_label_threshold"]).astype(np.float64)
        self.set_field_property(self.label_field, FeatureType.FLOAT, FeatureSource.INTERACTION, 1)
        self.inter_feat = frame

    def data_augmentation(self):
        """One sample per interaction with at least ``reclora_min_history`` earlier ones, in the global order."""
        inter, length = self.inter_feat, self.config["reclora_crm_hist_len"]
        users = inter[self.uid_field].numpy()
        by_user = np.argsort(users, kind="stable")  # the global order kept within each user
        counts = np.bincount(users, minlength=self.user_num)
        start = np.r_[0, np.cumsum(counts)]
        position = np.empty(len(users), dtype=np.int64)
        position[by_user] = np.arange(len(users)) - start[users[by_user]]
        self.history = History(inter[self.iid_field].numpy()[by_user],
                               inter[self.config["RATING_FIELD"]].numpy()[by_user], start)
        kept = np.flatnonzero(position >= self.config["reclora_min_history"])
        self.inter_feat = inter[torch.from_numpy(kept)]
        self.inter_feat.update(Interaction(self._history_fields(users[kept], position[kept], length)))

    def _history_fields(self, users, position, length):
        """The last ``length`` earlier interactions of each sample, oldest first, padded with zeros at the end."""
        list_suffix, rating = self.config["LIST_SUFFIX"], self.config["RATING_FIELD"]
        fields = {self.iid_field + list_suffix: (FeatureType.TOKEN_SEQ, self.history.items),
                  rating + list_suffix: (FeatureType.FLOAT_SEQ, self.history.ratings)}
        kept = np.minimum(position, length)
        offsets = (self.history.start[users] + position - kept)[:, None] + np.arange(length)
        valid = np.arange(length) < kept[:, None]
        offsets = np.where(valid, offsets, 0)
        columns = {}
        for name, (ftype, values) in fields.items():
            self.set_field_property(name, ftype, FeatureSource.INTERACTION, length)
            columns[name] = torch.from_numpy(np.where(valid, values[offsets], 0))
        for name, value in ((self.item_list_length_field, kept), (self.HISTORY_LENGTH, position)):
            self.set_field_property(name, FeatureType.TOKEN, FeatureSource.INTERACTION, 1)
            columns[name] = torch.from_numpy(value)
        return columns

    def _calcu_split_ids(self, tot, ratios):
        return list(np.cumsum(rella_split_counts(tot, ratios))[:-1])

    def build(self):
        """RecBole's build (global time order, ``RS`` split), then the first rows of valid and test if asked."""
        splits = super().build()
        if len(splits) != 3:
            raise RecBoleLLMError("CTRDataset needs eval_args split {RS: [0.8, 0.1, 0.1]} (train, valid, test).")
        train, valid, test = splits
        return [train, self._first_rows(valid, "reclora_valid_samples"), self._first_rows(test, "reclora_test_samples")]

    @staticmethod
    def _first_rows(split, key):
        n = split.config[key]
        return split if n is None or n >= len(split) else split.copy(split.inter_feat[:n])


class CTRPrompts:
    """Renders the ReLLa prompt of each sample of a batch from its dataset (a built ``CTRDataset`` split).

    ``reclora_history: recent`` lists the user's ``reclora_llm_hist_len`` most recent items; ``retrieved`` ranks the
    whole history by cosine similarity to the target in the PCA-reduced item text space (``reclora_pca_dim``) and
    lists the top K in history order (ReLLa's "sequential" template).
    """

    def __init__(self, dataset, config):
        if not isinstance(dataset, CTRDataset):
            raise RecBoleLLMError(f"RecLoRA needs the CTR samples; set llm_dataset: CTRDataset (got "
                                  f"{type(dataset).__name__}).")
        self.mode, self.k = config["reclora_history"], config["reclora_llm_hist_len"]
        if self.mode not in HISTORY_MODES:
            raise RecBoleLLMError(f"config key 'reclora_history' must be one of {', '.join(HISTORY_MODES)}, "
                                  f"got {self.mode!r}.")
        self.history = dataset.history
        self.uid, self.iid = dataset.uid_field, dataset.iid_field
        self.titles = _item_titles(dataset)
        self.profiles = _user_profiles(dataset)
        self.vectors = _retrieval_vectors(dataset, config) if self.mode == "retrieved" else None

    def render(self, interaction):
        users = interaction[self.uid].cpu().numpy()
        targets = interaction[self.iid].cpu().numpy()
        lengths = interaction[CTRDataset.HISTORY_LENGTH].cpu().numpy()
        return [self.render_one(u, t, n) for u, t, n in zip(users, targets, lengths)]

    def render_one(self, user, target, length):
        items, ratings = self.history.of(user, length)
        chosen = self._choose(items, target)
        history = [(self.titles[item], int(rating)) for item, rating in zip(items[chosen], ratings[chosen])]
        return render_prompt(*self.profiles[user], history, self.titles[target], self.mode)

    def _choose(self, items, target):
        """Positions of the history items shown to the LLM, in history order."""
        if self.mode == "recent":
            return np.arange(max(0, len(items) - self.k), len(items))
        similarity = self.vectors[items] @ self.vectors[target]
        return np.sort(np.argsort(-similarity, kind="stable")[:self.k])


def _check_fields(dataset, fields, where):
    missing = [field for field in fields if field not in dataset.field2type]
    if missing:
        raise RecBoleLLMError(f"the RecLoRA prompt needs the {where} fields {', '.join(missing)} (ml-1m's atomic "
                              f"files); add them to load_col's {where} list.")


def _item_titles(dataset):
    """``"Title (Year)"`` per internal item id, from the ``.item`` fields movie_title and release_year."""
    _check_fields(dataset, ITEM_FIELDS, "item")
    feat = dataset.item_feat
    words = dataset.field2id_token["movie_title"]
    years = dataset.field2id_token["release_year"][feat["release_year"].numpy()]
    titles = [" ".join(words[row[row > 0]]) for row in feat["movie_title"].numpy()]
    return [f"{title} ({year})" for title, year in zip(titles, years)]


def _user_profiles(dataset):
    """``(gender, job, age)`` words per internal user id from ml-1m's codes; [PAD] gets Nones."""
    _check_fields(dataset, USER_FIELDS, "user")
    feat = dataset.user_feat
    raw = {field: dataset.field2id_token[field][feat[field].numpy()] for field in USER_FIELDS}
    tables = {"gender": GENDER_NAMES, "occupation": JOB_NAMES, "age": AGE_NAMES}
    profiles = [(None, None, None)]
    for user in range(1, len(feat)):
        words = []
        for field in ("gender", "occupation", "age"):
            code = raw[field][user]
            if code not in tables[field]:
                raise RecBoleLLMError(f"user '{dataset.field2id_token[dataset.uid_field][user]}' has {field} "
                                      f"'{code}', which is not an ml-1m code ({', '.join(tables[field])}).")
            words.append(tables[field][code])
        profiles.append(tuple(words))
    return profiles


def _retrieval_vectors(dataset, config):
    """Item text vectors reduced to ``reclora_pca_dim`` components, by internal id. Vectors no wider than that
    (``~``: any width) are used as they are: the official 512 reduces a 7B model's 4096-d vectors, and MiniLM's
    384-d ones, the default encoder's, have nothing to reduce."""
    from recbole_llm.text import item_vectors, pca_item_vectors  # loads transformers; only retrieval needs it

    vectors = item_vectors(dataset, config)
    dim = config["reclora_pca_dim"]
    if dim is not None and dim < vectors.shape[1]:
        if dim > vectors.shape[0]:
            raise RecBoleLLMError(f"reclora_pca_dim {dim} is larger than the {vectors.shape[0]} items, the most "
                                  f"principal components their vectors have; lower it or set it to ~.")
        vectors = pca_item_vectors(dataset, config, dim)
    return torch.nn.functional.normalize(vectors, dim=1).numpy()
