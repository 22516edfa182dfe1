"""Item and user texts (DESIGN.md §4): ``.item`` fields through a template, cleaned and capped.

Templates (``llm_text_template``):

- ``movielens`` (ml-100k, ml-1m, ml-1m-half): item ``The American President (1995). Genres: Comedy, Drama,
  Romance.``; in a user's history an item reads ``The American President (1995)``. MovieLens files a title's article
  at its end (``American President, The``); it is moved back to the front. Genres come from ``genre`` (ml-1m) or
  ``class`` (ml-100k).
- ``generic`` (any dataset): item ``<field>: <value>; ...`` over every ``token`` and ``token_seq`` field of the
  ``.item`` file except the item id; in a history an item reads as its first ``token_seq`` field (its title, as a
  rule), else as its whole text.
- ``auto``: ``movielens`` when the ``.item`` file has a ``movie_title`` field, else ``generic``.

A user's text lists the items of its history, oldest first: ``A user watched these movies, oldest first: A (1995);
B (1996).``
"""
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from recbole_llm.utils import RecBoleLLMError

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
# "Usual Suspects, The" and "Confessional, The (Le Confessionnal)": the article moves to the front.
_FILED_ARTICLE = re.compile(r"^(?P<rest>.+?), (?P<article>The|A|An)(?=\s*(\(|$))")
_TEXT_TYPES = ("token", "token_seq")


def clean_text(text, max_chars=None):
    """``text`` with HTML entities decoded, tags removed, whitespace collapsed, cut to ``max_chars`` at a word end."""
    text = _SPACE.sub(" ", _TAG.sub(" ", html.unescape(text))).strip()
    if max_chars is not None and len(text) > max_chars:
        cut = text[:max_chars]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return text


def _movie_name(row, fields):
    title = _FILED_ARTICLE.sub(r"\g<article> \g<rest>", row["movie_title"])
    year = row.get("release_year", "")
    return f"{title} ({year})" if year else title


def _movie_text(row, fields):
    genres = (row.get("genre") or row.get("class") or "").split()
    return _movie_name(row, fields) + (f". Genres: {', '.join(genres)}." if genres else ".")


def _generic_text(row, fields):
    return "; ".join(f"{field.replace('_', ' ')}: {row[field]}" for field in fields if row[field])


def _generic_name(row, fields):
    titles = [row[field] for field, ftype in fields.items() if ftype == "token_seq" and row[field]]
    return titles[0] if titles else _generic_text(row, fields)


@dataclass(frozen=True)
class Template:
    """How a dataset's items read as text (``item``), how one reads in a user's history (``name``), and the
    words that open a user's text. ``item`` and ``name`` take a ``.item`` row (field -> cleaned string) and the
    text fields (field -> RecBole type)."""

    name: str
    item: Callable[[dict, dict], str]
    history_name: Callable[[dict, dict], str]
    user_intro: str

    def user(self, names):
        """A user's text from the names of its history items, oldest first."""
        return f"{self.user_intro}{'; '.join(names)}."


TEMPLATES = {
    "movielens": Template("movielens", _movie_text, _movie_name, "A user watched these movies, oldest first: "),
    "generic": Template("generic", _generic_text, _generic_name, "A user interacted with these items, oldest first: "),
}


@dataclass(frozen=True)
class ItemTexts:
    """The texts of every item of a ``.item`` file: raw item token -> text, and -> its name in a history.
    Items whose text fields are all empty are absent."""

    path: Path
    template: str
    texts: dict
    names: dict


def item_file(config):
    """The dataset's ``.item`` file, which holds the items' text fields."""
    path = Path(config["data_path"]) / f"{config['dataset']}.item"
    if not path.is_file():
        raise RecBoleLLMError(f"{path} does not exist: LLM side data reads the items' text from it; add that "
                              f"file (item_id:token plus text fields such as title:token_seq).")
    return path


