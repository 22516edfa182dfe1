"""Top-k inference from a checkpoint agrees with the model's full_sort_predict and excludes the history."""
from pathlib import Path

import pytest
import torch

from conftest import run_python
from recbole_llm.quick_start import load_data_and_model, run
from recbole_llm.recommend import recommend, user_history
from recbole_llm.utils import create_dataset


@pytest.fixture(scope="module")
def sasrec_checkpoint(tmp_path_factory):
    from conftest import tiny_config, write_tiny_dataset

    tmp_path = tmp_path_factory.mktemp("recommend")
    write_tiny_dataset(tmp_path / "data")
    # Several tiny users have fewer than 50 items, so their test-time sequence holds their whole history.
    config = tiny_config(tmp_path, MAX_ITEM_LIST_LENGTH=50, train_neg_sample_args=None,
                         load_col={"inter": ["user_id", "item_id", "rating", "timestamp"],
                                   "item": ["item_id", "movie_title"]})
    result = run("SASRec", "test", config_dict=config)
    return result["saved_model_file"]


def test_items_mode_matches_full_sort_predict_on_test_batch(sasrec_checkpoint):
    config, model, _, _, _, test_data = load_data_and_model(sasrec_checkpoint)
    model.eval()
    interaction, *_ = next(iter(test_data))
    lengths = interaction[model.ITEM_SEQ_LEN]
    row = int(torch.nonzero(lengths < model.max_seq_length)[0])  # a user whose whole history fits the window
    seq_len = int(lengths[row])
    seq = interaction[model.ITEM_SEQ][row, :seq_len].tolist()

    with torch.no_grad():
        expected = model.full_sort_predict(interaction)[row]
    expected[0] = -torch.inf
    expected[seq] = -torch.inf
    ids, scores = recommend(model, seq, topk=10)

    assert ids == torch.topk(expected, 10).indices.tolist()
    assert scores == pytest.approx(torch.topk(expected, 10).values.tolist(), rel=1e-5)
    # The window held this user's whole train+valid history, in the order user_history gives.
    user = int(interaction[model.USER_ID][row])
    assert seq == user_history(create_dataset(config), user)[:-1]


def test_user_mode_uses_whole_history_and_excludes_it(sasrec_checkpoint):
    config, model, *_ = load_data_and_model(sasrec_checkpoint)
    dataset = create_dataset(config)
    user = dataset.field2token_id["user_id"]["7"]
    history = user_history(dataset, user)
    raw_rows = [line.split("\t") for line in (Path(config["data_path"]) / "test.inter").read_text().splitlines()[1:]]
    assert len(history) == sum(row[0] == "7" for row in raw_rows)  # every interaction, none dropped
    ids, _ = recommend(model, history, topk=20, user_id=user)
    assert len(ids) == 20 and not set(ids) & set(history) and 0 not in ids


def test_cli_prints_titles_and_rejects_unknown_items(sasrec_checkpoint):
    proc = run_python(["-m", "recbole_llm.recommend", "--checkpoint", sasrec_checkpoint, "--user", "7", "--topk", "5"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == 5 and all(len(row.split()) >= 4 for row in rows)  # rank, item, score, title words

    proc = run_python(["-m", "recbole_llm.recommend", "--checkpoint", sasrec_checkpoint, "--items", "1,999999"])
    assert proc.returncode == 2 and "unknown item_id 999999" in proc.stderr
