"""llm_train_mode 'all_positions' (DESIGN.md §6): the one-row-per-user dataset, and SASRecAP, GRU4RecAP and
BERT4RecAP, its baselines: RecBole's SASRec and GRU4Rec with the loss at every position, and BERT4Rec on the
user's cloze rows (their masking: tests/test_cloze.py)."""
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation
from recbole.data.interaction import Interaction
from recbole.model.sequential_recommender.bert4rec import BERT4Rec
from recbole.model.sequential_recommender.gru4rec import GRU4Rec
from recbole.model.sequential_recommender.sasrec import SASRec
from recbole.utils import init_seed

from recbole_llm.config import Config
from recbole_llm.data.dataset import AllPositionsDataset
from recbole_llm.model.layers import sample_negatives
from recbole_llm.model import all_positions
from recbole_llm.model.sequential_recommender.bert4recap import BERT4RecAP
from recbole_llm.model.sequential_recommender.gru4recap import GRU4RecAP
from recbole_llm.model.sequential_recommender.sasrecap import SASRecAP
from recbole_llm.quick_start import objective_function
from recbole_llm.utils import RecBoleLLMError, create_dataset, get_trainer

TARGETS = "item_id_target_list"
# (all-positions model, the stock RecBole model whose network it keeps)
PAIRS = pytest.mark.parametrize("ours_class, stock_class",
                                [(SASRecAP, SASRec), (GRU4RecAP, GRU4Rec), (BERT4RecAP, BERT4Rec)],
                                ids=["SASRecAP", "GRU4RecAP", "BERT4RecAP"])
# the causal ones, whose loss is at every position
CAUSAL_PAIRS = pytest.mark.parametrize("ours_class, stock_class", [(SASRecAP, SASRec), (GRU4RecAP, GRU4Rec)],
                                       ids=["SASRecAP", "GRU4RecAP"])


def prepare(tiny, model="SASRecAP", **overrides):
    """(config, train, valid, test loaders) of the tiny dataset."""
    config_dict, _ = tiny
    config = Config(model=model, config_dict={**config_dict, **overrides})
    init_seed(config["seed"], config["reproducibility"])
    return (config, *data_preparation(config, create_dataset(config)))


def both_models(config, dataset, ours_class=SASRecAP, stock_class=SASRec, seed=7):
    """Ours holding the weights of the stock model drawn with another seed than ours, both in eval mode."""
    init_seed(config["seed"], True)
    ours = ours_class(config, dataset)
    init_seed(seed, True)
    stock = stock_class(config, dataset)
    ours.load_state_dict(stock.state_dict())  # strict: the same parameter names and shapes
    return ours.eval(), stock.eval()


def hand_batch():
    """Two left-aligned sequences of lengths 4 and 2 with their next-item targets, 0 for padding."""
    item_seq = torch.zeros(2, 20, dtype=torch.long)
    targets = torch.zeros_like(item_seq)
    item_seq[0, :4], targets[0, :4] = torch.tensor([5, 3, 9, 12]), torch.tensor([3, 9, 12, 40])
    item_seq[1, :2], targets[1, :2] = torch.tensor([7, 2]), torch.tensor([2, 8])
    return Interaction({"item_id_list": item_seq, "item_length": torch.tensor([4, 2]), TARGETS: targets})


def prefix_states(stock, batch):
    """RecBole SASRec's output for every prefix of every row, in order: the samples of RecBole's prefix mode."""
    states = []
    for row, length in zip(batch["item_id_list"], batch["item_length"].tolist()):
        for p in range(length):
            prefix = torch.zeros_like(row)
            prefix[: p + 1] = row[: p + 1]
            states.append(stock.forward(prefix[None], torch.tensor([p + 1]))[0])
    return states


# (a) the same network as the stock RecBole model

@PAIRS
def test_same_parameters_and_initialisation_as_the_stock_model(tiny, ours_class, stock_class):
    config, train, _, _ = prepare(tiny, model=ours_class.__name__)
    init_seed(config["seed"], True)
    ours = ours_class(config, train.dataset)
    init_seed(config["seed"], True)
    stock = stock_class(config, train.dataset)
    theirs = stock.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    assert all(torch.equal(value, theirs[name]) for name, value in ours.state_dict().items())


