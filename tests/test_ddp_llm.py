"""The LLM models under two gloo processes: a result of the right shape and one checkpoint that reloads."""
import json

import pytest

from conftest import run_python, tiny_config, write_tiny_dataset, write_yaml
from recbole_llm.quick_start import load_data_and_model, run
from test_ddp import free_port

ITEM_COLUMNS = {"inter": ["user_id", "item_id", "rating", "timestamp"],
                "item": ["item_id", "movie_title", "release_year", "class"]}
METRICS = {"metrics": ["Recall", "NDCG"], "topk": [5, 10], "valid_metric": "NDCG@10"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The tiny dataset, and a SASRecAP checkpoint whose item table SLMRec reads."""
    path = tmp_path_factory.mktemp("ddp_llm")
    write_tiny_dataset(path / "data")
    run("SASRecAP", "test", config_dict=tiny_config(path, llm_checkpoint_name="sasrec.pth"))
    return path


def model_keys(workdir, model):
    if model == "LLMESR_SASRec":
        return {"load_col": ITEM_COLUMNS}
    if model == "HLLM":  # frozen 1-layer MiniLM items, a 1-layer user Llama
        return {"hllm_item_num_layers": 1, "hllm_item_prompt": "", "hllm_max_text_length": 16,
                "hllm_user_num_layers": 1, "hllm_user_hidden_size": 16, "hllm_user_inner_size": 32,
                "hllm_num_negatives": 32, "train_batch_size": 20}
    return {"slmrec_item_emb_checkpoint": str(workdir / "saved" / "sasrec.pth"), "slmrec_n_layers": 1,
            "slmrec_instruction": "Next item?\n", "MAX_ITEM_LIST_LENGTH": 10, "slmrec_lora_r": 4,
            "slmrec_lora_alpha": 8, "train_batch_size": 8, "eval_batch_size": 64}


@pytest.mark.parametrize("model", ["LLMESR_SASRec", "HLLM", "SLMRec"])
def test_two_process_run_returns_a_result_and_one_checkpoint_that_reloads(workdir, model):
    saved = workdir / f"saved-{model}"
    values = tiny_config(workdir, checkpoint_dir=str(saved), **METRICS, **model_keys(workdir, model))
    config_file = write_yaml(workdir / f"{model}.yaml", values)
    proc = run_python(["run_recbole_llm.py", f"--model={model}", "--dataset=test", f"--config_files={config_file}",
                       "--nproc=2", f"--port={free_port()}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("test result: "))
    result = json.loads(line[len("test result: "):])
    assert {"recall@10", "ndcg@10"} <= set(result) and all(0 <= value <= 1 for value in result.values())
    checkpoints = list(saved.glob("*.pth"))
    assert len(checkpoints) == 1  # rank 0 saves; both ranks name the same file
    config, reloaded, *_ = load_data_and_model(str(checkpoints[0]))
    assert config["model"] == model and type(reloaded).__name__ == model


@pytest.mark.parametrize("model", ["HLLM", "SLMRec"])
def test_fsdp_shards_the_llm_and_trains_as_ddp_does(workdir, model):
    """One epoch under FSDP and under DDP from the same init ends at the same weights (up to float sums)."""
    import torch

    from recbole_llm.utils import read_checkpoint

    states, output = {}, ""
    for sharding in ("none", "fsdp"):
        saved = workdir / f"saved-{model}-{sharding}"
        values = tiny_config(workdir, checkpoint_dir=str(saved), llm_sharding=sharding, state="INFO", **METRICS,
                             **model_keys(workdir, model))
        config_file = write_yaml(workdir / f"{model}-{sharding}.yaml", values)
        proc = run_python(["run_recbole_llm.py", f"--model={model}", "--dataset=test", f"--config_files={config_file}",
                           "--nproc=2", f"--port={free_port()}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        output = proc.stdout + proc.stderr
        (checkpoint,) = saved.glob("*.pth")
        states[sharding] = read_checkpoint(str(checkpoint))["state_dict"]
        config, reloaded, *_ = load_data_and_model(str(checkpoint))  # one process reads the full state dict
        assert type(reloaded).__name__ == model
    assert "llm_sharding fsdp: " in output  # the last run was sharded
    assert states["fsdp"].keys() == states["none"].keys()
    for key, value in states["none"].items():
        torch.testing.assert_close(states["fsdp"][key], value, atol=1e-5, rtol=1e-4, msg=key)
