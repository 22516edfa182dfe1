"""benchmarks/data_memory.py: the stages of RecBole's data pipeline and the sizes of the splits, on the tiny dataset."""
from conftest import REPO_ROOT, TINY_USERS, load_benchmark, write_tiny_dataset


def test_stages_and_splits_of_the_all_positions_protocol(tmp_path, capsys):
    data_memory = load_benchmark("data_memory")
    write_tiny_dataset(tmp_path / "data")
    out, protocol = tmp_path / "memory.md", str(REPO_ROOT / "benchmarks" / "protocols" / "all_positions.yaml")
    keys = [f"--data_path={tmp_path / 'data'}", "--MAX_ITEM_LIST_LENGTH=7",
            "--load_col={'inter':['user_id','item_id','timestamp']}"]
    assert data_memory.main(["--model", "SASRecAP", "--dataset", "test", "--config_files", protocol,
                             "--out", str(out), *keys]) == 0
    stages, splits = data_memory.measure("SASRecAP", "test", [protocol], keys)
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
    stages, splits = data_memory.measure("SASRecAP", "test", [protocol], keys, train_steps=3)
    assert [name for name, *_ in stages][3:] == ["create_dataset", "build and dataloaders", "model and trainer",
                                                 "training step 1", "training step 3", "validation pass"]
    peaks = [peak for _, _, peak in stages]
    assert peaks == sorted(peaks)
    assert [name for name, *_ in splits] == ["train", "valid", "test"] and splits[0][1] == TINY_USERS