@PAIRS
def test_last_position_scores_equal_the_stock_model_on_same_weights(tiny, ours_class, stock_class):
    config, train, valid, _ = prepare(tiny, model=ours_class.__name__)
    ours, stock = both_models(config, train.dataset, ours_class, stock_class)
    batch = next(iter(valid))[0]
    assert len(set(batch["item_length"].tolist())) > 1  # sequences of several lengths, so padding differs
    with torch.no_grad():
        assert torch.equal(ours.full_sort_predict(batch), stock.full_sort_predict(batch))
        assert torch.equal(ours.predict(batch), stock.predict(batch))


@PAIRS
def test_prefix_mode_runs_exactly_as_the_stock_model(tiny, ours_class, stock_class):
    stock = objective_function({**tiny[0], "model": stock_class.__name__}, saved=False)
    ours = objective_function({**tiny[0], "model": ours_class.__name__, "llm_train_mode": "prefix"}, saved=False)
    assert ours["best_valid_result"] == stock["best_valid_result"]
    assert ours["test_result"] == stock["test_result"]


# (b) the causal mask

@CAUSAL_PAIRS
def test_an_item_changes_only_its_own_and_later_positions(tiny, ours_class, stock_class):
    config, train, _, _ = prepare(tiny, model=ours_class.__name__)
    ours, _ = both_models(config, train.dataset, ours_class, stock_class)
    feat = train.dataset.inter_feat
    seq = feat["item_id_list"][feat["item_length"] == 20][:8]  # full sequences
    assert len(seq) == 8
    changed = seq.clone()
    changed[:, 6] = seq[:, 6] % (ours.n_items - 1) + 1  # another real item at position 6
    with torch.no_grad():
        before, after = ours.encode(seq), ours.encode(changed)
    assert torch.equal(before[:, :6], after[:, :6])
    assert not torch.isclose(before[:, 6:], after[:, 6:]).all(dim=-1).any()


# (c) the loss against hand computations, (d) padding

@CAUSAL_PAIRS
def test_ce_loss_is_the_mean_of_prefix_cross_entropies(tiny, ours_class, stock_class):
    config, train, _, _ = prepare(tiny, model=ours_class.__name__)
    ours, stock = both_models(config, train.dataset, ours_class, stock_class)
    batch = hand_batch()
    targets = batch[TARGETS][batch[TARGETS] > 0].tolist()
    with torch.no_grad():
        hand = [-torch.log_softmax(state @ stock.item_embedding.weight.T, -1)[target]
                for state, target in zip(prefix_states(stock, batch), targets)]
        assert len(hand) == 6
        assert torch.allclose(ours.calculate_loss(batch), torch.stack(hand).mean(), atol=1e-6)


def test_bpr_loss_uses_one_negative_per_position(tiny, monkeypatch):
    config, train, _, _ = prepare(tiny, loss_type="BPR")
    ours, stock = both_models(config, train.dataset)
    drawn = []
    monkeypatch.setattr(all_positions, "sample_negatives",
                        lambda positives, n_items: drawn.append(sample_negatives(positives, n_items)) or drawn[-1])
    batch = hand_batch()
    targets = batch[TARGETS][batch[TARGETS] > 0]
    with torch.no_grad():
        loss = ours.calculate_loss(batch)
        emb = stock.item_embedding.weight
        hand = [-torch.log(1e-10 + torch.sigmoid(state @ emb[pos] - state @ emb[neg]))
                for state, pos, neg in zip(prefix_states(stock, batch), targets, drawn[0])]
    assert drawn[0].shape == targets.shape
    assert torch.allclose(loss, torch.stack(hand).mean(), atol=1e-6)


def test_negatives_are_uniform_over_items_other_than_the_positive(tiny):
    config, train, _, _ = prepare(tiny, loss_type="BPR")
    model = SASRecAP(config, train.dataset)
    torch.manual_seed(0)
    negatives = sample_negatives(torch.full((50_000,), 3), model.n_items)
    assert set(negatives.tolist()) == set(range(1, model.n_items)) - {3}


