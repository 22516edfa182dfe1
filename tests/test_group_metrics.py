"""Long-tail group metrics: hand-computed values, thresholds, counts, DDP reduction, and end-to-end runs."""
import math
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from recbole.data import data_preparation
from recbole.data.interaction import Interaction
from recbole.evaluator import Collector, Evaluator
from recbole.utils import init_seed

from recbole_llm.config import Config
from recbole_llm.evaluator import (GROUPS, GroupCollector, GroupEvaluator, LongTailGroups, group_key, head_threshold,
                                   training_counts)
from recbole_llm.quick_start import _build_trainer
from recbole_llm.utils import RecBoleLLMError, create_dataset, get_model

METRICS = ["Hit", "NDCG", "MRR", "Recall"]
N_ITEMS = 6  # item ids 1..5; 0 is RecBole's padding


def metric_config(**overrides):
    """The keys RecBole's Collector and Evaluator read, plus the ones GroupEvaluator reads."""
    return {"metrics": METRICS, "topk": [1, 2, 3], "metric_decimal_place": 10, "eval_args": {"mode": "full"},
            "device": torch.device("cpu"), "single_spec": True, **overrides}


def scores_with_rank(target, rank):
    """One score row over the N_ITEMS ids that puts ``target`` at 1-based ``rank``; padding item 0 last."""
    others = [item for item in range(1, N_ITEMS) if item != target]
    order = others[:rank - 1] + [target] + others[rank - 1:]
    row = torch.full((N_ITEMS,), -math.inf)
    for position, item in enumerate(order):
        row[item] = float(N_ITEMS - position)
    return row


# Four evaluated rows: (user id, target item, rank of the target).
ROWS = [(1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 5)]
# Users 1, 2 have histories 2, 3 (< 5: tail); users 3, 4 have 10, 12 (head).
# Items 1, 3 have 1 training user each (< 5: tail); items 2, 4 have 9 (head).
HAND_GROUPS = LongTailGroups(torch.tensor([0, 2, 3, 10, 12]), torch.tensor([0, 1, 9, 1, 9, 1]), 5, 5)


def hand_values():
    """Per row, from the ranks 1, 2, 3, 5: one target each, so Recall = Hit; NDCG@k = 1/log2(rank+1) in the top k.

    row 0 (rank 1): hit@1..3 = 1, ndcg@1..3 = 1, mrr@1..3 = 1
    row 1 (rank 2): hit@2,3 = 1, ndcg@2,3 = 1/log2(3), mrr@2,3 = 1/2
    row 2 (rank 3): hit@3 = 1, ndcg@3 = 1/log2(4) = 1/2, mrr@3 = 1/3
    row 3 (rank 5): all 0
    """
    g = 1 / math.log2(3)
    values = {
        "overall": {"hit@1": 1 / 4, "hit@2": 2 / 4, "hit@3": 3 / 4, "ndcg@2": (1 + g) / 4,
                    "ndcg@3": (1 + g + 1 / 2) / 4, "mrr@3": (1 + 1 / 2 + 1 / 3) / 4},
        "tail_user": {"hit@1": 1 / 2, "hit@2": 1, "hit@3": 1, "ndcg@2": (1 + g) / 2, "ndcg@3": (1 + g) / 2,
                      "mrr@3": (1 + 1 / 2) / 2},  # rows 0, 1
        "head_user": {"hit@1": 0, "hit@2": 0, "hit@3": 1 / 2, "ndcg@2": 0, "ndcg@3": (1 / 2) / 2,
                      "mrr@3": (1 / 3) / 2},  # rows 2, 3
        "tail_item": {"hit@1": 1 / 2, "hit@2": 1 / 2, "hit@3": 1, "ndcg@2": 1 / 2, "ndcg@3": (1 + 1 / 2) / 2,
                      "mrr@3": (1 + 1 / 3) / 2},  # rows 0, 2
        "head_item": {"hit@1": 0, "hit@2": 1 / 2, "hit@3": 1 / 2, "ndcg@2": g / 2, "ndcg@3": g / 2,
                      "mrr@3": (1 / 2) / 2},  # rows 1, 3
    }
    for group in values.values():  # one target per row: Recall@k = Hit@k
        group.update({key.replace("hit", "recall"): group[key] for key in list(group) if key.startswith("hit")})
    return values


