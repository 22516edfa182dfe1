"""Stock RecBole models run through our launcher give exactly the numbers of RecBole's own run_recbole."""
import json

import pytest

from conftest import REPO_ROOT, run_python, tiny_config, write_tiny_dataset, write_yaml
from recbole_llm.evaluator import GROUPS, group_key

# CE-trained sequential models take no negatives; BPR (a general model) samples one per positive.
MODELS = {"SASRec": {"train_neg_sample_args": None}, "GRU4Rec": {"train_neg_sample_args": None},
          "BERT4Rec": {"train_neg_sample_args": None}, "BPR": {}}


def launcher_result(model, config_file):
    proc = run_python(["run_recbole_llm.py", f"--model={model}", "--dataset=test", f"--config_files={config_file}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if line.startswith(("best valid", "test result")))
    return {"valid": json.loads(lines["best valid"]), "test": json.loads(lines["test result"])}


def reference_result(model, config_file):
    proc = run_python([str(REPO_ROOT / "tests" / "recbole_reference.py"), model, "test", str(config_file)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("model", sorted(MODELS))
def test_launcher_matches_run_recbole(tmp_path, model):
    write_tiny_dataset(tmp_path / "data")
    config = tiny_config(tmp_path, epochs=2, **MODELS[model])
    config_file = write_yaml(tmp_path / "config.yaml", config)

    ours, theirs = launcher_result(model, config_file), reference_result(model, config_file)

    metric_keys = {"recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr@5", "mrr@10", "hit@5", "hit@10"}
    # Our launcher adds the long-tail group keys (llm_group_metrics, on by default) for sequential models only.
    group_keys = {group_key(key, group) for key in metric_keys for group in GROUPS} if model != "BPR" else set()
    for split in ("valid", "test"):
        assert set(ours[split]) == metric_keys | group_keys
    overall = {split: {key: ours[split][key] for key in metric_keys} for split in ("valid", "test")}
    assert overall == theirs
    # Two runs that both produced nothing would agree too: make sure something was ranked.
    assert max(list(ours["valid"].values()) + list(ours["test"].values())) > 0