def test_padding_positions_get_no_gradient(tiny):
    config, train, _, _ = prepare(tiny)
    ours, _ = both_models(config, train.dataset)
    encode, kept = ours.encode, []

    def encode_keeping_grad(item_seq):
        out = encode(item_seq)
        out.retain_grad()
        kept.append(out)
        return out

    ours.encode = encode_keeping_grad
    batch = hand_batch()
    ours.calculate_loss(batch).backward()
    grad_norm = kept[0].grad.norm(dim=-1)
    padding = batch[TARGETS] == 0
    assert bool((grad_norm[padding] == 0).all()) and bool((grad_norm[~padding] > 0).all())


# (e) the training rows, (h) valid and test unchanged

def raw_histories(tiny, dataset):
    """Each user's internal item ids in RecBole's order, read from the .inter file.

    RecBole sorts by timestamp as float32 (64-second steps at ml-100k's times), ties keeping the file order.
    """
    _, path = tiny
    lines = (path / "data" / "test" / "test.inter").read_text(encoding="utf-8").splitlines()[1:]
    by_user = defaultdict(list)
    for line in lines:
        user, item, _, stamp = line.split("\t")
        by_user[user].append((np.float32(stamp), len(by_user[user]), dataset.field2token_id["item_id"][item]))
    user_ids = dataset.field2token_id["user_id"]
    return {user_ids[user]: [item for *_, item in sorted(rows)] for user, rows in by_user.items()}


def test_one_row_per_user_holding_the_last_training_items(tiny):
    config, train, _, _ = prepare(tiny)
    assert isinstance(train.dataset, AllPositionsDataset)
    feat = train.dataset.inter_feat
    histories = raw_histories(tiny, train.dataset)
    assert sorted(feat["user_id"].tolist()) == sorted(histories)  # one row for each user
    window = config["MAX_ITEM_LIST_LENGTH"] + 1
    truncated = 0
    for user, items, length, last, targets in zip(feat["user_id"].tolist(), feat["item_id_list"], feat["item_length"],
                                                 feat["item_id"].tolist(), feat[TARGETS]):
        sequence = items[:length].tolist() + [last]
        training_items = histories[user][:-2]  # leave-one-out: the last two are valid and test
        assert sequence == training_items[-window:]
        assert targets[:length].tolist() == sequence[1:] and not targets[length:].any()
        truncated += len(training_items) > window
    assert 0 < truncated < len(histories)  # both short and truncated histories were checked


def test_valid_and_test_are_those_of_prefix_mode(tiny):
    _, train, valid, test = prepare(tiny)
    _, prefix_train, prefix_valid, prefix_test = prepare(tiny, llm_train_mode="prefix")
    for ours, theirs in ((valid, prefix_valid), (test, prefix_test)):
        assert set(ours.dataset.inter_feat.columns) == set(theirs.dataset.inter_feat.columns)
        assert all(torch.equal(ours.dataset.inter_feat[f], theirs.dataset.inter_feat[f])
                   for f in theirs.dataset.inter_feat.columns)
    assert len(prefix_train.dataset) > 10 * len(train.dataset)


def write_short_histories(data_path):
    """A dataset ``short`` whose users have 1 to 7 interactions, some at equal times, under ``data_path``."""
    histories = {"1": 1, "2": 2, "3": 3, "4": 4, "5": 7, "6": 5}
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user, n in histories.items():
        lines += [f"{user}\t{(int(user) * 3 + k) % 9 + 1}\t{k % 5 + 1}\t{100 + k // 2 + int(user)}" for k in range(n)]
    folder = data_path / "short"
    folder.mkdir(parents=True)
    (folder / "short.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")


def last_row_per_user(feat):
    """{user: its last row of ``feat``, as a dict of lists}."""
    rows = {}
    for index, user in enumerate(feat["user_id"].tolist()):
        rows[user] = {field: feat[field][index].tolist() for field in feat.columns}
    return rows


