"""LLM side data (recbole_llm.text): templates, training-only user texts, encoders, the cache, PCA, similar users.

Most tests encode with tiny randomly initialised BERT / Llama models saved into a temporary folder (with the MiniLM
tokenizer), so they run offline in seconds; the real all-MiniLM-L6-v2 encodes only a handful of sentences.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from conftest import run_python, save_tiny_encoder, tiny_config, write_tiny_dataset, write_yaml
from recbole_llm.config import Config
from recbole_llm.text import SideData, item_vectors, pca_item_vectors, similar_users, training_histories, user_vectors
from recbole_llm.text import __main__ as text_cli
from recbole_llm.text import cache as cache_module
from recbole_llm.text.encoders import TextEncoder
from recbole_llm.text.side_data import pca, top_similar
from recbole_llm.text.templates import TEMPLATES, clean_text, read_item_texts, user_texts
from recbole_llm.utils import RecBoleLLMError, create_dataset


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return save_tiny_encoder(LlamaModel(config), tmp_path_factory.mktemp("tiny-llama"))


def text_config(tmp_path, encoder, **overrides):
    """A SASRec Config (leave-one-out, time order) of the tiny ml-100k cut, encoding with ``encoder``."""
    values = tiny_config(tmp_path, train_neg_sample_args=None, llm_encoder=str(encoder) if encoder else None,
                         hidden_size=8, llm_similar_users=10, llm_encode_batch_size=512)
    values.update(overrides)
    return Config(model="SASRec", config_dict=values)


@pytest.fixture
def tiny_text(tmp_path, tiny_bert):
    """(config, dataset before build) of the tiny dataset, encoded with the tiny BERT."""
    write_tiny_dataset(tmp_path / "data")
    config = text_config(tmp_path, tiny_bert)
    return config, create_dataset(config)


def item_file_config(tmp_path, header, rows, template="auto"):
    """A minimal config of a dataset 'items' whose .item file has ``header`` and ``rows``."""
    folder = tmp_path / "items"
    folder.mkdir(exist_ok=True)
    (folder / "items.item").write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n",
                                       encoding="utf-8")
    return {"data_path": str(folder), "dataset": "items", "field_separator": "\t", "encoding": None,
            "ITEM_ID_FIELD": "item_id", "llm_text_template": template, "llm_text_max_chars": 2000}


# ---- texts ----

def test_clean_text_decodes_html_strips_tags_collapses_space_and_caps():
    assert clean_text("  <b>Et Dieu&#8230;Créa</b>\n la \t Femme ") == "Et Dieu…Créa la Femme"
    assert clean_text("one two three", max_chars=9) == "one two"
    assert clean_text("abcdef", max_chars=3) == "abc"


@pytest.mark.parametrize("genre_field", ["genre", "class"])  # ml-1m / ml-1m-half, and ml-100k
def test_movielens_template(tmp_path, genre_field):
    config = item_file_config(tmp_path, ["item_id:token", "movie_title:token_seq", "release_year:token",
                                         f"{genre_field}:token_seq"],
                              [["11", "American President, The", "1995", "Comedy Drama Romance"],
                               ["59", "Confessional, The (Le Confessionnal)", "1995", "Drama Mystery"],
                               ["3845", "And God Created Woman (Et Dieu&#8230;Créa la Femme)", "1956", "Drama"],
                               ["7", "Good, the Bad and the Ugly, The", "", ""],
                               ["8", "", "", ""]])
    items = read_item_texts(config)
    assert items.template == "movielens"
    assert items.texts["11"] == "The American President (1995). Genres: Comedy, Drama, Romance."
    assert items.names["59"] == "The Confessional (Le Confessionnal) (1995)"
    assert items.names["3845"] == "And God Created Woman (Et Dieu…Créa la Femme) (1956)"
    assert items.texts["7"] == "The Good, the Bad and the Ugly."
    assert "8" not in items.texts  # no text at all: absent, so that it is reported as missing


def test_generic_template_uses_every_text_field(tmp_path):
    header = ["item_id:token", "title:token_seq", "brand:token", "price:float", "description:token_seq"]
    config = item_file_config(tmp_path, header, [["a1", "Red  Shoe", "Acme", "9.5", "<p>Soft &amp; light</p>"],
                                                 ["a2", "", "Acme", "3.0", ""]])
    items = read_item_texts(config)
    assert items.template == "generic"
    assert items.texts == {"a1": "title: Red Shoe; brand: Acme; description: Soft & light", "a2": "brand: Acme"}
    assert items.names == {"a1": "Red Shoe", "a2": "brand: Acme"}
    with pytest.raises(RecBoleLLMError, match=r"needs a movie_title field.*llm_text_template: generic"):
        read_item_texts({**config, "llm_text_template": "movielens"})
    with pytest.raises(RecBoleLLMError, match=r"llm_text_template 'books' is unknown"):
        read_item_texts({**config, "llm_text_template": "books"})


def _recbole_split(dataset):
    """RecBole's own leave-one-out split of the (sequential) dataset, by raw tokens: ``({user: training items in
    order}, {user: {its valid and test target items}}, the train split)``. Builds the dataset."""
    train, valid, test = dataset.build()
    users, items = dataset.field2id_token[dataset.uid_field], dataset.field2id_token[dataset.iid_field]
    item_list = dataset.iid_field + dataset.config["LIST_SUFFIX"]
    trained, held = {}, {}
    uid, iid = dataset.uid_field, dataset.iid_field
    firsts = train.inter_feat[item_list][:, 0].tolist()
    for user, first, target in zip(train.inter_feat[uid].tolist(), firsts, train.inter_feat[iid].tolist()):
        trained.setdefault(users[user], [items[first]]).append(items[target])  # rows: <i0> | i1, <i0, i1> | i2, ...
    for split in (valid, test):
        for user, target in zip(split.inter_feat[uid].tolist(), split.inter_feat[iid].tolist()):
            held.setdefault(users[user], set()).add(items[target])
    return trained, held, train


def test_user_text_is_built_from_training_items_only(tiny_text):
    config, dataset = tiny_text
    histories = training_histories(dataset, config)
    side = SideData(config)
    texts = user_texts(histories, side.item_texts.names, side.item_texts.template, side.encoder.tokenizer, 10 ** 6)
    trained, held, train = _recbole_split(dataset)
    assert len(histories) == len(held) == 40 and all(len(items) == 2 for items in held.values())
    for user, items in histories.items():
        assert items == trained[user]  # RecBole's training items, in its order (time, ties in file order)
        assert not held[user] & set(items)
        for item in held[user]:
            assert side.item_texts.names[item] not in texts[user]
        assert all(side.item_texts.names[item] in texts[user] for item in items)
    # A built dataset (a model gets its train split) gives the same histories: they are read again from the files.
    assert training_histories(train, config) == histories


def test_user_text_keeps_the_most_recent_items_that_fit(tiny_text):
    config, dataset = tiny_text
    histories = training_histories(dataset, config)
    side = SideData(config)
    names, tokenizer = side.item_texts.names, side.encoder.tokenizer
    texts = user_texts(histories, names, "movielens", tokenizer, max_tokens=40)
    template = TEMPLATES["movielens"]
    for user, items in histories.items():
        history_names = [names[i] for i in items]
        text = texts[user]
        assert len(tokenizer(text)["input_ids"]) <= 40
        kept = next(history_names[s:] for s in range(len(history_names)) if template.user(history_names[s:]) == text)
        assert kept[-1] == history_names[-1]  # the latest training item is always there
        one_more = template.user(history_names[len(history_names) - len(kept) - 1:])
        assert len(tokenizer(one_more)["input_ids"]) > 40  # and no older item would have fitted


# ---- encoders ----

def test_default_encoder_is_minilm_offline():
    config = {"llm_encoder": None, "llm_pooling": "auto", "llm_max_tokens": None, "llm_normalize": True,
              "llm_encode_batch_size": 2, "device": torch.device("cpu"), "show_progress": False}
    encoder = TextEncoder(config)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and encoder.pooling == "mean" and encoder.max_tokens == 256
    vectors = encoder.encode(["A man is eating food.", "A man is eating a piece of bread.", "A cat."])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] == pytest.approx(0.7553, abs=1e-3)  # all-MiniLM-L6-v2's published value


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_pooling_matches_a_single_unpadded_forward(tiny_llama, pooling):
    config = {"llm_encoder": str(tiny_llama), "llm_pooling": "auto" if pooling == "last" else pooling,
              "llm_max_tokens": None, "llm_normalize": False, "llm_encode_batch_size": 3,
              "device": torch.device("cpu"), "show_progress": False}
    encoder = TextEncoder(config)
    assert encoder.pooling == pooling and encoder.max_tokens == 64  # the tiny config's max_position_embeddings
    texts = ["a short text", "a much longer text with many more words in it than the first", "mid length text"]
    vectors = encoder.encode(texts)  # one padded batch
    model = LlamaModel.from_pretrained(tiny_llama).eval()
    for text, vector in zip(texts, vectors):
        with torch.no_grad():
            hidden = model(**{k: v for k, v in encoder.tokenizer(text, return_tensors="pt").items()
                              if k != "token_type_ids"}).last_hidden_state[0]
        expected = hidden[-1] if pooling == "last" else hidden.mean(0)
        np.testing.assert_allclose(vector, expected.numpy(), atol=1e-5)


def test_encoder_path_that_does_not_exist_names_path_and_fix(tmp_path):
    config = text_config(tmp_path, tmp_path / "no-such-model")
    with pytest.raises(RecBoleLLMError, match=r"llm_encoder '.*no-such-model' does not exist.*local folder.*"
                                              r"--local-dir.*leave llm_encoder unset"):
        TextEncoder(config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecBoleLLMError, match=r"llm_encoder '.*empty' has no config\.json"):
        TextEncoder(text_config(tmp_path, tmp_path / "empty"))


# ---- the cache and the remapping to internal ids ----

def _rewrite_entry(entry, keep):
    """Keep the rows ``keep`` (an index array, any order) of a cache entry, saved whole under the same key."""
    matrix, tokens = np.load(entry.matrix_file), entry.tokens_file.read_text(encoding="utf-8").split("\n")[:-1]
    key = json.loads(entry.meta_file.read_text(encoding="utf-8"))["key"]
    entry.save(key, matrix[keep], [tokens[i] for i in keep], 0.0)


def test_item_vectors_follow_internal_ids_after_the_cache_rows_are_shuffled(tiny_text):
    config, dataset = tiny_text
    side = SideData(config)
    first = item_vectors(dataset, config)
    assert first.dtype == torch.float32 and first.shape == (dataset.item_num, 16)
    entry = side.items().entry
    _rewrite_entry(entry, np.random.default_rng(0).permutation(len(np.load(entry.matrix_file))))
    shuffled = item_vectors(dataset, config)
    assert not side.items().built  # the shuffled cache was used, not rebuilt
    assert torch.equal(shuffled[0], torch.zeros(16))
    torch.testing.assert_close(shuffled, first)
    tokens = dataset.field2id_token[dataset.iid_field]
    for internal in (1, 500, dataset.item_num - 1):  # each internal id holds its own item's text vector
        own = side.encoder.encode([side.item_texts.texts[tokens[internal]]])[0]
        np.testing.assert_allclose(shuffled[internal].numpy(), own, atol=1e-5)


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(tiny_text, tiny_llama, tmp_path):
    config, dataset = tiny_text
    assert SideData(config).items().built
    assert not SideData(config).items().built
    assert SideData(text_config(tmp_path, config["llm_encoder"], llm_pooling="last")).items().built
    assert SideData(text_config(tmp_path, config["llm_encoder"], llm_text_template="generic")).items().built
    assert not SideData(text_config(tmp_path, config["llm_encoder"], llm_text_template="generic")).items().built
    item_file = os.path.join(config["data_path"], "test.item")
    with open(item_file, "a", encoding="utf-8") as f:
        f.write("99999\tNew Film\t2001\tDrama\n")
    assert SideData(config).items().built  # the .item file changed
    llama = SideData(text_config(tmp_path, tiny_llama))
    assert llama.items().built and llama.folder != SideData(config).folder  # one folder per encoder
    meta = json.loads(SideData(config).items().entry.meta_file.read_text(encoding="utf-8"))
    assert {"encoder", "pooling", "template", "files", "text_sha256"} <= set(meta["key"]) and meta["dim"] == 16
    assert not [f for f in SideData(config).folder.iterdir() if f.name.endswith(".tmp")]


def test_a_crash_while_writing_leaves_no_usable_entry(tiny_text, monkeypatch):
    config, _ = tiny_text
    SideData(config).items()
    with open(os.path.join(config["data_path"], "test.item"), "a", encoding="utf-8") as f:
        f.write("99999\tNew Film\t2001\tDrama\n")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        SideData(config).items()
    monkeypatch.undo()
    folder = SideData(config).folder
    assert not (folder / "items.json").exists()  # the old metadata went first: the stale rows are unusable
    assert not [f for f in folder.iterdir() if f.name.endswith(".tmp")]
    assert SideData(config).items().built


def test_item_without_text_is_an_error_unless_zeros(tmp_path, tiny_bert):
    write_tiny_dataset(tmp_path / "data")
    item_file = tmp_path / "data" / "test" / "test.item"
    lines = item_file.read_text(encoding="utf-8").splitlines()
    removed = lines[5].split("\t")[0]
    item_file.write_text("\n".join(lines[:5] + lines[6:]) + "\n", encoding="utf-8")
    config = text_config(tmp_path, tiny_bert)
    dataset = create_dataset(config)
    with pytest.raises(RecBoleLLMError, match=rf"1 item\(s\) of the dataset have no text in .*test\.item .*item "
                                              rf"'{removed}'.*llm_missing_text: zeros"):
        item_vectors(dataset, config)
    config = text_config(tmp_path, tiny_bert, llm_missing_text="zeros")
    vectors = item_vectors(dataset, config)
    internal = dataset.token2id(dataset.iid_field, removed)
    assert torch.equal(vectors[internal], torch.zeros(16))
    assert int((vectors.abs().sum(1) > 0).sum()) == dataset.item_num - 2  # all but [PAD] and the removed item
    assert pca_item_vectors(dataset, config, 8)[internal].abs().sum() == 0


def test_cache_whose_tokens_no_longer_match_the_dataset_is_an_error(tiny_text):
    """A cache with valid metadata that lacks rows of the dataset (e.g. built for another filtering and copied in)."""
    config, dataset = tiny_text
    user_vectors(dataset, config)
    entry = SideData(config).users(dataset).entry
    _rewrite_entry(entry, np.arange(1, 40))
    with pytest.raises(RecBoleLLMError, match=r"the cache .*users\.tokens\.txt has no row for 1 user\(s\) .*no "
                                              r"longer matches the dataset after filtering.*recbole_llm\.text build"):
        user_vectors(dataset, config)


def test_dimension_mismatch_with_the_model_config(tiny_text, tmp_path):
    config, dataset = tiny_text
    with pytest.raises(RecBoleLLMError, match=r"llm_encoder gives 16-d vectors .*items\.npy.*llm_dim: 768; set "):
        item_vectors(dataset, text_config(tmp_path, config["llm_encoder"], llm_dim=768))
    assert item_vectors(dataset, text_config(tmp_path, config["llm_encoder"], llm_dim=16)).shape[1] == 16
    with pytest.raises(RecBoleLLMError, match=r"PCA to 64 dimensions .* gives 16-d vectors.*lower hidden_size"):
        pca_item_vectors(dataset, config, 64)


# ---- derived: PCA and similar users ----

def test_pca_projects_on_the_principal_axes():
    x = np.random.default_rng(0).normal(size=(60, 6)) * np.array([5, 4, 3, 2, 1, 0.5])
    reduced = pca(x.astype(np.float32), 3)
    centred = x - x.mean(0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(centred.T))
    top = eigenvectors[:, ::-1][:, :3]
    np.testing.assert_allclose(np.abs(reduced), np.abs(centred @ top), atol=1e-4)
    assert np.all(np.diff(reduced.var(0)) < 0)  # variance decreasing
    order = np.random.default_rng(1).permutation(60)
    np.testing.assert_allclose(pca(x[order], 3), reduced[order], atol=1e-4)  # signs do not depend on row order


def test_pca_item_vectors(tiny_text):
    config, dataset = tiny_text
    reduced = pca_item_vectors(dataset, config, 8)
    assert reduced.shape == (dataset.item_num, 8) and reduced[0].abs().sum() == 0
    assert reduced[1:].mean(0).abs().max() < 1e-4  # centred: the tiny .item file holds the dataset's items only


def test_blocked_top_similar_equals_brute_force():
    vectors = np.random.default_rng(0).normal(size=(37, 5)).astype(np.float32)
    blocked = top_similar(vectors, 6, block_rows=4)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ unit.T
    np.fill_diagonal(scores, -np.inf)
    np.testing.assert_array_equal(blocked, np.argsort(-scores, axis=1, kind="stable")[:, :6])
    np.testing.assert_array_equal(blocked, top_similar(vectors, 6, block_rows=1000))


def test_similar_users_are_internal_ids_of_the_most_similar_others(tiny_text):
    config, dataset = tiny_text
    similar = similar_users(dataset, config, 5)
    assert similar.dtype == torch.int64 and similar.shape == (dataset.user_num, 5)
    assert torch.equal(similar[0], torch.zeros(5, dtype=torch.int64))
    vectors = torch.nn.functional.normalize(user_vectors(dataset, config)[1:], dim=1)
    scores = vectors @ vectors.T
    scores.fill_diagonal_(-torch.inf)
    torch.testing.assert_close(similar[1:], scores.topk(5, dim=1).indices + 1)
    with pytest.raises(RecBoleLLMError, match=r"11 similar users were asked for, but the cache keeps 10"):
        similar_users(dataset, config, 11)


# ---- command line ----

def test_cli_builds_everything_then_reuses_it(tmp_path, tiny_bert, monkeypatch, capsys):
    write_tiny_dataset(tmp_path / "data")
    values = tiny_config(tmp_path, train_neg_sample_args=None, hidden_size=8, llm_similar_users=5,
                         llm_encode_batch_size=512)
    config_file = write_yaml(tmp_path / "tiny.yaml", values)
    args = ["build", "--dataset=test", f"--encoder={tiny_bert}", f"--config_files={config_file}"]
    first = run_python(["-m", "recbole_llm.text", *args])
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("dataset test: 40 users, 1038 items")
    for label, shape in (("items", "1038 x 16"), ("users", "40 x 16"), ("PCA 8", "1038 x 8"),
                         ("similar users", "40 x 5")):
        line = next(line for line in lines if line.startswith(label))
        assert shape in line and "built" in line and "MiB on disk" in line and "-> peak" in line
    # Again, in this process (RecBole's Config reads sys.argv): everything comes from the cache.
    monkeypatch.setattr(sys, "argv", ["recbole_llm.text", *args])
    assert text_cli.main() == 0
    assert capsys.readouterr().out.count("cached") == 4
    monkeypatch.setattr(sys, "argv", ["recbole_llm.text", *args[:2], f"--encoder={tmp_path / 'nope'}", args[3]])
    assert text_cli.main() == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m recbole_llm.text: error: llm_encoder '") and "Traceback" not in error