def full_sort_batch(rows):
    """RecBole's full-sort sequential layout: one interaction per row, ``positive_u = arange``."""
    users, items = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    scores = torch.stack([scores_with_rank(item, rank) for _, item, rank in rows])
    return scores, Interaction({"user_id": users, "item_id": items}), torch.arange(len(rows)), items


def neg_sample_batch(rows, negatives=2):
    """RecBole's neg-sample layout: per row (user), a block of its positive then its negatives; one score row each.

    The score rows are those of the full-sort case: what differs, and is tested, is how rows map to users.
    """
    scores = torch.stack([scores_with_rank(item, rank) for _, item, rank in rows])
    users = torch.tensor([r[0] for r in rows]).repeat_interleave(1 + negatives)
    items = torch.tensor([[item] + [n for n in range(1, N_ITEMS) if n != item][:negatives] for _, item, _ in rows])
    positive_i = torch.tensor([r[1] for r in rows])
    return scores, Interaction({"user_id": users, "item_id": items.flatten()}), torch.arange(len(rows)), positive_i


def evaluate_batches(batches, groups=HAND_GROUPS, **config):
    """Batches through the wrapped collector and evaluator, as RecBole's ``Trainer.evaluate`` feeds them."""
    config = metric_config(**config)
    collector = GroupCollector(Collector(config), "user_id")
    evaluator = GroupEvaluator(Evaluator(config), groups, config)
    for batch in batches:
        collector.eval_batch_collect(*batch)
    return evaluator.evaluate(collector.get_data_struct()), evaluator


def collect_plain(batches):
    """RecBole's own collector alone, for the reference values."""
    collector = Collector(metric_config())
    for batch in batches:
        collector.eval_batch_collect(*batch)
    return collector.get_data_struct()


@pytest.mark.parametrize("make_batch", [full_sort_batch, neg_sample_batch])
def test_group_values_match_hand_computation(make_batch):
    result, evaluator = evaluate_batches([make_batch(ROWS[:2]), make_batch(ROWS[2:])])

    expected = hand_values()
    for key, value in expected["overall"].items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    for group in GROUPS:
        for key, value in expected[group].items():
            assert result[group_key(key, group)] == pytest.approx(value, abs=1e-9), group_key(key, group)
    assert evaluator.row_counts == {group: 2 for group in GROUPS}
    plain = Evaluator(metric_config()).evaluate(collect_plain([make_batch(ROWS)]))
    assert set(result) == set(plain) | {group_key(key, group) for key in plain for group in GROUPS}


def test_overall_keys_are_recbole_values():
    grouped, _ = evaluate_batches([full_sort_batch(ROWS)], metric_decimal_place=4)
    plain = Evaluator(metric_config(metric_decimal_place=4)).evaluate(collect_plain([full_sort_batch(ROWS)]))
    assert {key: grouped[key] for key in plain} == plain
    assert list(grouped)[:len(plain)] == list(plain)  # RecBole's keys first, in its order


def test_empty_group_gives_no_key():
    every_user_head = LongTailGroups(HAND_GROUPS.user_history, HAND_GROUPS.item_popularity, 0, 5)
    result, evaluator = evaluate_batches([full_sort_batch(ROWS)], groups=every_user_head)
    assert evaluator.row_counts["tail_user"] == 0 and evaluator.row_counts["head_user"] == 4
    assert not any(key.endswith("[tail_user]") for key in result)
    assert result["hit@3[head_user]"] == result["hit@3"] == pytest.approx(3 / 4)


def test_row_with_several_targets_takes_the_first_target():
    # Neg-sample mode with two evaluation interactions of user 1 in one row: positive_u = [0, 0, 1].
    config = metric_config()
    collector = GroupCollector(Collector(config), "user_id")
    scores = torch.stack([scores_with_rank(1, 1), scores_with_rank(2, 1)])
    interaction = Interaction({"user_id": torch.tensor([1, 1, 1, 1, 2, 2]),
                               "item_id": torch.tensor([1, 3, 4, 5, 2, 4])})
    collector.eval_batch_collect(scores, interaction, torch.tensor([0, 0, 1]), torch.tensor([1, 3, 2]))
    struct = collector.get_data_struct()
    assert struct["llm.row_user"].tolist() == [1, 2] and struct["llm.row_item"].tolist() == [1, 2]


