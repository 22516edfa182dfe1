"""Sampled evaluation (uniN) encodes each distinct history once, and scores exactly as the per-row path."""
import pytest
import torch
from recbole.data import data_preparation
from recbole.data.interaction import Interaction
from recbole.model.sequential_recommender import BERT4Rec, GRU4Rec, SASRec

from conftest import tiny_config, write_tiny_dataset
from recbole_llm.config import Config
from recbole_llm.model.layers import per_row_user_vectors
from recbole_llm.utils import create_dataset, get_model

ITEM_COLUMNS = {"inter": ["user_id", "item_id", "rating", "timestamp"],
                "item": ["item_id", "movie_title", "release_year", "class"]}
CANDIDATES = 6  # rows per evaluation interaction: its target and 5 negatives


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sampled")
    write_tiny_dataset(tmp_path / "data")
    return tmp_path


def build(data_dir, model):
    config = Config(model=model, config_dict=tiny_config(data_dir, load_col=ITEM_COLUMNS))
    train_data, _, test_data = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    net = get_model(model)(config, train_data._dataset).eval()
    return net, next(iter(test_data))[0]


def sampled_rows(net, batch):
    """A uniN-style batch: each of 4 evaluation rows repeated over CANDIDATES items, laid out as RecBole's
    NegSampleEvalDataLoader does (all targets first, then each block of negatives); two of the rows belong to
    one user with different histories."""
    rows = {field: batch[field][:4].clone() for field in (net.USER_ID, net.ITEM_SEQ, net.ITEM_SEQ_LEN)}
    rows[net.USER_ID][1] = rows[net.USER_ID][0]  # one user, two histories
    assert not torch.equal(rows[net.ITEM_SEQ][0], rows[net.ITEM_SEQ][1])
    repeated = {field: value.repeat(CANDIDATES, *([1] * (value.dim() - 1))) for field, value in rows.items()}
    repeated[net.ITEM_ID] = torch.randint(1, net.n_items, (4 * CANDIDATES,), generator=torch.Generator().manual_seed(1))
    return Interaction(repeated)


def test_each_distinct_history_is_encoded_once():
    seqs = torch.tensor([[1, 2, 0], [3, 0, 0], [1, 2, 0], [1, 2, 0], [3, 0, 0], [1, 2, 3]])
    lengths = torch.tensor([2, 1, 2, 2, 1, 3])
    calls = []

    def encode(item_seq, item_seq_len):
        calls.append(len(item_seq))
        return item_seq.float().sum(1, keepdim=True) * 10 + item_seq_len.unsqueeze(1)

    vectors = per_row_user_vectors(encode, seqs, lengths)
    assert calls == [3]  # three distinct histories among six rows
    assert vectors.squeeze(1).tolist() == [32, 31, 32, 32, 31, 63]  # each row gets its own history's vector


@pytest.mark.parametrize("model, stock", [("SASRecAP", SASRec), ("GRU4RecAP", GRU4Rec), ("BERT4RecAP", BERT4Rec)])
def test_backbones_score_as_the_stock_per_row_predict(data_dir, model, stock):
    net, batch = build(data_dir, model)
    interaction = sampled_rows(net, batch)
    with torch.no_grad():
        ours, per_row = net.predict(interaction), stock.predict(net, interaction)
    assert torch.allclose(ours, per_row, atol=1e-6, rtol=0)
    assert torch.equal(ours.argsort(), per_row.argsort())


@pytest.mark.parametrize("model", ["DualLLMSASRec", "LLMESR_GRU4Rec", "LLMESR_Bert4Rec"])
def test_llmesr_scores_as_encoding_every_row(data_dir, model):
    net, batch = build(data_dir, model)
    interaction = sampled_rows(net, batch)
    items = interaction[net.ITEM_ID]
    with torch.no_grad():
        users = net.forward(interaction[net.ITEM_SEQ], interaction[net.ITEM_SEQ_LEN])
        per_row = (users * net.item_matrix()[items]).sum(-1) + net.item_bias(items)
        assert torch.allclose(net.predict(interaction), per_row, atol=1e-6, rtol=0)