def read_item_file(config):
    """``(path, frame, types)``: the ``.item`` file as strings (empty, never NaN, for a missing value), its columns
    renamed to the bare field names, and field -> RecBole type. The item id column must be there."""
    path = item_file(config)
    frame = pd.read_csv(path, sep=config["field_separator"], dtype=str, keep_default_na=False,
                        encoding=config["encoding"] or "utf-8", engine="python")
    types = dict(column.split(":", 1) for column in frame.columns)
    frame.columns = list(types)
    id_field = config["ITEM_ID_FIELD"]
    if id_field not in types:
        raise RecBoleLLMError(f"{path} has no '{id_field}' column (ITEM_ID_FIELD); its header is "
                              f"{' '.join(f'{k}:{v}' for k, v in types.items())}. Fix the header or ITEM_ID_FIELD.")
    return path, frame, types


def read_item_texts(config):
    """Every item's text from the ``.item`` file, through the template that ``llm_text_template`` picks."""
    path, frame, types = read_item_file(config)
    id_field = config["ITEM_ID_FIELD"]
    fields = {field: ftype for field, ftype in types.items() if ftype in _TEXT_TYPES and field != id_field}
    template = _pick_template(config["llm_text_template"], fields, path)
    texts, names = {}, {}
    for row in frame.to_dict("records"):
        cleaned = {field: clean_text(row[field]) for field in fields}
        text = clean_text(template.item(cleaned, fields), config["llm_text_max_chars"]) if any(cleaned.values()) else ""
        if text:
            texts[row[id_field]] = text
            names[row[id_field]] = clean_text(template.history_name(cleaned, fields), config["llm_text_max_chars"])
    return ItemTexts(path, template.name, texts, names)


def _pick_template(name, fields, path):
    if name == "auto":
        name = "movielens" if "movie_title" in fields else "generic"
    if name not in TEMPLATES:
        raise RecBoleLLMError(f"llm_text_template '{name}' is unknown; use auto, {', '.join(TEMPLATES)}.")
    if name == "movielens" and "movie_title" not in fields:
        raise RecBoleLLMError(f"llm_text_template 'movielens' needs a movie_title field, which {path} lacks; "
                              f"use llm_text_template: generic.")
    return TEMPLATES[name]


def user_texts(histories, names, template, tokenizer, max_tokens):
    """``{user: text}``: each history (raw item tokens, oldest first) written with as many of its MOST RECENT items
    as fit in ``max_tokens`` tokens of the encoder's own ``tokenizer`` (special tokens included).

    ``names`` maps an item to its name in a history; items without one (no text) are left out. A user whose latest
    item alone is too long keeps that item, and the encoder cuts the text.
    """
    template = TEMPLATES[template]
    unique = sorted(set(names.values()))
    counts = tokenizer([f"{name};" for name in unique], add_special_tokens=False)["input_ids"] if unique else []
    cost = dict(zip(unique, map(len, counts)))
    # The empty text already counts the closing "." that replaces the last name's ";".
    budget = max_tokens - len(tokenizer(template.user([]))["input_ids"]) + 1
    kept = {user: _most_recent_fitting([names[i] for i in items if i in names], cost, budget)
            for user, items in histories.items()}
    texts = {user: template.user(kept_names) for user, kept_names in kept.items()}
    # The estimate adds up separately tokenised names; the joined text can come out a few tokens longer.
    pending = list(texts)
    while pending:
        lengths = map(len, tokenizer([texts[user] for user in pending])["input_ids"])
        pending = [user for user, n in zip(pending, lengths) if n > max_tokens and len(kept[user]) > 1]
        for user in pending:
            kept[user] = kept[user][1:]
            texts[user] = template.user(kept[user])
    return texts


def _most_recent_fitting(history, cost, budget):
    """The longest tail of ``history`` whose names cost at most ``budget`` tokens; at least its latest item."""
    start = len(history)
    while start > 0 and cost[history[start - 1]] <= budget:
        start -= 1
        budget -= cost[history[start]]
    return history[min(start, len(history) - 1):]
