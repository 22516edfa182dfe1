"""Faults that real machines cause: damaged cache files, concurrent builders, bad checkpoints, killed runs."""
import json
import logging
import multiprocessing
import time

import numpy as np
import pytest

from recbole_llm.text.cache import CacheEntry
from recbole_llm.utils import RecBoleLLMError

KEY = {"kind": "test", "version": 1}


def _matrix():
    return np.arange(12, dtype=np.float32).reshape(4, 3), ["a", "b", "c", "d"]


def _built_entry(tmp_path):
    entry = CacheEntry(tmp_path / "cache", "items")
    entry.get(KEY, _matrix)
    return entry


def _truncate_npy(entry):
    entry.matrix_file.write_bytes(entry.matrix_file.read_bytes()[:100])


def _drop_last_token(entry):
    entry.tokens_file.write_text("a\nb\nc\n", encoding="utf-8")


def _break_json(entry):
    entry.meta_file.write_text('{"key": {"kind": ', encoding="utf-8")


def _flip_a_byte(entry):
    data = bytearray(entry.matrix_file.read_bytes())
    data[-1] ^= 0xFF  # same size, other values: only the checksum tells
    entry.matrix_file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, named", [(_truncate_npy, "items.npy"), (_drop_last_token, "items.tokens.txt"),
                                           (_break_json, "items.json"), (_flip_a_byte, "items.npy")])
