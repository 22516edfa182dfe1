"""LLM side data for models: item and user text vectors, PCA item vectors and similar users (DESIGN.md §4).

Each function takes a RecBole dataset and its Config, builds whatever the cache (cache.py) lacks on first use, and
returns a tensor indexed by RecBole's INTERNAL ids (``dataset.field2id_token``) whose row 0 ([PAD]) is zeros::

    item_vectors(dataset, config)            FloatTensor [n_items, d]
    user_vectors(dataset, config)            FloatTensor [n_users, d]
    pca_item_vectors(dataset, config, dim)   FloatTensor [n_items, dim]
    similar_users(dataset, config, k)        LongTensor  [n_users, k], internal user ids, most similar first

A user's text is built from the TRAINING part of its history only (``training_histories``). The dataset may be
passed before or after ``build()`` (a model gets its train split): a built dataset no longer holds the whole
histories, so they are then read again from the atomic files with the same config.
"""
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from recbole.data.dataset import Dataset

from recbole_llm.text.cache import FORMAT_VERSION, CacheEntry, cache_folder, file_sha256, texts_sha256
from recbole_llm.text.encoders import TextEncoder
from recbole_llm.text.templates import read_item_texts, user_texts
from recbole_llm.utils import RecBoleLLMError, recbole_time_order

# Interactions that RecBole's leave-one-out split holds out of each user's history, per `eval_args.split.LS`.
HELD_OUT = {"valid_and_test": 2, "valid_only": 1, "test_only": 1}
MISSING_TEXT = ("error", "zeros")
SIMILARITY_BLOCK_ROWS = 512  # similar users: rows scored at a time, so memory is O(n_users * block), not O(n^2)


@dataclass(frozen=True)
class Cached:
    """A cache entry in memory: rows by raw token, the key they were built for, and whether this call built them."""

    matrix: np.ndarray
    tokens: list
    key: dict
    entry: CacheEntry
    built: bool


class SideData:
    """The configured dataset's side data; each method returns the ``Cached`` entry, building it when missing."""

    def __init__(self, config):
        if config["llm_missing_text"] not in MISSING_TEXT:
            raise RecBoleLLMError(f"llm_missing_text '{config['llm_missing_text']}' is unknown; use error or zeros.")
        self.config = config
        self.encoder = TextEncoder(config)
        self.folder = cache_folder(config, self.encoder)
        self.item_texts = read_item_texts(config)

    def _get(self, name, key, build):
        entry = CacheEntry(self.folder, name)
        matrix, tokens, built = entry.get(key, build)
        return Cached(matrix, tokens, key, entry, built)

    def _text_key(self, kind, files, texts):
        return {"kind": kind, **self.encoder.identity(), "template": self.item_texts.template,
                "max_chars": self.config["llm_text_max_chars"], "files": {f.name: file_sha256(f) for f in files},
                "text_sha256": texts_sha256(texts), "version": FORMAT_VERSION}

    def _encoded(self, name, texts, files):
        tokens = list(texts)
        return self._get(name, self._text_key(name, files, texts),
                         lambda: (self.encoder.encode([texts[t] for t in tokens], name), tokens))

    def items(self):
        """Vectors of every item that has text in the ``.item`` file (not only the dataset's: filtering never
        invalidates them)."""
        return self._encoded("items", self.item_texts.texts, [self.item_texts.path])

    def users(self, dataset):
        """Vectors of the dataset's users, from the texts of their training histories."""
        texts = user_texts(training_histories(dataset, self.config), self.item_texts.names, self.item_texts.template,
                           self.encoder.tokenizer, self.encoder.max_tokens)
        inter = Path(self.config["data_path"]) / f"{self.config['dataset']}.inter"
        return self._encoded("users", texts, [inter, self.item_texts.path])

    def pca(self, dim):
        """The item vectors reduced to ``dim`` principal components."""
        items = self.items()
        d, n = items.matrix.shape[1], len(items.matrix)
        if dim > min(d, n):
            raise RecBoleLLMError(
                f"PCA to {dim} dimensions needs {dim}-d vectors of at least {dim} items, but llm_encoder gives {d}-d "
                f"vectors of {n} items ({items.entry.matrix_file}); lower hidden_size to at most {min(d, n)} or use "
                f"a larger encoder.")
        key = {"kind": f"items_pca{dim}", "source": items.key, "version": FORMAT_VERSION}
        return self._get(f"items_pca{dim}", key, lambda: (pca(items.matrix, dim), items.tokens))

    def similar(self, dataset):
        """Row positions (in the users' token list) of each user's ``llm_similar_users`` most similar users."""
        users = self.users(dataset)
        k = min(self.config["llm_similar_users"], len(users.tokens) - 1)
        key = {"kind": "users_similar", "source": users.key, "k": k, "version": FORMAT_VERSION}
        return self._get("users_similar", key, lambda: (top_similar(users.matrix, k), users.tokens))


