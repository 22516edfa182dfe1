"""benchmarks/data_memory.py: the stages of RecBole's data pipeline and the sizes of the splits, on the tiny dataset."""
import time

from conftest import REPO_ROOT, TINY_USERS, load_benchmark, write_tiny_dataset


def test_stages_and_splits_of_the_all_positions_protocol(tmp_path, capsys):
    data_memory = load_benchmark("data_memory")
    write_tiny_dataset(tmp_path / "data")
    out, protocol = tmp_path / "memory.md", str(REPO_ROOT / "benchmarks" / "protocols" / "all_positions.yaml")
    keys = [f"--data_path={tmp_path / 'data'}", "--MAX_ITEM_LIST_LENGTH=7",
            "--load_col={'inter':['user_id','item_id','timestamp']}"]
    assert data_memory.main(["--model", "SASRecAP", "--dataset", "test", "--config_files", protocol,
                             "--out", str(out), *keys]) == 0
    stages, splits, step_seconds = data_memory.measure("SASRecAP", "test", [protocol], keys)
    assert step_seconds == []  # no training steps asked for
    assert [name for name, *_ in stages] == ["interpreter", "imports", "Config", "create_dataset",
                                             "build (augmentation, split)"]
    peaks = [peak for _, _, peak in stages]
    assert peaks == sorted(peaks) and all(current <= peak + 1 for _, current, peak in stages)
    rows = {name: (count, fields) for name, count, _, fields in splits}
    # one training row per user in all_positions mode, one valid and one test row per user
    assert {name: count for name, (count, _) in rows.items()} == {"train": TINY_USERS, "valid": TINY_USERS,
                                                                   "test": TINY_USERS}
    assert "item_id_target_list" in rows["train"][1] and "item_id_target_list" not in rows["test"][1]
    # 7 positions of int64 items, a float timestamp list, the target list: the byte count follows the shapes
    train_mb = next(mb for name, _, mb, _ in splits if name == "train")
    assert train_mb * 2 ** 20 == TINY_USERS * (8 + 8 + 4 + 8 + 7 * (8 + 4 + 8))
    report = out.read_text(encoding="utf-8")
    assert report.startswith("# Memory of the data pipeline") and "| build (augmentation, split) |" in report


def test_training_stages_follow_the_data_stages(tmp_path):
    data_memory = load_benchmark("data_memory")
    write_tiny_dataset(tmp_path / "data")
    protocol = str(REPO_ROOT / "benchmarks" / "protocols" / "all_positions.yaml")
    keys = [f"--data_path={tmp_path / 'data'}", "--MAX_ITEM_LIST_LENGTH=7", "--train_batch_size=2",
            "--load_col={'inter':['user_id','item_id','timestamp']}"]
    stages, splits, step_seconds = data_memory.measure("SASRecAP", "test", [protocol], keys, train_steps=3)
    assert len(step_seconds) == 3 and all(seconds > 0 for seconds in step_seconds)
    assert [name for name, *_ in stages][3:] == ["create_dataset", "build and dataloaders", "model and trainer",
                                                 "training step 1", "training step 3", "validation pass"]
    peaks = [peak for _, _, peak in stages]
    assert peaks == sorted(peaks)
    assert [name for name, *_ in splits] == ["train", "valid", "test"] and splits[0][1] == TINY_USERS


def test_first_batches_hand_the_trainer_a_short_epoch():
    data_memory = load_benchmark("data_memory")

    class Loader(list):
        shuffle = True

    class SlowLoader(Loader):
        def __iter__(self):  # 0.2 s to fetch each batch: not part of a step
            for batch in super().__iter__():
                time.sleep(0.2)
                yield batch

    stages = []
    batches = data_memory.FirstBatches(SlowLoader(range(5)), 3, stages)
    assert len(batches) == 3 and batches.shuffle is True  # what the trainer's epoch loop reads from the loader
    seen = []
    for batch in batches:
        seen.append(batch)
        assert len(stages) == (0 if batch == 0 else 1)  # step 1 is recorded once its step is done
        time.sleep(0.02 * (batch + 1))  # the trainer's work on this batch
    assert seen == [0, 1, 2] and [name for name, *_ in stages] == ["training step 1", "training step 3"]
    # each step's time is the consumer's work on its batch, without the loader's 0.2 s
    assert len(batches.step_seconds) == 3
    assert all(0.02 * (i + 1) <= seconds < 0.02 * (i + 1) + 0.15 for i, seconds in enumerate(batches.step_seconds))
    assert len(data_memory.FirstBatches(Loader(range(2)), 9, [])) == 2  # never more steps than the loader has


def test_step_time_line_leaves_the_first_step_out():
    data_memory = load_benchmark("data_memory")
    assert data_memory.step_time_line([0.5, 0.1, 0.3, 0.2]) == [
        "Training steps 2–4: median 0.20 s per step (step 1: 0.50 s).", ""]
    assert data_memory.step_time_line([0.5]) == []