def test_head_threshold_from_ratio():
    # Positive counts, largest first: 10, 9, 9, 8, 5, 5, 3, 2, 1, 1 (n = 10); the 0 is not in the population.
    counts = [0, 1, 1, 2, 3, 5, 5, 8, 9, 9, 10]
    assert head_threshold(counts, 0.2) == 9   # k = ceil(0.2 * 10) = 2: 2nd largest; head = {10, 9, 9}, ties join
    assert head_threshold(counts, 0.3) == 9   # k = 3 (0.3 * 10 is 3.0000000000000004 in floats)
    assert head_threshold(counts, 0.4) == 8   # k = 4: head = {10, 9, 9, 8}, exactly 40 %
    assert head_threshold(counts, 0.5) == 5   # k = 5: head = 6 entries, the tie at 5 joins
    assert head_threshold(counts, 0.05) == 10  # k = ceil(0.5) = 1
    assert head_threshold(counts, 1.0) == 1   # everyone seen is head
    for bad in (0, -0.1, 1.5):
        with pytest.raises(RecBoleLLMError, match="llm_head_ratio"):
            head_threshold(counts, bad)


def augmented(rows, max_len):
    """An Interaction of RecBole-augmented samples: rows of (user, history items, target), inputs cut to max_len."""
    sequences = torch.zeros(len(rows), max_len, dtype=torch.long)
    for r, (_, history, _) in enumerate(rows):
        kept = history[-max_len:]
        sequences[r, :len(kept)] = torch.tensor(kept)
    return Interaction({"user_id": torch.tensor([r[0] for r in rows]), "item_id": torch.tensor([r[2] for r in rows]),
                        "item_id_list": sequences,
                        "item_length": torch.tensor([min(len(r[1]), max_len) for r in rows])})


def split(rows, max_len=2):
    """A stand-in for a RecBole SequentialDataset split holding these samples."""
    return SimpleNamespace(inter_feat=augmented(rows, max_len), uid_field="user_id", iid_field="item_id",
                           item_list_length_field="item_length", item_id_list_field="item_id_list",
                           user_num=4, item_num=7)


def test_training_counts_exclude_evaluation_targets():
    # User 1 did 1, 2, 3, 1, 4; user 2 did 2, 5, 3, 6; user 3 did 4, 4, 5, 6. The last two of each are valid, test.
    # Inputs are cut to 2 items (MAX_ITEM_LIST_LENGTH), and the rows are out of order.
    valid = [(1, [1, 2, 3], 1), (2, [2, 5], 3), (3, [4, 4], 5)]
    test = [(1, [1, 2, 3, 1], 4), (2, [2, 5, 3], 6), (3, [4, 4, 5], 6)]
    train = [(2, [2], 5), (1, [1, 2], 3), (3, [4], 4), (1, [1], 2)]
    history, popularity = training_counts(split(test + train + valid), [split(valid), split(test)])
    # Training interactions: user 1: 1, 2, 3; user 2: 2, 5; user 3: 4, 4.
    assert history.tolist() == [0, 3, 2, 2]
    # Distinct training users per item: 1 {1}, 2 {1, 2}, 3 {1}, 4 {3} (user 3's repeat counts once), 5 {2}, 6 none.
    assert popularity.tolist() == [0, 1, 2, 1, 1, 1, 0]

    config = {"llm_head_ratio": 0.5, "llm_tail_user_threshold": None, "llm_tail_item_threshold": 2}
    groups = LongTailGroups.from_split(config, split(test + train + valid), [split(valid), split(test)])
    # Histories 3, 2, 2: k = ceil(1.5) = 2, the 2nd largest is 2, so all three users are head.
    assert groups.user_threshold == 2 and groups.item_threshold == 2
    masks = groups.masks(torch.tensor([1, 2]), torch.tensor([2, 6]))
    assert masks["head_user"].tolist() == [True, True] and masks["tail_item"].tolist() == [False, True]