def item_vectors(dataset, config):
    """``[n_items, d]`` text vectors of the dataset's items by internal id; row 0 zeros, and so are items without
    text when ``llm_missing_text: zeros``."""
    side = SideData(config)
    missing = _items_without_text(dataset, side)
    items = side.items()
    _check_dim(items, config)
    return torch.from_numpy(_to_internal(items, _id_tokens(dataset, "item"), config, "item", missing))


def pca_item_vectors(dataset, config, dim):
    """``[n_items, dim]``: the item vectors' first ``dim`` principal components (LLM-ESR initialises its ID
    embedding with them, ``dim = hidden_size``)."""
    side = SideData(config)
    missing = _items_without_text(dataset, side)
    return torch.from_numpy(_to_internal(side.pca(dim), _id_tokens(dataset, "item"), config, "item", missing))


def user_vectors(dataset, config):
    """``[n_users, d]`` vectors of the users' training-history texts by internal id; row 0 zeros."""
    users = SideData(config).users(dataset)
    _check_dim(users, config)
    return torch.from_numpy(_to_internal(users, _id_tokens(dataset, "user"), config, "user"))


def similar_users(dataset, config, k=None):
    """``[n_users, k]`` internal ids of each user's ``k`` most similar other users (cosine of user vectors), most
    similar first; row 0 ([PAD]) zeros. ``k`` is at most ``llm_similar_users``, the number cached (None: all of
    them)."""
    similar = SideData(config).similar(dataset)
    kept = similar.matrix.shape[1]
    k = kept if k is None else k
    if k > kept:
        raise RecBoleLLMError(f"{k} similar users were asked for, but the cache keeps {kept} per user "
                              f"({similar.entry.matrix_file}); raise llm_similar_users (at most users - 1) or ask "
                              f"for fewer.")
    id_tokens = _id_tokens(dataset, "user")
    internal_of_row = _internal_ids(similar.tokens, id_tokens, similar.entry, config, "user")
    neighbours = replace(similar, matrix=internal_of_row[similar.matrix[:, :k]])
    return torch.from_numpy(_to_internal(neighbours, id_tokens, config, "user"))


def training_histories(dataset, config):
    """``{raw user token: [raw item tokens, oldest first]}``: each user's interactions without those that RecBole's
    leave-one-out split holds out, i.e. the last 2 (``LS: valid_and_test``) or the last 1 (``valid_only``,
    ``test_only``) in time order, ties kept in file order as RecBole's stable sort keeps them.

    A user keeps at least one interaction. For a sequential dataset, whose split holds out one item fewer of a
    user with 2 or 3 interactions, those users' texts therefore lack an item that is training data: never the
    reverse.
    """
    held_out = _held_out_count(config)
    dataset = _unbuilt(dataset, config)
    user_tokens, item_tokens = _id_tokens(dataset, "user"), _id_tokens(dataset, "item")
    return {user_tokens[user]: item_tokens[items[:len(items) - min(held_out, len(items) - 1)]].tolist()
            for user, items in _time_ordered(dataset).items()}


def time_ordered_histories(dataset, config):
    """``{internal user id: internal item ids (int64 array), oldest first}``: each user's whole history in RecBole's
    time order (a stable sort of its float32 timestamps, ties in file order), users by internal id."""
    return _time_ordered(_unbuilt(dataset, config))


def _time_ordered(dataset):
    frame = dataset.inter_feat
    users, items = frame[dataset.uid_field].to_numpy(), frame[dataset.iid_field].to_numpy()
    order = recbole_time_order(frame[dataset.time_field].to_numpy())
    order = order[np.argsort(users[order], kind="stable")]
    users, items = users[order], items[order].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    return dict(zip(users[starts].tolist(), np.split(items, starts[1:])))


def _held_out_count(config):
    split, order = config["eval_args"]["split"], config["eval_args"]["order"]
    mode = split.get("LS") if isinstance(split, dict) else None
    if mode not in HELD_OUT or order != "TO" or config["benchmark_filename"]:
        raise RecBoleLLMError(
            f"user texts need RecBole's leave-one-out split in time order (eval_args: {{split: {{LS: valid_and_test}}, "
            f"order: TO}}, no benchmark_filename), so that the held-out items are known; got split {split}, "
            f"order {order}. Use that split for models with user side data.")
    return HELD_OUT[mode]


