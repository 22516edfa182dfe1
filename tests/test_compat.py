"""Each RecBole 1.2.1 compatibility fix of recbole_llm.compat, tested where it would fail without the fix."""
import os

import numpy as np
import pandas as pd
import pytest
import torch
from recbole.config import Config as RecBoleConfig
from recbole.data import create_dataset, data_preparation

import recbole_llm  # noqa: F401  (applies the fixes)
from conftest import run_python, tiny_config, write_tiny_dataset
from recbole_llm import compat, quick_start
from recbole_llm.quick_start import objective_function
from recbole_llm.utils import RecBoleLLMError


def test_recbole_config_builds_and_metrics_use_numpy_aliases(tiny):
    # RecBole's own compatibility_settings reads np.float_, removed in numpy 2.
    config, _ = tiny
    RecBoleConfig(model="SASRec", config_dict={**config, "train_neg_sample_args": None})
    assert np.float is np.float64 and np.bool is np.bool_ and np.int is np.int_
    from recbole.evaluator.metrics import NDCG

    # np.float inside NDCG: two users, the hit at rank 1 and at rank 2 -> (1 + 1/log2(3)) / 2.
    pos_index = np.array([[True, False], [False, True]])
    ndcg = NDCG({"topk": [2], "metric_decimal_place": 4}).metric_info(pos_index, np.array([1, 1]))
    assert ndcg[:, 1] == pytest.approx([1.0, 1 / np.log2(3)])


def _write_item_file_with_gaps(folder):
    (folder / "test.item").write_text(
        "item_id:token\tgenre:token_seq\tprice:float\tbrand:token\n"
        "1\tAction Drama\t10.0\tacme\n"
        "2\t\t\t\n"                      # empty sequence, missing float, missing token
        "3\tComedy\t20.0\tglobex\n",
        encoding="utf-8",
    )


def test_empty_and_missing_cells_are_filled_under_pandas3(tmp_path):
    # pandas 3 makes RecBole's chained fillna(inplace=True) a no-op and changes Series.agg(len).
    folder = write_tiny_dataset(tmp_path / "data")
    _write_item_file_with_gaps(folder)
    config = RecBoleConfig(model="BPR", config_dict=tiny_config(
        tmp_path, load_col={"inter": ["user_id", "item_id"], "item": ["item_id", "genre", "price", "brand"]}))
    dataset = create_dataset(config)

    item_id = {token: i for i, token in enumerate(dataset.field2id_token["item_id"])}
    genre, price, brand = (dataset.item_feat[f] for f in ("genre", "price", "brand"))
    genre_tokens = dataset.field2id_token["genre"]
    assert [genre_tokens[t] for t in genre[item_id["1"]] if t] == ["Action", "Drama"]
    assert [genre_tokens[t] for t in genre[item_id["3"]] if t] == ["Comedy"]
    assert genre[item_id["2"]].sum() == 0  # the empty cell is an empty (all-padding) sequence
    assert brand[item_id["2"]] == 0  # missing token -> [PAD]
    assert price[item_id["2"]] == pytest.approx(15.0)  # missing float -> mean of 10 and 20


def test_pandas2_semantics_are_scoped():
    s = pd.Series([np.array([1, 2]), np.array([3])])
    with compat.pandas2_semantics():
        assert list(s.agg(len)) == [2, 1]
    assert pd.read_csv.__name__ == "read_csv" and pd.Series.agg.__name__ == "aggregate"


def test_best_model_reload_and_resume_with_weights_only_default(tiny):
    # torch >= 2.6 refuses RecBole's checkpoints (they pickle the Config) unless the load is trusted.
    config, tmp_path = tiny
    result = objective_function(config_dict={**config, "model": "GRU4Rec", "train_neg_sample_args": None}, saved=True)
    assert 0 <= result["test_result"]["ndcg@10"] <= 1
    checkpoint = next((tmp_path / "saved").glob("GRU4Rec-*.pth"))
    with pytest.raises(Exception):
        torch.load(checkpoint)  # the unpatched default: refused
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch does not leak

    from recbole.trainer import Trainer
    from recbole_llm.config import Config
    from recbole_llm.utils import get_model

    cfg = Config(model="GRU4Rec", config_dict={**config, "train_neg_sample_args": None})
    train, _, _ = data_preparation(cfg, create_dataset(cfg))
    trainer = Trainer(cfg, get_model("GRU4Rec")(cfg, train._dataset))
    trainer.resume_checkpoint(checkpoint)
    assert trainer.start_epoch == 1