def test_a_damaged_entry_is_rebuilt_with_one_warning_naming_the_file(tmp_path, caplog, damage, named):
    entry = _built_entry(tmp_path)
    damage(entry)
    builds = []
    with caplog.at_level(logging.WARNING, logger="recbole_llm.text.cache"):
        matrix, tokens, built = entry.get(KEY, lambda: builds.append(1) or _matrix())
    assert built and builds == [1]
    np.testing.assert_array_equal(matrix, _matrix()[0])
    assert tokens == _matrix()[1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and named in warnings[0] and "rebuilding" in warnings[0]
    assert not entry.get(KEY, _matrix)[2]  # the rebuilt entry passes its checks


def test_a_damaged_entry_that_cannot_be_rebuilt_is_one_error_naming_the_file(tmp_path):
    entry = _built_entry(tmp_path)
    _truncate_npy(entry)

    def encoder_gone():
        raise OSError("no model weights in /models/encoder")

    with pytest.raises(RecBoleLLMError, match=r"items\.npy has 100 bytes where \d+ were written, and it cannot be "
                                              r"rebuilt: no model weights .*Restore the file"):
        entry.get(KEY, encoder_gone)


def test_an_intact_entry_is_read_without_building(tmp_path):
    entry = _built_entry(tmp_path)
    meta = json.loads(entry.meta_file.read_text(encoding="utf-8"))
    assert set(meta["files"]) == {"matrix", "tokens"} and meta["files"]["matrix"]["bytes"] > 0
    assert not entry.get(KEY, lambda: pytest.fail("an intact entry was rebuilt"))[2]


def _slow_builder(folder, log_file, barrier):
    """Wait for the other process, then get the entry with a build that takes long enough to overlap."""
    def build():
        with open(log_file, "a", encoding="utf-8") as f:
            f.write("built\n")
        time.sleep(1.0)
        return _matrix()

    barrier.wait()
    matrix, tokens, _ = CacheEntry(folder, "items").get(KEY, build)
    assert tokens == _matrix()[1] and np.array_equal(matrix, _matrix()[0])


def test_two_processes_building_one_entry_build_it_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, log_file = context.Barrier(2), tmp_path / "builds.log"
    workers = [context.Process(target=_slow_builder, args=(tmp_path / "cache", log_file, barrier)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert log_file.read_text(encoding="utf-8") == "built\n"  # the second one waited, then loaded the first's
    assert not CacheEntry(tmp_path / "cache", "items").get(KEY, _matrix)[2]


# --- checkpoints --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A SASRec checkpoint of one tiny epoch, and the config dict it was trained with."""
    from conftest import tiny_config, write_tiny_dataset
    from recbole_llm.quick_start import run

    tmp_path = tmp_path_factory.mktemp("faults")
    write_tiny_dataset(tmp_path / "data")
    config = tiny_config(tmp_path, train_neg_sample_args=None,
                         load_col={"inter": ["user_id", "item_id", "rating", "timestamp"],
                                   "item": ["item_id", "movie_title"]})
    return run("SASRec", "test", config_dict=config)["saved_model_file"], config


def _truncated(path, tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(open(path, "rb").read()[:1000])
    return bad


def _foreign(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("these are not weights\n", encoding="utf-8")
    return bad


@pytest.mark.parametrize("make_bad", ["truncated", "foreign"])
def test_a_bad_checkpoint_is_one_error_naming_the_file(checkpoint, tmp_path, make_bad):
    from recbole_llm.model.sequential_recommender.slmrec import sasrec_item_table
    from recbole_llm.quick_start import load_data_and_model
    from recbole_llm.trainer.reclora import _crm_checkpoint
    from recbole_llm.trainer.slmrec import load_teacher

    bad = str(_truncated(checkpoint[0], tmp_path) if make_bad == "truncated" else _foreign(tmp_path))
    message = r"'{}' is not a readable torch file: it is truncated or of another kind \(\w+".format(bad)
    with pytest.raises(RecBoleLLMError, match="checkpoint " + message):
        load_data_and_model(bad)
    with pytest.raises(RecBoleLLMError, match="slmrec_teacher_checkpoint " + message):
        load_teacher({"slmrec_teacher_checkpoint": bad}, None)
    with pytest.raises(RecBoleLLMError, match="reclora_crm_checkpoint " + message):
        _crm_checkpoint({"reclora_crm_checkpoint": bad})
    with pytest.raises(RecBoleLLMError, match="slmrec_item_emb_checkpoint: checkpoint " + message):
        sasrec_item_table({"slmrec_item_emb_checkpoint": bad}, None)


def test_recommend_prints_one_line_for_a_bad_checkpoint_and_no_config_dump(checkpoint, tmp_path):
    from conftest import run_python

    proc = run_python(["-m", "recbole_llm.recommend", "--checkpoint", str(_truncated(checkpoint[0], tmp_path)),
                       "--user", "7"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "is not a readable torch file" in proc.stderr
    proc = run_python(["-m", "recbole_llm.recommend", "--checkpoint", checkpoint[0], "--user", "7", "--topk", "3"])
    assert proc.returncode == 0 and proc.stderr == ""  # RecBole's config dump and warnings went to the log file
    assert len(proc.stdout.splitlines()) == 4  # the heading and three items


@pytest.mark.parametrize("args, message", [
    (["--user", "no-such-user"], "unknown user_id no-such-user"),
    (["--items", "1,999999"], "unknown item_id 999999"),
    (["--items", " , "], "--items is empty"),
    (["--user", "7", "--topk", "0"], "--topk must be at least 1"),
])
def test_recommend_edge_cases_get_one_clear_line(checkpoint, args, message, capsys):
    from recbole_llm.recommend import main

    assert main(["--checkpoint", checkpoint[0], *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_recommend_topk_beyond_the_unseen_items_lists_only_unseen_ones(checkpoint, capsys):
    from recbole_llm.quick_start import load_data_and_model
    from recbole_llm.recommend import main, user_history
    from recbole_llm.utils import create_dataset

    config, *_ = load_data_and_model(checkpoint[0])
    dataset = create_dataset(config)
    unseen = dataset.item_num - 1 - len(set(user_history(dataset, dataset.field2token_id["user_id"]["7"])))
    capsys.readouterr()
    assert main(["--checkpoint", checkpoint[0], "--user", "7", "--topk", "100000"]) == 0
    out, err = capsys.readouterr()
    assert f"only {unseen} items are not in the history" in err
    assert len(out.splitlines()) == unseen + 1 and "-inf" not in out


KILLED_SAVE = """
import os, signal, sys, torch
from conftest import tiny_config
from recbole_llm.quick_start import run

real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    with open(f, "r+b") as handle:  # the process dies with half the file written
        handle.truncate(os.path.getsize(f) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
run("SASRec", "test", config_dict={config!r})
"""


def test_runs_started_in_the_same_second_get_checkpoints_of_their_own(checkpoint):
    """RecBole names a best model '<model>-<time>.pth' to the second; parallel seeds would share one file and
    then test the same model. The launcher's default name adds a random part, chosen once per launch."""
    import re
    from pathlib import Path

    from recbole_llm.quick_start import default_checkpoint_name

    names = {default_checkpoint_name("SASRec") for _ in range(20)}
    assert len(names) == 20 and all(re.fullmatch(r"SASRec-.+-[0-9a-f]{6}\.pth", name) for name in names)
    assert re.fullmatch(r"SASRec-.+-[0-9a-f]{6}\.pth", Path(checkpoint[0]).name)  # run() uses it


def test_a_run_killed_while_saving_leaves_no_checkpoint_under_its_name(checkpoint, tmp_path):
    from conftest import REPO_ROOT, run_python
    from recbole_llm.quick_start import load_data_and_model, run

    config = {**checkpoint[1], "checkpoint_dir": str(tmp_path / "saved"), "llm_checkpoint_name": "model.pth"}
    code = KILLED_SAVE.format(config=config)
    proc = run_python(["-c", f"import sys; sys.path.insert(0, {str(REPO_ROOT / 'tests')!r})\n" + code])
    assert proc.returncode == -9
    assert not (tmp_path / "saved" / "model.pth").exists()  # only a temporary file, which nothing reads

    result = run("SASRec", "test", config_dict=config)  # the same command again
    assert result["saved_model_file"].endswith("model.pth")
    assert load_data_and_model(result["saved_model_file"])[1] is not None


KILLED_CACHE_WRITE = """
import os, signal
import numpy as np
from recbole_llm.text import cache

def save_then_die(f, matrix):
    f.write(b"half a matrix")
    os.kill(os.getpid(), signal.SIGKILL)
cache.np.save = save_then_die
cache.CacheEntry({folder!r}, "items").get({key!r}, lambda: (np.ones((4, 3), dtype=np.float32), list("abcd")))
"""


def test_a_build_killed_while_writing_leaves_no_entry_a_later_run_reads(tmp_path):
    from conftest import run_python

    folder = tmp_path / "cache"
    proc = run_python(["-c", KILLED_CACHE_WRITE.format(folder=str(folder), key=KEY)])
    assert proc.returncode == -9
    assert not (folder / "items.npy").exists() and not (folder / "items.json").exists()
    matrix, tokens, built = CacheEntry(folder, "items").get(KEY, _matrix)
    assert built and tokens == _matrix()[1]
