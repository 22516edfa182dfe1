"""Bad input gets one clear line naming the file or key and the fix, never a traceback or a hang."""
import re
import time

import pytest
import torch

from conftest import run_python, tiny_config, write_tiny_dataset
from recbole_llm import utils
from recbole_llm.config import Config
from recbole_llm.quick_start import load_data_and_model, run
from recbole_llm.utils import RecBoleLLMError, create_dataset

SEQ = {"train_neg_sample_args": None}


def test_unknown_model_is_one_line_listing_models():
    proc = run_python(["run_recbole_llm.py", "--model=SASRc"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'SASRc'" in lines[0] and "SASRec" in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_dataset_names_path(tmp_path):
    config = Config(model="SASRec", config_dict=tiny_config(tmp_path, dataset="nothere"))
    with pytest.raises(RecBoleLLMError, match=r"dataset 'nothere' not found: .*nothere\.inter does not exist"):
        create_dataset(config)


def test_ml1m_offline_fails_fast_naming_the_converter(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "_reachable", lambda url, timeout=3.0: False)
    config = Config(model="SASRec", config_dict=tiny_config(tmp_path, dataset="ml-1m"))
    start = time.monotonic()
    with pytest.raises(RecBoleLLMError, match=r"no network to download it.*python -m recbole_llm\.data\.convert_ml1m"):
        create_dataset(config)
    assert time.monotonic() - start < 5


def test_yaml_that_does_not_parse_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nmetrics: [Recall, NDCG\ntopk: 10\n", encoding="utf-8")
    with pytest.raises(RecBoleLLMError, match=r"config file '.*bad\.yaml' is not valid YAML at line \d+"):
        Config(model="SASRec", dataset="ml-100k", config_file_list=[str(bad)])


def test_missing_config_file(tmp_path):
    with pytest.raises(RecBoleLLMError, match=r"config file '.*nope\.yaml' does not exist"):
        Config(model="SASRec", dataset="ml-100k", config_file_list=[str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("key, value, expected", [
    ("epochs", "ten", "int"), ("learning_rate", "fast", "float"), ("reproducibility", 3, "bool"),
    ("eval_args", "full", "dict"), ("n_layers", 1.5, "int"),
])
def test_value_of_wrong_type_names_key(key, value, expected):
    with pytest.raises(RecBoleLLMError, match=rf"config key '{key}' must be {expected}.*from the config_dict"):
        Config(model="SASRec", dataset="ml-100k", config_dict={key: value, **SEQ})


def test_values_of_right_type_pass():
    config = Config(model="SASRec", dataset="ml-100k",
                    config_dict={"epochs": 3, "learning_rate": 1, "topk": 10, "metrics": "NDCG", "gpu_id": 0})
    assert config["learning_rate"] == 1 and config["topk"] == [10]


@pytest.mark.parametrize("model, key, hint", [
    ("LLMESR_SASRec", "llmesr_distil", " (did you mean 'llmesr_distill'?)"),  # a typo
    ("SASRecAP", "llmesr_distill", ""),  # LLM-ESR's key on a model that has no such switch
])
def test_plugin_key_the_model_does_not_declare_names_key(model, key, hint):
    """RecBole would take any key and ignore it; a plugin key that changes nothing is an error instead."""
    message = f"config key '{key}' from the config_dict is not a key of {model}{hint};"
    with pytest.raises(RecBoleLLMError, match=re.escape(message)):
        Config(model=model, dataset="ml-100k", config_dict={key: False})


def test_plugin_key_of_another_model_in_a_shared_config_file_is_accepted(tmp_path):
    """A protocol file serves several models, each reading its own keys, so files are not checked."""
    shared = tmp_path / "protocol.yaml"
    shared.write_text("llmesr_distill: false\n", encoding="utf-8")
    config = Config(model="SASRecAP", dataset="ml-100k", config_file_list=[str(shared)])
    assert config["llmesr_distill"] is False


def test_wrong_type_from_command_line_through_launcher():
    proc = run_python(["run_recbole_llm.py", "--model=SASRec", "--epochs=ten"])
    assert proc.returncode == 2
    assert "config key 'epochs' must be int, got 'ten' (str) from the command line" in proc.stderr


def test_checkpoint_of_another_model_is_refused(tiny):
    config, tmp_path = tiny
    result = run("SASRec", "test", config_dict={**config, **SEQ})
    checkpoint = torch.load(result["saved_model_file"], weights_only=False)
    checkpoint["config"]["model"] = "GRU4Rec"  # a SASRec state dict that claims to be GRU4Rec's
    forged = tmp_path / "forged.pth"
    torch.save(checkpoint, forged)
    with pytest.raises(RecBoleLLMError, match=r"does not load as model 'GRU4Rec' on dataset 'test'"):
        load_data_and_model(str(forged))


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(RecBoleLLMError, match="holds a bare state dict, not a RecBole checkpoint"):
        load_data_and_model(str(path))


def test_nproc_larger_than_devices(tmp_path):
    write_tiny_dataset(tmp_path / "data")
    with pytest.raises(RecBoleLLMError, match=r"--nproc 999 is larger than the \d+ CPU cores"):
        run("SASRec", "test", config_dict=tiny_config(tmp_path, **SEQ), nproc=999)