def test_no_ray_no_recbole_quick_start_and_anomaly_off(tmp_path):
    write_tiny_dataset(tmp_path / "data")
    code = (
        "import sys, torch, recbole.model.sequential_recommender\n"
        "assert torch.is_anomaly_enabled()  # RecBole's sine.py turns it on at import\n"
        "from recbole_llm.quick_start import objective_function\n"
        "assert not torch.is_anomaly_enabled()\n"
        f"objective_function(config_dict={tiny_config(tmp_path, model='SASRec', train_neg_sample_args=None)!r}, saved=False)\n"
        "assert not torch.is_anomaly_enabled()\n"
        "assert 'ray' not in sys.modules and 'recbole.quick_start' not in sys.modules, sorted(sys.modules)\n"
        "print('OK')\n"
    )
    proc = run_python(["-c", code])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]


def test_keep_freed_memory_sets_glibc_thresholds():
    assert compat.keep_freed_memory() is True


class _StopAfterConfig(Exception):
    pass


def _stop(*args):
    raise _StopAfterConfig


@pytest.mark.parametrize("mode", ["keep", "lean", "glibc"])
def test_the_launcher_sets_malloc_as_llm_malloc_names_it(tmp_path, monkeypatch, mode):
    write_tiny_dataset(tmp_path / "data")
    calls = []
    for name in ("keep", "lean"):
        monkeypatch.setitem(compat.MALLOC_MODES, name, lambda name=name: calls.append(name) or True)
    monkeypatch.setattr(quick_start, "init_seed", _stop)  # the run ends right after the malloc settings
    config = tiny_config(tmp_path, **({} if mode == "keep" else {"llm_malloc": mode}))  # keep is the default
    with pytest.raises(_StopAfterConfig):
        quick_start.run_recbole_llm(model="SASRecAP", config_dict=config)
    assert calls == ([] if mode == "glibc" else [mode])


_FREED_MB = (
    "import os, sys, torch\n"
    "from recbole_llm import compat\n"
    "assert compat.MALLOC_MODES[sys.argv[1]]()\n"
    "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20\n"
    "torch.ones(4 * 2**20).sum()  # a first 16 MB buffer, freed at once: glibc then raises its mmap threshold\n"
    "buffer = torch.ones(4 * 2**20)  # the next one, touched\n"
    "held = rss()\n"
    "del buffer\n"
    "print(held - rss())\n"
)


@pytest.mark.parametrize("mode, returned", [("lean", True), ("glibc", False), ("keep", False)])
def test_only_lean_malloc_returns_a_freed_activation_sized_buffer_to_the_os(mode, returned):
    proc = run_python(["-c", _FREED_MB, mode])  # a fresh process, as the launcher sets malloc once at its start
    assert proc.returncode == 0, proc.stderr[-2000:]
    freed_mb = float(proc.stdout.split()[-1])
    assert (freed_mb > 12) if returned else (freed_mb < 4), freed_mb


def test_unknown_llm_malloc_names_the_modes(tmp_path):
    write_tiny_dataset(tmp_path / "data")
    with pytest.raises(RecBoleLLMError, match=r"config key 'llm_malloc' must be one of keep, lean, glibc, got 'tight'"):
        quick_start.run_recbole_llm(model="SASRecAP", config_dict=tiny_config(tmp_path, llm_malloc="tight"))


def test_ensure_dir_survives_a_concurrent_creation(tmp_path, monkeypatch):
    """Two DDP ranks race between RecBole's exists-check and makedirs; the loser must not fail."""
    import importlib

    target = tmp_path / "saved"
    target.mkdir()  # the other rank won the race
    monkeypatch.setattr(os.path, "exists", lambda path: False)  # ...after this rank's check
    for module_name in compat._ENSURE_DIR_USERS:
        importlib.import_module(module_name).ensure_dir(str(target))
    assert target.is_dir()
