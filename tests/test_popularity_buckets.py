"""benchmarks/popularity_buckets.py: the buckets partition the test rows, and their metrics add up to the overall."""
import importlib.util
import sys

import pytest
import torch

from conftest import REPO_ROOT, tiny_config, write_tiny_dataset
from recbole_llm.quick_start import load_data_and_model, run

SCRIPT = REPO_ROOT / "benchmarks" / "popularity_buckets.py"


@pytest.fixture(scope="module")
def buckets_module():
    sys.path.insert(0, str(SCRIPT.parent))  # it imports compare.py beside it
    try:
        spec = importlib.util.spec_from_file_location("popularity_buckets", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("buckets")
    write_tiny_dataset(tmp_path / "data")
    # Enough training that the tiny model ranks some targets in its top 50 (non-zero NDCG).
    config = tiny_config(tmp_path, train_neg_sample_args=None, metric_decimal_place=6, epochs=8, learning_rate=0.01,
                         topk=[10, 50], metrics=["NDCG"], valid_metric="NDCG@50")
    return run("SASRecAP", "test", config_dict=config)


@pytest.fixture(scope="module")
def dual_checkpoint(tmp_path_factory):
    """A DualLLMSASRec run: both LLM-ESR views, without the distillation's neighbour search."""
    tmp_path = tmp_path_factory.mktemp("views")
    write_tiny_dataset(tmp_path / "data")
    load_col = {"inter": ["user_id", "item_id", "rating", "timestamp"],
                "item": ["item_id", "movie_title", "release_year", "class"]}
    config = tiny_config(tmp_path, load_col=load_col, metric_decimal_place=6, topk=[10, 50], metrics=["NDCG"],
                         valid_metric="NDCG@50", learning_rate=0.01, epochs=2)
    return run("DualLLMSASRec", "test", config_dict=config)["saved_model_file"]


def test_masks_by_hand(buckets_module):
    popularity = torch.tensor([0, 1, 5, 19, 20, 49, 50, 300])
    buckets = buckets_module.PopularityBuckets(popularity, [20, 50])
    masks = buckets.masks(None, torch.arange(8))
    assert list(masks) == buckets.names() == ["0-19", "20-49", "50+"]
    assert masks["0-19"].tolist() == [True, True, True, True, False, False, False, False]
    assert masks["20-49"].tolist() == [False, False, False, False, True, True, False, False]
    assert masks["50+"].tolist() == [False] * 6 + [True, True]


def test_buckets_partition_the_test_rows_and_average_to_the_overall(buckets_module, checkpoint):
    scorings, counts = buckets_module.evaluate_buckets(checkpoint["saved_model_file"], [3, 8], "ndcg@50")
    assert list(scorings) == ["model"]  # no view rows without --views
    values = scorings["model"]
    assert values["all"] == pytest.approx(checkpoint["test_result"]["ndcg@50"], abs=1e-6)  # the run's own test
    assert values["8+"] > values["all"] > 0  # the tiny model ranks only popular targets: buckets differ
    total = sum(counts.values())
    assert total > 0 and all(counts[name] > 0 for name in counts)  # the tiny data fills each bucket
    weighted = sum(values[name] * counts[name] for name in counts) / total
    assert weighted == pytest.approx(values["all"], abs=1e-5)


def test_bad_arguments_name_the_fix(buckets_module, tmp_path):
    with pytest.raises(SystemExit):
        buckets_module.parse_args(["--checkpoints", f"A={tmp_path / 'missing.pth'}"])
    with pytest.raises(SystemExit):
        buckets_module.parse_args(["--checkpoints", f"A={SCRIPT}", "--bounds", "50,20"])
    with pytest.raises(SystemExit):
        buckets_module.parse_args(["--checkpoints", f"A={SCRIPT}", "--baseline", "B"])


def test_report_has_a_row_per_label_and_the_change_against_the_baseline(buckets_module, checkpoint, tmp_path):
    path = checkpoint["saved_model_file"]
    out = tmp_path / "buckets.md"
    buckets_module.main(["--checkpoints", f"A={path}", f"A={path}", f"B={path}", "--bounds", "3,8",
                         "--metric", "ndcg@50", "--baseline", "A", "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][2:]
    assert [row[0].strip() for row in rows] == ["A", "B", "B vs A"]
    assert rows[0][1].strip() == "2" and "± 0.0000" in rows[0][2]  # the same checkpoint twice: no spread
    assert rows[2][2].strip() == "+0.0%" and rows[2][-1].strip() == "+0.0%"  # B is A's checkpoint
    assert rows[2][3].strip() == "—"  # no change is defined against a zero NDCG


def test_each_view_alone_scores_its_own_dot_product_and_the_model_is_restored(buckets_module, dual_checkpoint):
    _, model, _, _, _, test_data = load_data_and_model(dual_checkpoint, console_log=False)
    model.eval()
    batch = next(iter(test_data))[0]
    with torch.no_grad():
        full = model.full_sort_predict(batch)  # also fills the evaluation's cached item matrix
        alone = {}
        for view in buckets_module.VIEWS:
            with buckets_module.one_view(model, view):
                alone[view] = model.full_sort_predict(batch)
        assert torch.equal(model.full_sort_predict(batch), full)
    id_view, semantic_view = (alone[view] for view in buckets_module.VIEWS)
    assert torch.allclose(id_view + semantic_view, full, atol=1e-4)  # the score is the sum of the two dot products
    assert not torch.allclose(id_view, full, atol=1e-3) and not torch.allclose(semantic_view, full, atol=1e-3)
    users = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    width = model.view_size
    expected = users[:, :width] @ model.item_embedding.weight[: model.n_items].T
    assert torch.allclose(id_view, expected, atol=1e-4)


def test_views_add_rows_for_llmesr_checkpoints_only(buckets_module, dual_checkpoint, checkpoint, tmp_path):
    out = tmp_path / "views.md"
    buckets_module.main(["--checkpoints", f"S={checkpoint['saved_model_file']}", f"D={dual_checkpoint}",
                         "--bounds", "3,8", "--metric", "ndcg@50", "--baseline", "S", "--views", "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][2:]
    assert [row[0].strip() for row in rows] == ["S", "D", "D vs S", "D, ID view only", "D, semantic view only"]
    assert len({rows[i][2] for i in (1, 3, 4)}) == 3  # each scoring of D ranks differently
    with pytest.raises(SystemExit, match="none of the checkpoints is an LLM-ESR model"):
        buckets_module.main(["--checkpoints", f"S={checkpoint['saved_model_file']}", "--views"])


def test_log_target_shares_by_hand():
    from types import SimpleNamespace

    from recbole_llm.model.layers import log_target_shares
    split = SimpleNamespace(inter_feat={"targets": torch.tensor([[1, 2, 0], [2, 2, 0]])}, item_num=4)
    counts = torch.tensor([0, 1, 3, 0], dtype=torch.float64) + 1  # padding 0 not counted; add-one smoothing
    expected = torch.log(counts / counts.sum()).float()
    assert torch.allclose(log_target_shares(split, "targets"), expected)


def test_rank_adjustment_shifts_every_item_score_and_restores_the_model(buckets_module, checkpoint):
    config, model, _, _, _, test_data = load_data_and_model(checkpoint["saved_model_file"], console_log=False)
    model.eval()
    batch = next(iter(test_data))[0]
    shift = torch.arange(model.n_items, dtype=torch.float32) / 7
    rows = batch[:5]
    rows[model.ITEM_ID] = torch.tensor([1, 2, 3, 4, 5])
    with torch.no_grad():
        full, per_row = model.full_sort_predict(batch), model.predict(rows)
        with buckets_module.rank_adjusted(model, shift):
            assert torch.allclose(model.full_sort_predict(batch), full - shift, atol=1e-6)
            assert torch.allclose(model.predict(rows), per_row - shift[1:6], atol=1e-6)
        assert torch.equal(model.full_sort_predict(batch), full) and torch.equal(model.predict(rows), per_row)


def test_a_large_rank_adjustment_moves_the_top_ten_to_the_least_popular_items(buckets_module, checkpoint):
    scorings, counts = buckets_module.evaluate_buckets(checkpoint["saved_model_file"], [3, 8], "ndcg@10",
                                                       taus=[1e-6, 1e4])
    own, tiny_shift, huge_shift = (scorings[key] for key in ("model", "rank adjustment 1e-06", "rank adjustment 10000"))
    assert tiny_shift == pytest.approx(own, abs=1e-4)  # a tau near 0 keeps the model's own ranking
    assert own["8+"] > 0 and huge_shift["8+"] == 0  # popular targets leave the top ten
    assert huge_shift["0-2"] >= own["0-2"]


def test_rank_adjustment_rows_and_errors(buckets_module, checkpoint, tmp_path):
    path, out = checkpoint["saved_model_file"], tmp_path / "adjusted.md"
    buckets_module.main(["--checkpoints", f"A={path}", "--bounds", "8", "--metric", "ndcg@10", "--baseline", "A",
                         "--rank_adjustment", "0.5", "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][2:]
    assert [row[0].strip() for row in rows] == ["A", "A, rank adjustment 0.5", "A, rank adjustment 0.5 vs A"]
    for bad in ("0,0.5", "x"):
        with pytest.raises(SystemExit):
            buckets_module.parse_args(["--checkpoints", f"A={SCRIPT}", "--rank_adjustment", bad])