@pytest.mark.parametrize("leave_out", ["valid_and_test", "valid_only", "test_only"])
def test_augmentation_of_the_kept_rows_only_gives_recbole_splits(tiny, leave_out):
    # Users shorter than the rows a split leaves out, histories longer than MAX_ITEM_LIST_LENGTH and equal times.
    _, path = tiny
    write_short_histories(path / "data")
    settings = {"dataset": "short", "MAX_ITEM_LIST_LENGTH": 2,
                "eval_args": {"split": {"LS": leave_out}, "order": "TO", "mode": "full"}}
    _, train, *evaluation = prepare(tiny, **settings)
    _, prefix_train, *prefix_evaluation = prepare(tiny, llm_train_mode="prefix", **settings)
    for ours, theirs in zip(evaluation, prefix_evaluation):
        if theirs is None or len(theirs.dataset) == 0:
            continue
        assert all(torch.equal(ours.dataset.inter_feat[f], theirs.dataset.inter_feat[f])
                   for f in theirs.dataset.inter_feat.columns)
    ours_rows = last_row_per_user(train.dataset.inter_feat)
    for user, row in last_row_per_user(prefix_train.dataset.inter_feat).items():
        assert {f: v for f, v in ours_rows[user].items() if f != TARGETS} == row
    parent = train.dataset  # a copy of the augmented parent, sharing its interactions
    assert len(parent.source_interactions[0]) == 1 + 2 + 3 + 4 + 7 + 5


def test_augmentation_keeps_at_most_four_rows_per_user(tiny):
    config, train, _, _ = prepare(tiny)
    dataset = create_dataset(config)
    AllPositionsDataset.build(dataset)
    _, per_user = torch.unique(dataset.inter_feat["user_id"], return_counts=True)
    assert per_user.max() == 4 and len(per_user) == len(train.dataset)


