"""One-sequence-per-user training of the BERT4Rec models: the cloze rows, BERT4RecAP's loss against hand
computations, and DualLLMBert4Rec's user vector."""
import pytest
import torch
import torch.nn.functional as F
from recbole.data import data_preparation
from recbole.model.sequential_recommender.bert4rec import BERT4Rec
from recbole.utils import init_seed

from conftest import tiny_config, write_tiny_dataset
from recbole_llm.config import Config
from recbole_llm.model.layers import append_item, cloze_rows
from recbole_llm.model.sequential_recommender.bert4recap import BERT4RecAP
from recbole_llm.quick_start import objective_function
from recbole_llm.utils import create_dataset, get_model, get_trainer

MASK = 99


def hand_sequences():
    """Right-padded sequences of lengths 3 and 4 (full) in a window of 4, and the item that follows each."""
    item_seq = torch.tensor([[5, 3, 9, 0], [7, 2, 8, 6]])
    return item_seq, torch.tensor([3, 4]), torch.tensor([12, 40])


def test_append_item_is_bert4recs_test_layout():
    item_seq, lengths, next_items = hand_sequences()
    assert append_item(item_seq, lengths, next_items).tolist() == [[3, 9, 12, 0], [2, 8, 6, 40]]
    stock = BERT4Rec.reconstruct_test_data(type("Stub", (), {"mask_token": MASK})(), item_seq, lengths)
    assert torch.equal(append_item(item_seq, lengths, torch.full((2,), MASK)), stock)


def test_cloze_rows_without_random_masks_hold_only_the_last_item_row():
    inputs, targets = cloze_rows(*hand_sequences(), mask_token=MASK, mask_ratio=0.0)
    assert inputs.tolist() == [[3, 9, 12, 0], [2, 8, 6, 40], [3, 9, MASK, 0], [2, 8, 6, MASK]]
    assert targets.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 12, 0], [0, 0, 0, 40]]


def test_cloze_rows_with_every_item_masked_leave_padding_alone():
    inputs, targets = cloze_rows(*hand_sequences(), mask_token=MASK, mask_ratio=1.0)
    assert inputs[:2].tolist() == [[MASK, MASK, MASK, 0], [MASK, MASK, MASK, MASK]]
    assert targets[:2].tolist() == [[3, 9, 12, 0], [2, 8, 6, 40]]


def test_random_masks_hit_items_at_the_mask_ratio():
    torch.manual_seed(0)
    item_seq = torch.randint(1, 50, (2000, 50))
    _, targets = cloze_rows(item_seq, torch.full((2000,), 50), torch.ones(2000, dtype=torch.long), MASK, 0.2)
    assert (targets[:2000] > 0).float().mean().item() == pytest.approx(0.2, abs=0.005)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cloze")
    write_tiny_dataset(tmp_path / "data")
    return tmp_path


def prepare(data_dir, model, **overrides):
    config = Config(model=model, config_dict=tiny_config(data_dir, **overrides))
    init_seed(config["seed"], True)
    train, valid, _ = data_preparation(config, create_dataset(config))
    return config, train, valid


def test_bert4recap_loss_without_random_masks_is_the_ce_of_predicting_the_last_training_item(data_dir):
    # mask_ratio 0 leaves the last-item rows only, whose input is BERT4Rec's test layout: the loss must be the
    # cross-entropy of the stock model's full-ranking scores (with the output bias) for each user's last item.
    config, train, _ = prepare(data_dir, "BERT4RecAP", mask_ratio=0.0)
    model = BERT4RecAP(config, train.dataset).eval()
    stock = BERT4Rec(config, train.dataset).eval()
    stock.load_state_dict(model.state_dict())
    batch = next(iter(train))
    with torch.no_grad():
        hand = F.cross_entropy(stock.full_sort_predict(batch), batch["item_id"])
        assert torch.allclose(model.calculate_loss(batch), hand, atol=1e-6)


def test_bert4recap_bpr_adds_the_output_bias(data_dir, monkeypatch):
    config, train, _ = prepare(data_dir, "BERT4RecAP", mask_ratio=0.0, loss_type="BPR")
    model = BERT4RecAP(config, train.dataset).eval()
    with torch.no_grad():
        model.output_bias.copy_(torch.randn_like(model.output_bias))
    batch = next(iter(train))
    negatives = torch.randint(1, model.n_items, batch["item_id"].shape)
    monkeypatch.setattr("recbole_llm.model.all_positions.sample_negatives", lambda positives, n: negatives)
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
        rows = torch.arange(len(scores))
        hand = -torch.log(1e-10 + torch.sigmoid(scores[rows, batch["item_id"]] - scores[rows, negatives])).mean()
        assert torch.allclose(model.calculate_loss(batch), hand, atol=1e-6)


def test_bert4recap_trains_two_rows_per_user_and_its_loss_goes_down(data_dir):
    config, train, _ = prepare(data_dir, "BERT4RecAP", learning_rate=0.01, train_batch_size=8)
    assert len(train.dataset) == len(set(train.dataset.inter_feat["user_id"].tolist()))  # one row per user
    model = BERT4RecAP(config, train.dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    losses = [trainer._train_epoch(train, epoch, show_progress=False) for epoch in range(5)]
    assert losses[-1] < losses[0]


def test_bert4recap_one_epoch_end_to_end(data_dir):
    result = objective_function(tiny_config(data_dir, model="BERT4RecAP"), saved=False)
    assert 0 <= result["test_result"]["ndcg@10"] <= 1


ITEM_COLUMNS = {"inter": ["user_id", "item_id", "rating", "timestamp"],
                "item": ["item_id", "movie_title", "release_year", "class"]}


def test_dualllm_bert4rec_user_vector_is_the_last_masked_rows_output(data_dir):
    config, train, _ = prepare(data_dir, "LLMESR_Bert4Rec", load_col=ITEM_COLUMNS)
    torch.manual_seed(0)
    net = get_model("LLMESR_Bert4Rec")(config, train.dataset).eval()  # no dropout: both paths are deterministic
    batch = next(iter(train))
    with torch.no_grad():
        outputs, targets, users = net._rec_outputs_and_targets(batch)
        assert torch.allclose(users, net.forward(batch["item_id_list"], batch["item_length"]), atol=1e-5)
    # the last-item rows put one target per user, the user's last training item, after the random-mask targets
    assert torch.equal(targets[-len(users):], batch["item_id"])
    assert outputs.shape == (len(targets), users.size(1))
