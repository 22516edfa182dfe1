"""History exclusion (llm_exclude_history): hand-made rankings, the real split, full ranking and uniN."""
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from recbole.data import data_preparation

from conftest import tiny_config, write_tiny_dataset
from recbole_llm.config import Config
from recbole_llm.evaluator import PhaseHistories
from recbole_llm.quick_start import _build_trainer
from recbole_llm.utils import RecBoleLLMError, create_dataset, get_model, recbole_time_order

N_ITEMS = 7  # ids 0 ([PAD]) .. 6


def keys(pairs):
    return torch.tensor([user * N_ITEMS + item for user, item in pairs])


def hand_histories():
    """User 1 trained on items 2 and 3, validated on 4, tested on 5; user 2 trained on 6, validated on 1, tested
    on 2."""
    return PhaseHistories(3, N_ITEMS, keys([(1, 2), (1, 3), (2, 6)]), keys([(1, 4), (2, 1)]), keys([(1, 5), (2, 2)]))


def ndcg_at_10(scores, target):
    rank = int((scores > scores[target]).sum())  # 0-based
    return 1 / math.log2(rank + 2) if rank < 10 else 0.0


def test_masking_a_hand_made_ranking_gives_the_hand_computed_ndcg():
    histories = hand_histories()
    # User 1 at test: items 2, 3 (training) and 4 (validation) outscore the target 5.
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.8, 0.7, 0.6, 0.2]])
    assert ndcg_at_10(scores[0], 5) == pytest.approx(1 / math.log2(5))  # rank 4 unmasked
    histories.mask(scores, torch.tensor([1]), "test")
    assert torch.isinf(scores[0, [2, 3, 4]]).all() and scores[0, 5] == 0.6
    assert ndcg_at_10(scores[0], 5) == 1.0
    # At validation only the training items go: the target 4 is then second, behind the test item 5.
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.8, 0.7, 0.75, 0.2]])
    histories.mask(scores, torch.tensor([1]), "valid")
    assert ndcg_at_10(scores[0], 4) == pytest.approx(1 / math.log2(3))
    assert not torch.isinf(scores[0, 5])  # the test item is not history at validation


def test_each_row_gets_its_own_users_history():
    rows, items = hand_histories().excluded_rows_and_items(torch.tensor([2, 1, 2, 0]), "test")
    excluded = defaultdict(set)
    for row, item in zip(rows.tolist(), items.tolist()):
        excluded[row].add(item)
    assert dict(excluded) == {0: {6, 1}, 1: {2, 3, 4}, 2: {6, 1}}  # user 0 ([PAD]) has none


def test_a_target_that_was_also_a_training_item_is_not_masked():
    histories = PhaseHistories(2, N_ITEMS, keys([(1, 3), (1, 5)]), keys([(1, 4)]), keys([(1, 5)]))
    rows, items = histories.excluded_rows_and_items(torch.tensor([1]), "test")
    assert sorted(items.tolist()) == [3, 4]  # 5 is the test target: ranked, as RecBole's general models do
    assert histories.used_ids("test")[1] == {3, 4, 5}


# --- on the tiny dataset, through the trainer -------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("history")
    write_tiny_dataset(path / "data")
    return path


def raw_histories(data_dir):
    """{raw user: raw items in time order} from the atomic file."""
    rows = [line.split("\t") for line in (Path(data_dir) / "data" / "test" / "test.inter").read_text().splitlines()[1:]]
    by_user = defaultdict(list)
    for user, item, _, time in rows:
        by_user[user].append((float(time), item))
    result = {}
    for user, events in by_user.items():
        order = recbole_time_order([t for t, _ in events])
        result[user] = [events[i][1] for i in order]
    return result


def trainer_and_loaders(data_dir, exclude, mode="full", model="SASRecAP"):
    values = tiny_config(data_dir, llm_exclude_history=exclude, eval_args={"split": {"LS": "valid_and_test"},
                                                                            "order": "TO", "mode": mode})
    config = Config(model=model, config_dict=values)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    torch.manual_seed(0)
    net = get_model(model)(config, train._dataset).eval()
    return _build_trainer(config, net, dataset, valid, test), valid, test, dataset


def test_histories_are_the_training_items_then_training_and_validation_items(data_dir):
    trainer, _, _, dataset = trainer_and_loaders(data_dir, True)
    raw = raw_histories(data_dir)
    token = dataset.field2token_id[dataset.iid_field]
    for user_token in ("1", "7", "40"):
        user = dataset.field2token_id[dataset.uid_field][user_token]
        items = [token[t] for t in raw[user_token]]
        for phase, earlier in (("valid", items[:-2]), ("test", items[:-1])):
            _, excluded = trainer.histories.excluded_rows_and_items(torch.tensor([user]), phase)
            assert set(excluded.tolist()) == set(earlier) - {items[-2] if phase == "valid" else items[-1]}


def topk_items_by_user(trainer, loader):
    """Evaluate ``loader`` and return {user id: top-10 item ids} as the collector saw them."""
    seen = {}
    collect = trainer.eval_collector.eval_batch_collect

    def recording(scores, interaction, positive_u, positive_i):
        top = scores.topk(10, dim=-1).indices
        for user, items in zip(interaction[trainer.config["USER_ID_FIELD"]].tolist(), top.tolist()):
            seen[user] = items
        return collect(scores, interaction, positive_u, positive_i)

    trainer.eval_collector.eval_batch_collect = recording
    result = trainer.evaluate(loader, load_best_model=False, show_progress=False)
    return seen, result


@pytest.mark.parametrize("exclude", [False, True])
def test_full_ranking_never_ranks_a_history_item_when_excluding(data_dir, exclude):
    trainer, valid, test, dataset = trainer_and_loaders(data_dir, exclude)
    for loader, phase in ((valid, "valid"), (test, "test")):
        top, result = topk_items_by_user(trainer, loader)
        histories = PhaseHistories.from_split(dataset, valid.dataset, test.dataset)
        in_history = 0
        for user, items in top.items():
            _, excluded = histories.excluded_rows_and_items(torch.tensor([user]), phase)
            in_history += len(set(items) & set(excluded.tolist()))
        assert (in_history == 0) if exclude else (in_history > 0)  # an untrained model ranks seen items
        assert "ndcg@10[tail_item]" in result  # the group metrics read the masked scores


def test_sampled_negatives_exclude_the_history(data_dir):
    for exclude in (False, True):
        trainer, valid, test, dataset = trainer_and_loaders(data_dir, exclude, mode="uni50")
        histories = PhaseHistories.from_split(dataset, valid.dataset, test.dataset)
        clashes = 0
        for loader, phase in ((valid, "valid"), (test, "test")):
            used = histories.used_ids(phase)
            for interaction, *_ in loader:
                seen = set()
                for user, item in zip(interaction["user_id"].tolist(), interaction["item_id"].tolist()):
                    if user in seen:  # a user's rows: its target first, then its negatives
                        clashes += item in used[user]
                    seen.add(user)
        assert (clashes == 0) if exclude else (clashes > 0)


def test_an_unknown_loader_is_refused(data_dir):
    trainer, valid, _, _ = trainer_and_loaders(data_dir, True)
    with pytest.raises(RecBoleLLMError, match="valid and test loaders only"):
        trainer.evaluate(object())
