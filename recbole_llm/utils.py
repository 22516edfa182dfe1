"""Model, trainer and dataset resolution: the plugin first, then RecBole (the RecBole-GNN pattern)."""
import contextlib
import importlib
import os
import pkgutil
import socket
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import yaml
from recbole.data import create_dataset as recbole_create_dataset
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

MODEL_SUBPACKAGES = ("sequential_recommender", "context_aware_recommender")


class RecBoleLLMError(Exception):
    """A user-facing error: the message names the file or key at fault and the fix. The launcher prints it
    as one line, without a traceback."""


def read_checkpoint(path, what="checkpoint", hint="pass the .pth file a training run saved in its checkpoint_dir"):
    """The dict of a RecBole ``.pth`` (``config``, ``state_dict``, ...), or one ``RecBoleLLMError`` that names the
    file and what is wrong with it: missing, truncated or not a torch file, or a torch file of something else.

    ``what`` names the file's role in the message (``slmrec_teacher_checkpoint``, ...), ``hint`` the fix. Our own
    checkpoints pickle the Config, which torch >= 2.6 refuses by default, hence ``weights_only=False``: load only
    checkpoints you trust, as with any pickle.
    """
    import torch

    if not os.path.isfile(path):
        raise RecBoleLLMError(f"{what} '{path}' does not exist; {hint}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zips, foreign pickles and text files each fail differently
        first_line = (str(error).splitlines() or [""])[0]
        raise RecBoleLLMError(f"{what} '{path}' is not a readable torch file: it is truncated or of another kind "
                              f"({type(error).__name__}: {first_line}); {hint}.") from None
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        kind = "a bare state dict" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise RecBoleLLMError(f"{what} '{path}' holds {kind}, not a RecBole checkpoint (no 'config' and "
                              f"'state_dict'); {hint}.")
    return checkpoint


@contextlib.contextmanager
def atomic_target(path):
    """A temporary path beside ``path`` for the block to write. When the block ends without error, the file it
    wrote is renamed over ``path`` in one step (a block that writes nothing, such as a DDP rank other than 0,
    renames nothing); the temporary file never outlives the block. Readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        if temporary.exists():
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def config_choice(config, key, allowed):
    """``config[key]``, which must be one of ``allowed``: else an error naming the key and the allowed values."""
    value = config[key]
    if value not in allowed:
        raise RecBoleLLMError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}, got {value!r}.")
    return value


def recbole_time_order(times):
    """Indices that order ``times`` as RecBole orders interactions: a stable sort of the float32 values its
    Interaction holds, where timestamps a few seconds apart tie and keep file order."""
    return np.argsort(np.asarray(times, dtype=np.float32), kind="stable")


def _plugin_model_modules():
    for subpackage in MODEL_SUBPACKAGES:
        package_name = f"recbole_llm.model.{subpackage}"
        try:
            package = importlib.import_module(package_name)
        except ModuleNotFoundError:
            continue
        for info in pkgutil.iter_modules(package.__path__):
            yield f"{package_name}.{info.name}"


def plugin_model_names():
    """The ``--model`` names this plugin adds, in alphabetical order."""
    names = []
    for module_path in _plugin_model_modules():
        module = importlib.import_module(module_path)
        names += [
            name for name, obj in vars(module).items()
            if isinstance(obj, type) and obj.__module__ == module_path and name.lower() == module_path.rsplit(".", 1)[-1]
        ]
    return sorted(names)


def get_model(model_name):
    """The model class for ``model_name``: ``recbole_llm.model.<type>.<name lowercased>.<name>``, else RecBole's."""
    module_name = model_name.lower()
    for subpackage in MODEL_SUBPACKAGES:
        module_path = f"recbole_llm.model.{subpackage}.{module_name}"
        if importlib.util.find_spec(f"recbole_llm.model.{subpackage}") and importlib.util.find_spec(module_path):
            return getattr(importlib.import_module(module_path), model_name)
    if not _recbole_has_model_file(module_name):
        known = ", ".join(plugin_model_names()) or "(none yet)"
        raise RecBoleLLMError(
            f"unknown model '{model_name}'. recbole_llm models: {known}; "
            f"or any RecBole model, e.g. SASRec, GRU4Rec, BERT4Rec, BPR (names are case-sensitive)."
        )
    return recbole_get_model(model_name)


def _recbole_has_model_file(module_name):
    # Looked up on disk: asking RecBole would import exlib_recommender, which needs lightgbm and xgboost.
    import recbole.model

    return any(Path(recbole.model.__file__).parent.glob(f"*_recommender/{module_name}.py"))


def get_trainer(model_type, model_name):
    """``recbole_llm.trainer.<name lowercased>.<Model>Trainer`` when a model needs its own, else RecBole's choice."""
    module_path = f"recbole_llm.trainer.{model_name.lower()}"
    if importlib.util.find_spec(module_path):
        return getattr(importlib.import_module(module_path), model_name + "Trainer")
    return recbole_get_trainer(model_type, model_name)


def _atomic_files_present(config):
    data_path, dataset = config["data_path"], config["dataset"]
    if config["benchmark_filename"]:
        names = [f"{dataset}.{part}.inter" for part in config["benchmark_filename"]]
    else:
        names = [f"{dataset}.inter"]
    return os.path.isdir(data_path) and all(os.path.isfile(os.path.join(data_path, n)) for n in names)


def _download_url(dataset):
    from recbole import data as recbole_data

    url_file = os.path.join(os.path.dirname(recbole_data.__file__), "..", "properties", "dataset", "url.yaml")
    with open(url_file, encoding="utf-8") as f:
        return (yaml.safe_load(f) or {}).get(dataset)


def _reachable(url, timeout=3.0):
    host = urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_dataset_available(config):
    """Fail fast, naming the fix, when the atomic files are missing and RecBole cannot download them.

    RecBole would otherwise try its download URL and hang without a network, or ask on stdin.
    """
    if _atomic_files_present(config):
        return
    dataset, data_path = config["dataset"], config["data_path"]
    url = _download_url(dataset)
    if url and _reachable(url):
        return  # RecBole downloads it
    hint = (
        f" Convert the GroupLens raw files with: python -m recbole_llm.data.convert_ml1m "
        f"--raw_dir <folder with ratings.dat, movies.dat, users.dat> --name {dataset} "
        f"--out_dir {os.path.dirname(os.path.normpath(data_path)) or '.'}"
        if dataset.startswith("ml-1m")
        else f" Put the atomic files ({dataset}.inter and optionally .item/.user) in {data_path}, "
             f"or set data_path to the folder that holds '{dataset}/'."
    )
    reason = "no network to download it" if url else "RecBole has no download for it"
    raise RecBoleLLMError(f"dataset '{dataset}' not found: {data_path}/{dataset}.inter does not exist ({reason}).{hint}")


def create_dataset(config):
    """RecBole's ``create_dataset`` after checking the train mode and that the dataset exists; ``llm_dataset``
    names a recbole_llm dataset class to use instead (``CTRDataset``, any model).

    ``llm_train_mode: all_positions`` gives an ``AllPositionsDataset`` (one training sequence per user, DESIGN.md
    §6); it is an error for a model that does not declare the mode in ``llm_train_modes``.
    """
    from recbole_llm.data.dataset import TRAIN_MODES, AllPositionsDataset, train_modes  # that module imports this one

    mode = config["llm_train_mode"] or "prefix"  # configs saved before the key existed lack it
    if mode not in TRAIN_MODES:
        raise RecBoleLLMError(f"config key 'llm_train_mode' must be one of {', '.join(TRAIN_MODES)}, got {mode!r}.")
    if mode not in train_modes(get_model(config["model"])):
        able = [name for name in plugin_model_names() if mode in train_modes(get_model(name))]
        raise RecBoleLLMError(
            f"model '{config['model']}' does not support llm_train_mode '{mode}'; the models that do: "
            f"{', '.join(able) or '(none)'}. Use one of them, or set llm_train_mode: prefix."
        )
    check_dataset_available(config)
    if config["llm_dataset"]:
        return _plugin_dataset_class(config["llm_dataset"])(config)
    dataset = recbole_create_dataset(config)
    return AllPositionsDataset.adopt(dataset) if mode == "all_positions" else dataset


PLUGIN_DATASETS = {"CTRDataset": "recbole_llm.data.ctr"}  # llm_dataset value -> module


def _plugin_dataset_class(name):
    if name not in PLUGIN_DATASETS:
        raise RecBoleLLMError(f"config key 'llm_dataset' must be one of {', '.join(PLUGIN_DATASETS)} or ~, got {name!r}.")
    return getattr(importlib.import_module(PLUGIN_DATASETS[name]), name)