def test_a_ratio_split_augments_every_row(tiny):
    settings = {"eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "mode": "full"}}
    config, train, _, _ = prepare(tiny, **settings)
    dataset = create_dataset(config)
    n_interactions, n_users = len(dataset.inter_feat), dataset.user_num - 1
    AllPositionsDataset.build(dataset)
    assert len(dataset.inter_feat) == n_interactions - n_users  # one row per interaction but each user's first
    assert getattr(dataset, "source_interactions", None) is None


# (f) end to end

def test_one_epoch_end_to_end(tiny):
    result = objective_function({**tiny[0], "model": "SASRecAP"}, saved=False)
    assert 0 <= result["test_result"]["ndcg@10"] <= 1


def test_loss_goes_down_on_a_tiny_dataset(tiny):
    config, train, _, _ = prepare(tiny, learning_rate=0.01, train_batch_size=8)
    init_seed(config["seed"], True)
    model = SASRecAP(config, train.dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    losses = [trainer._train_epoch(train, epoch, show_progress=False) for epoch in range(5)]
    assert losses[-1] < losses[0]


def test_llmesr_paper_protocol_ranks_each_target_among_100_sampled_items(tiny):
    """The preset's uni100: each valid row is the target, then 100 sampled items other than the target.

    RecBole's sampler for sequential models (repeatable) excludes only the target, not the user's history."""
    from pathlib import Path

    preset = Path(__file__).resolve().parents[1] / "benchmarks" / "protocols" / "llmesr_paper.yaml"
    config_dict, _ = tiny
    config = Config(model="SASRecAP", config_file_list=[str(preset)],
                    config_dict={k: v for k, v in config_dict.items() if k not in ("metrics", "topk", "valid_metric")})
    assert config["eval_args"]["mode"]["valid"] == "uni100" and config["valid_metric"] == "NDCG@10"
    _, valid, _ = data_preparation(config, create_dataset(config))
    interaction, _, positive_u, positive_i = next(iter(valid))
    assert valid.times == 101
    users, items = interaction["user_id"], interaction["item_id"]
    assert len(users) == 101 * len(positive_u)
    for user, target in zip(users[::101], items[::101]):
        block = items[users == user]
        assert block[0] == target and len(block) == 101 and not (block[1:] == target).any()


# (f2) logit adjustment (llm_logit_adjustment)

def hand_prior(targets, n_items, tau):
    """tau * log of add-one smoothed counts of the non-padding ``targets``, counted in Python."""
    counts = [1] * n_items
    for item in targets.flatten().tolist():
        if item > 0:
            counts[item] += 1
    return torch.tensor([tau * math.log(c / sum(counts)) for c in counts])


@PAIRS
def test_logit_prior_is_tau_times_the_log_share_of_the_training_targets(tiny, ours_class, stock_class):
    config, train, _, _ = prepare(tiny, model=ours_class.__name__, llm_logit_adjustment=0.5)
    model = ours_class(config, train.dataset)
    expected = hand_prior(train.dataset.inter_feat[TARGETS], train.dataset.item_num, 0.5)
    assert torch.allclose(model.logit_prior, expected, atol=1e-6)
    assert "logit_prior" not in model.state_dict()  # rebuilt from the data: a stock state dict still loads
    off_config, off_train, _, _ = prepare(tiny, model=ours_class.__name__)
    assert ours_class(off_config, off_train.dataset).logit_prior is None


@CAUSAL_PAIRS
def test_logit_adjustment_shifts_the_training_logits_but_not_the_scores(tiny, ours_class, stock_class):
    config, train, _, _ = prepare(tiny, model=ours_class.__name__, llm_logit_adjustment=1.0)
    adjusted, stock = both_models(config, train.dataset, ours_class, stock_class)
    off_config, off_train, _, _ = prepare(tiny, model=ours_class.__name__)
    plain, _ = both_models(off_config, off_train.dataset, ours_class, stock_class)
    batch = hand_batch()
    targets = batch[TARGETS][batch[TARGETS] > 0]
    with torch.no_grad():
        states = plain.encode(batch["item_id_list"])[batch[TARGETS] > 0]
        logits = states @ stock.item_embedding.weight.T
        hand = F.cross_entropy(logits + adjusted.logit_prior, targets)
        assert torch.allclose(adjusted.calculate_loss(batch), hand, atol=1e-6)
        assert not torch.allclose(plain.calculate_loss(batch), hand, atol=1e-3)
        scored = Interaction({"item_id_list": batch["item_id_list"], "item_length": batch["item_length"]})
        assert torch.equal(adjusted.full_sort_predict(scored), plain.full_sort_predict(scored))


@pytest.mark.parametrize("overrides, message", [
    ({"loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}},
     r"adjusts the softmax of loss_type 'CE', not 'BPR'"),
    ({"llm_train_mode": "prefix"}, r"needs llm_train_mode 'all_positions'"),
    ({"llm_logit_adjustment": -0.5}, r"'llm_logit_adjustment' must be 0 \(off\) or positive, got -0.5"),
])
def test_bad_logit_adjustment_settings_are_refused(tiny, overrides, message):
    config, train, _, _ = prepare(tiny, **{"llm_logit_adjustment": 1.0, **overrides})
    with pytest.raises(RecBoleLLMError, match=message):
        SASRecAP(config, train.dataset)


# (g) errors

def test_stock_model_with_all_positions_names_the_key_and_the_models(tiny):
    config = Config(model="SASRec", config_dict={**tiny[0], "llm_train_mode": "all_positions"})
    with pytest.raises(RecBoleLLMError, match=r"'SASRec' does not support llm_train_mode 'all_positions'.*SASRecAP"):
        create_dataset(config)


def test_unknown_train_mode_is_an_error(tiny):
    config = Config(model="SASRecAP", config_dict={**tiny[0], "llm_train_mode": "every_prefix"})
    with pytest.raises(RecBoleLLMError, match=r"'llm_train_mode' must be one of prefix, all_positions, got 'every_"):
        create_dataset(config)


@PAIRS
def test_a_dataset_without_targets_is_refused(tiny, ours_class, stock_class):
    config = Config(model=ours_class.__name__, config_dict=tiny[0])
    train, _, _ = data_preparation(config, recbole_create_dataset(config))
    with pytest.raises(RecBoleLLMError, match=rf"{ours_class.__name__} .*needs the field 'item_id_target_list'"):
        ours_class(config, train.dataset)
