"""Two gloo processes on the CPU through our spawn path: the result comes back and the checkpoint is shared."""
import json
import socket

import pytest

from conftest import run_python, tiny_config, write_tiny_dataset, write_yaml


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("exclude_history", [False, True])
def test_two_process_gloo_run_returns_result(tmp_path, exclude_history):
    write_tiny_dataset(tmp_path / "data")
    config_file = write_yaml(tmp_path / "ddp.yaml", tiny_config(tmp_path, train_neg_sample_args=None, epochs=2,
                                                                llm_exclude_history=exclude_history))
    proc = run_python(["run_recbole_llm.py", "--model=SASRec", "--dataset=test", f"--config_files={config_file}",
                       "--nproc=2", f"--port={free_port()}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    test_line = next(line for line in proc.stdout.splitlines() if line.startswith("test result: "))
    test_result = json.loads(test_line[len("test result: "):])
    assert set(test_result) >= {"ndcg@10", "hit@10"} and all(0 <= v <= 1 for v in test_result.values())
    # One best-model file for both ranks (each would otherwise stamp its own clock into the name).
    assert len(list((tmp_path / "saved").glob("SASRec-*.pth"))) == 1