@pytest.mark.parametrize("model", ["SASRec", "SASRecAP"])  # RecBole's augmentation, and the all-positions one
def test_training_counts_on_a_recbole_split(tiny, model):
    # Against the raw file: ml-100k has one rating per user and item, and leave-one-out holds out 2 per user.
    # MAX_ITEM_LIST_LENGTH = 5 cuts almost every input, which must not change the counts.
    config_dict, tmp_path = tiny
    config = Config(model=model, config_dict={**config_dict, "MAX_ITEM_LIST_LENGTH": 5})
    dataset = create_dataset(config)
    _, valid_data, test_data = data_preparation(config, dataset)
    history, popularity = training_counts(dataset, [valid_data.dataset, test_data.dataset])

    lines = (tmp_path / "data" / "test" / "test.inter").read_text(encoding="utf-8").splitlines()[1:]
    raw = {(dataset.token2id("user_id", line.split("\t")[0]), dataset.token2id("item_id", line.split("\t")[1]))
           for line in lines}
    held_out = {(int(u), int(i)) for data in (valid_data, test_data)
                for u, i in zip(data.dataset.inter_feat["user_id"], data.dataset.inter_feat["item_id"])}
    assert len(held_out) == 2 * 40 and held_out <= raw
    training = raw - held_out
    assert history.tolist() == [sum(u == user for u, _ in training) for user in range(dataset.user_num)]
    assert popularity.tolist() == [sum(i == item for _, i in training) for item in range(dataset.item_num)]


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def ddp_rank(rank, port, queue):
    """Rank 0 holds rows 0, 1 (tail users), rank 1 rows 2, 3 (head users): each rank lacks one user group."""
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://localhost:{port}")
    result, _ = evaluate_batches([full_sort_batch(ROWS[2 * rank:2 * rank + 2])], single_spec=False)
    queue.put((rank, dict(result)))
    torch.distributed.destroy_process_group()


def test_ddp_ranks_agree_on_group_keys_and_values():
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(ddp_rank, args=(free_port(), queue), nprocs=2, join=True)
    results = dict(queue.get() for _ in range(2))
    assert results[0].keys() == results[1].keys()
    expected = hand_values()
    for group in GROUPS:
        for key, value in expected[group].items():
            for rank in (0, 1):
                assert results[rank][group_key(key, group)] == pytest.approx(value, abs=1e-9)


def train_and_evaluate(config_dict):
    """One SASRec run, in the launcher's order; returns the trainer and the valid (from fit) and test results."""
    config = Config(model="SASRec", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("SASRec")(config, train_data.dataset).to(config["device"])
    trainer = _build_trainer(config, model, dataset, valid_data, test_data)
    _, valid_result = trainer.fit(train_data, valid_data, verbose=False, saved=False)
    test_result = trainer.evaluate(test_data, load_best_model=False)
    return trainer, valid_result, test_result


@pytest.mark.parametrize("mode", ["full", "uni100"])
def test_end_to_end_groups_leave_overall_values_unchanged(tiny, mode):
    config, _ = tiny
    # Two epochs, so that a draw from the RNG during validation would show in the second epoch; one small batch each.
    config.update(train_neg_sample_args=None, metric_decimal_place=10, epochs=2, train_batch_size=4096,
                  MAX_ITEM_LIST_LENGTH=10, n_layers=1, n_heads=1,
                  eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": mode})
    trainer, valid_result, test_result = train_and_evaluate({**config, "llm_group_metrics": True})
    _, plain_valid, plain_test = train_and_evaluate({**config, "llm_group_metrics": False})

    assert {key: valid_result[key] for key in plain_valid} == plain_valid
    assert {key: test_result[key] for key in plain_test} == plain_test
    for result in (valid_result, test_result):
        assert set(result) == set(plain_test) | {group_key(key, g) for key in plain_test for g in GROUPS}

    # Each overall value is the row-weighted mean of its tail and head values, for users and for items.
    counts = trainer.evaluator.row_counts
    for tail, head in (("tail_user", "head_user"), ("tail_item", "head_item")):
        assert counts[tail] + counts[head] == 40  # one test row per user of the tiny dataset
        for key, overall in plain_test.items():
            mean = (counts[tail] * test_result[group_key(key, tail)] + counts[head] * test_result[group_key(key, head)])
            assert mean / 40 == pytest.approx(overall, abs=1e-8), (key, tail)