def _unbuilt(dataset, config):
    """``dataset`` while it still holds every interaction (before ``build()``), else the same data loaded afresh."""
    if not isinstance(dataset.inter_feat, pd.DataFrame):
        # Built: its interactions are one split, and a sequential dataset's are augmented.
        dataset = Dataset(config)
    if config["TIME_FIELD"] not in dataset.inter_feat:
        raise RecBoleLLMError(f"user texts need the time field '{config['TIME_FIELD']}' of the .inter file; add it "
                              f"to load_col's inter list (the leave-one-out split orders by it).")
    return dataset


def _id_tokens(dataset, what):
    return dataset.field2id_token[dataset.uid_field if what == "user" else dataset.iid_field]


def _items_without_text(dataset, side):
    """The dataset's items that have no text: an error unless ``llm_missing_text: zeros``."""
    missing = [token for token in _id_tokens(dataset, "item")[1:] if token not in side.item_texts.texts]
    if missing and side.config["llm_missing_text"] == "error":
        raise RecBoleLLMError(
            f"{len(missing)} item(s) of the dataset have no text in {side.item_texts.path} (no row there, or every "
            f"text field empty), e.g. item '{missing[0]}'. Add their text to that file, or set llm_missing_text: "
            f"zeros to give them zero vectors.")
    return set(missing)


def _check_dim(cached, config):
    expected, dim = config["llm_dim"], cached.matrix.shape[1]
    if expected is not None and expected != dim:
        raise RecBoleLLMError(
            f"llm_encoder gives {dim}-d vectors ({cached.entry.matrix_file}), but the model's config has llm_dim: "
            f"{expected}; set llm_dim to {dim} (or ~), or set llm_encoder to the {expected}-d encoder the model was "
            f"configured for.")


def _stale_cache_error(entry, config, what, lost):
    return RecBoleLLMError(
        f"the cache {entry.tokens_file} has no row for {len(lost)} {what}(s) of the dataset (e.g. '{lost[0]}'): it "
        f"no longer matches the dataset after filtering. Delete {entry.folder} (it is rebuilt on next use) or "
        f"rebuild it: python -m recbole_llm.text build --dataset {config['dataset']} with this config.")


def _internal_ids(tokens, id_tokens, entry, config, what):
    """Internal id of each raw token of a cache entry; all must be in the dataset."""
    internal = {token: i for i, token in enumerate(id_tokens)}
    lost = [token for token in tokens if token not in internal]
    if lost:
        raise _stale_cache_error(entry, config, what, lost)
    return np.array([internal[token] for token in tokens], dtype=np.int64)


def _to_internal(cached, id_tokens, config, what, allowed_missing=frozenset()):
    """The cached rows (by raw token) put at the dataset's internal ids; row 0 and ``allowed_missing`` zeros."""
    row_of = {token: row for row, token in enumerate(cached.tokens)}
    rows = np.array([row_of.get(token, -1) for token in id_tokens[1:]], dtype=np.int64)
    lost = [token for token, row in zip(id_tokens[1:], rows) if row < 0 and token not in allowed_missing]
    if lost:
        raise _stale_cache_error(cached.entry, config, what, lost)
    out = np.zeros((len(id_tokens),) + cached.matrix.shape[1:], dtype=cached.matrix.dtype)
    present = np.flatnonzero(rows >= 0)
    out[present + 1] = cached.matrix[rows[present]]
    return out


def pca(vectors, dim):
    """``vectors`` centred and projected on their first ``dim`` principal axes (SVD), float32. Each axis's sign
    makes its largest loading positive, so the result does not depend on the SVD routine's sign choice."""
    centred = vectors.astype(np.float64) - vectors.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    axes = axes[:dim]
    axes *= np.sign(axes[np.arange(dim), np.abs(axes).argmax(axis=1)])[:, None]
    return (centred @ axes.T).astype(np.float32)


def top_similar(vectors, k, block_rows=SIMILARITY_BLOCK_ROWS):
    """``[n, k]`` int32: for each row, the rows of the ``k`` highest cosine similarities, the row itself excluded,
    most similar first. Scored ``block_rows`` rows at a time: memory O(n * block_rows)."""
    unit = torch.nn.functional.normalize(torch.from_numpy(np.asarray(vectors, dtype=np.float32)), dim=1)
    out = torch.empty((len(unit), k), dtype=torch.int32)
    for start in range(0, len(unit), block_rows):
        scores = unit[start:start + block_rows] @ unit.T
        scores[torch.arange(len(scores)), torch.arange(start, start + len(scores))] = -torch.inf
        out[start:start + len(scores)] = scores.topk(k, dim=1).indices
    return out.numpy()
