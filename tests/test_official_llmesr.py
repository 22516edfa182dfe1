"""benchmarks/official_llmesr.py: the official code's input files written from our side-data cache, the official
log parser and the command-line errors. One end-to-end run on the tiny dataset needs a clone of the official code
(github liuqidong07/LLM-ESR) in the folder named by LLMESR_OFFICIAL_DIR, and is skipped without it."""
import os
import pickle
import re
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO_ROOT, load_benchmark, tiny_config, write_tiny_dataset
from recbole_llm.config import Config
from recbole_llm.text import SideData
from recbole_llm.utils import create_dataset

OFFICIAL_DIR = os.environ.get("LLMESR_OFFICIAL_DIR")
ITEM_COLUMNS = {"inter": ["user_id", "item_id", "rating", "timestamp"],
                "item": ["item_id", "movie_title", "release_year", "class"]}
WIDTH = 16  # the tiny encoder's size, so the PCA to hidden_size keeps every component


@pytest.fixture(scope="module")
def official():
    return load_benchmark("official_llmesr")


@pytest.fixture(scope="module")
def exported(official, tiny_bert, tmp_path_factory):
    """(config, folder of the written files, dataset, what export_inputs returned) for the tiny dataset."""
    tmp_path = tmp_path_factory.mktemp("official")
    write_tiny_dataset(tmp_path / "data")
    # MAX_ITEM_LIST_LENGTH above every history, so that RecBole's test rows hold whole histories.
    config = Config(model="DualLLMSASRec", config_file_list=[str(REPO_ROOT / official.PROTOCOL)],
                    config_dict=tiny_config(tmp_path, llm_encoder=str(tiny_bert), hidden_size=WIDTH,
                                            load_col=ITEM_COLUMNS, MAX_ITEM_LIST_LENGTH=1000))
    dataset = create_dataset(config)
    handled = tmp_path / "handled"
    return config, handled, dataset, official.export_inputs(dataset, config, str(handled))


def _load(folder, name):
    with open(folder / name, "rb") as f:
        return pickle.load(f)


def test_inter_txt_is_recboles_remapped_histories_in_time_order(exported):
    config, handled, _, written = exported
    _, _, test = create_dataset(config).build()
    uid, iid = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    rows = zip(test.inter_feat[uid].tolist(), test.inter_feat[iid + config["LIST_SUFFIX"]].tolist(),
               test.inter_feat[config["ITEM_LIST_LENGTH_FIELD"]].tolist(), test.inter_feat[iid].tolist())
    histories = {user: items[:length] + [target] for user, items, length, target in rows}  # whole: nothing cut
    expected = [f"{user} {item}" for user in sorted(histories) for item in histories[user]]
    assert (handled / "inter.txt").read_text(encoding="utf-8").splitlines() == expected
    assert sorted(histories) == list(range(1, written["users"] + 1))  # the official user row r is user r + 1
    assert written["interactions"] == len(expected)


def test_item_and_pca_rows_are_our_cache_rows_of_the_same_item(exported):
    config, handled, dataset, written = exported
    side = SideData(config)
    item = dataset.field2token_id[dataset.iid_field]["50"]
    for name, cached in (("itm_emb_np.pkl", side.items()), ("pca64_itm_emb_np.pkl", side.pca(WIDTH))):
        rows = _load(handled, name)
        assert rows.shape == (written["items"], cached.matrix.shape[1]) and rows.dtype == np.float32
        # The official models put a zero padding row at 0 in front of the file's rows: item i is then row i.
        table = np.insert(rows, 0, 0.0, axis=0)
        np.testing.assert_array_equal(table[item], cached.matrix[cached.tokens.index("50")])
    largest = max(int(line.split()[1]) for line in (handled / "inter.txt").read_text().splitlines())
    assert written["items"] == largest == dataset.item_num - 1  # the official item count: its largest item id


def test_user_rows_and_similar_users_are_our_cache_neighbours(exported):
    config, handled, dataset, written = exported
    side = SideData(config)
    user_tokens = dataset.field2id_token[dataset.uid_field]
    similar, users = side.similar(dataset), side.users(dataset)
    neighbours, vectors = _load(handled, "sim_user_100.pkl"), _load(handled, "usr_emb_np.pkl")
    assert neighbours.shape == (written["users"], written["neighbours"]) == (40, 39)
    for row, user_neighbours in enumerate(neighbours):  # row r: user r + 1, neighbours as 0-based rows
        cached = similar.matrix[similar.tokens.index(user_tokens[row + 1])]
        assert [user_tokens[n + 1] for n in user_neighbours] == [similar.tokens[c] for c in cached]
        np.testing.assert_array_equal(vectors[row], users.matrix[users.tokens.index(user_tokens[row + 1])])


OFFICIAL_LOG = """\
2026-12-02 06:28:19,240-********** Running training **********
2026-12-02 06:28:19,240-watch_metric: NDCG@10
2026-12-02 06:28:19,371-
----------------------------------
2026-12-02 06:28:19,372-********** Epoch: 0 eval **********
2026-12-02 06:28:19,447-Overall Performance:
2026-12-02 06:28:19,447-\t NDCG@10: 0.11171
2026-12-02 06:28:19,447-\t HR@10: 0.27500
2026-12-02 06:28:19,372-********** Epoch: 1 eval **********
2026-12-02 06:28:19,447-Overall Performance:
2026-12-02 06:28:19,447-\t NDCG@10: 0.14516
2026-12-02 06:28:19,632-The best results are NDCG@10: 0.14516, HR@10: 0.32500
2026-12-02 06:28:19,632-********** Running test **********
2026-12-02 06:28:19,738-Overall Performance:
2026-12-02 06:28:19,738-\t NDCG@10: 0.03750
2026-12-02 06:28:19,738-User Group Performance:
2026-12-02 06:28:19,738-\t Short NDCG@10: 0.00000
2026-12-02 06:28:19,739-\t Tail NDCG@10: 0.01351
"""


def test_official_log_parser_reads_each_epochs_overall_valid_ndcg_and_the_test(official):
    assert official.parse_official_log(OFFICIAL_LOG) == ({0: 0.11171, 1: 0.14516}, 0.0375)
    console = re.sub(r"^\d{4}-\S+ \S+-", "", OFFICIAL_LOG, flags=re.MULTILINE)  # the console has no time prefix
    assert official.parse_official_log(console) == ({0: 0.11171, 1: 0.14516}, 0.0375)
    assert official.parse_official_log("********** Epoch: 0 eval **********\nKilled\n") == ({}, None)


def test_official_dir_that_is_not_a_clone_names_the_flag_and_the_fix(official, tmp_path, capsys):
    for present in ((), ("main.py",)):
        for name in present:
            (tmp_path / name).write_text("")
        with pytest.raises(SystemExit) as stop:
            official.parse_args(["--official_dir", str(tmp_path), "--dataset", "ml-1m-half"])
        assert stop.value.code == 2
        missing = "models/SASRec.py" if present else "main.py"
        assert re.search(rf"--official_dir '.*' is not a clone of liuqidong07/LLM-ESR \(no {missing}\); pass the "
                         r"folder of `git clone https://github.com/liuqidong07/LLM-ESR`", capsys.readouterr().err)


def test_dataset_without_side_data_is_one_line_naming_the_flag(official, tmp_path, capsys):
    clone = tmp_path / "clone"
    for name in official.OFFICIAL_FILES:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        (clone / name).write_text("")
    argv = ["--official_dir", str(clone), "--dataset", "absent", f"--data_path={tmp_path}",
            "--workdir", str(tmp_path / "work")]
    assert official.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("--dataset absent: its side data for the official code cannot be "
                                                   "built:")
    assert not (tmp_path / "work").exists()


def tiny_run_keys(tmp_path, encoder, monkeypatch):
    """The ``--key=value`` arguments of a run on the tiny dataset (written here), its workers seeing this checkout."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    write_tiny_dataset(tmp_path / "data")
    return [f"--data_path={tmp_path / 'data'}", f"--checkpoint_dir={tmp_path / 'saved'}", f"--llm_encoder={encoder}",
            f"--hidden_size={WIDTH}", f"--load_col={ITEM_COLUMNS}".replace(" ", "")]


def test_our_side_gives_the_valid_ndcg_of_every_epoch(official, tiny_bert, tmp_path, monkeypatch):
    args = SimpleNamespace(dataset="test", epochs=2, seed=42, extra=tiny_run_keys(tmp_path, tiny_bert, monkeypatch))
    ours = official.run_our_side(args, official.PAIRS["SASRec_seq"][1], "ndcg@10")
    assert "error" not in ours, ours["error"]
    assert len(ours["curve"]) == 2 and all(0 <= value <= 1 for value in ours["curve"] + [ours["test"]])
    assert ours["train_s_per_epoch"] > 0 and ours["threads"] >= 1 and ours["peak_rss_mb"] > 0


def test_cost_line_gives_each_sides_time_threads_memory_and_the_speed_up(official):
    line = official.cost_line({"train_s_per_epoch": 50.0, "threads": 1, "peak_rss_mb": 1500.4},
                              {"train_s_per_epoch": 600.0, "threads": 2, "peak_rss_mb": 11000.0})
    assert "ours 50.0 s/epoch on 1 torch thread(s), peak RSS 1,500 MB" in line
    assert "official 600.0 s/epoch on 2 torch thread(s), peak RSS 11,000 MB" in line
    assert line.endswith("ours is 12.0× as fast.")


@pytest.mark.skipif(not OFFICIAL_DIR, reason="LLMESR_OFFICIAL_DIR names no clone of liuqidong07/LLM-ESR")
def test_one_epoch_of_both_sides_on_the_tiny_dataset(official, tiny_bert, tmp_path, monkeypatch):
    out = tmp_path / "report.md"
    argv = ["--official_dir", OFFICIAL_DIR, "--dataset", "test", "--models", "DualLLMSASRec", "--epochs", "1",
            "--out", str(out), "--workdir", str(tmp_path / "work"), *tiny_run_keys(tmp_path, tiny_bert, monkeypatch)]
    assert official.main(argv) == 0
    report = out.read_text(encoding="utf-8")
    assert re.search(r"^\| 0 \| 0\.\d{4} \| 0\.\d{4} \| [+-]0\.\d{4} \|$", report, flags=re.MULTILINE)
    assert "## DualLLMSASRec" in report and OFFICIAL_DIR not in report
    assert re.search(r"^Training cost: ours [0-9.]+ s/epoch .* peak RSS [0-9,]+ MB; official .* as fast\.$", report,
                     flags=re.MULTILINE)
