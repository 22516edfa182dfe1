"""Quick start: run any recbole_llm or RecBole model, in one process or several (DDP).

Mirrors ``recbole.quick_start`` without importing it: that module imports ray, which breaks on numpy 2.
"""
import logging
import os
import sys
import uuid
from logging import getLogger

import torch
import torch.distributed as dist
from recbole.data import data_preparation
from recbole.data.transform import construct_transform
from recbole.utils import ModelType, get_environment, get_flops, get_local_time, init_logger, init_seed, set_color

from recbole_llm import compat
from recbole_llm.config import Config
from recbole_llm.evaluator import attach_group_metrics, attach_history_exclusion
from recbole_llm.utils import (RecBoleLLMError, config_choice, create_dataset, get_model, get_trainer,
                               read_checkpoint)


def run(model, dataset, config_file_list=None, config_dict=None, saved=True, nproc=1, world_size=-1,
        ip="localhost", port="5678", group_offset=0):
    """Train and test ``model`` on ``dataset``; with ``nproc > 1`` (or a ``world_size``) spawn DDP processes.

    Returns the result dict of rank 0: best_valid_score, valid_score_bigger, best_valid_result, test_result.
    """
    config_dict = dict(config_dict or {})
    config_dict.setdefault("llm_checkpoint_name", default_checkpoint_name(model))
    if nproc == 1 and world_size <= 0:
        return run_recbole_llm(model, dataset, config_file_list, config_dict, saved)

    check_nproc(nproc)
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    config_dict.update({"world_size": nproc if world_size == -1 else world_size, "ip": ip, "port": port,
                        "nproc": nproc, "offset": group_offset})
    kwargs = {"config_dict": config_dict, "saved": saved, "queue": queue}
    mp.spawn(run_recbole_llms, args=(model, dataset, config_file_list, kwargs), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def default_checkpoint_name(model):
    """``<model>-<time>-<random>.pth``, chosen once per launch so that every DDP rank saves under the same name
    (RecBole stamps each process's own clock into it). RecBole's time has one-second resolution: the random part
    keeps two runs started in the same second (parallel seeds) from overwriting each other's best model."""
    return f"{model}-{get_local_time()}-{uuid.uuid4().hex[:6]}.pth"


def check_nproc(nproc):
    """Refuse more processes than devices: CUDA devices when there are any, else CPU cores (gloo)."""
    if torch.cuda.is_available():
        available, what, hint = torch.cuda.device_count(), "CUDA devices", "list that many in gpu_id"
    else:
        available, what, hint = os.cpu_count() or 1, "CPU cores (no CUDA, so DDP uses gloo on the CPU)", ""
    if nproc > available:
        raise RecBoleLLMError(f"--nproc {nproc} is larger than the {available} {what}; lower --nproc{' or ' + hint if hint else ''}.")


def run_recbole_llms(rank, *args):
    """``mp.spawn`` entry: the process's rank becomes ``local_rank``."""
    kwargs = args[-1]
    kwargs["config_dict"] = {**kwargs.get("config_dict", {}), "local_rank": rank}
    run_recbole_llm(*args[:3], **kwargs)


def set_malloc(config):
    """glibc's malloc as ``llm_malloc`` names it (``compat.MALLOC_MODES``), before the data and model allocate."""
    compat.MALLOC_MODES[config_choice(config, "llm_malloc", compat.MALLOC_MODES)]()


def run_recbole_llm(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, queue=None):
    """One process of a run, in the order of RecBole's ``run_recbole`` so that stock models give its numbers."""
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    set_malloc(config)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model)
    _log_flops(model, dataset, config, logger)

    trainer = _build_trainer(config, model, dataset, valid_data, test_data)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    if not config["single_spec"]:
        dist.barrier()  # rank 0 has finished writing the best checkpoint before anyone reloads it
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "saved_model_file": trainer.saved_model_file if saved else None,
    }
    if not config["single_spec"]:
        dist.destroy_process_group()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)
    return result


def _log_flops(model, dataset, config, logger):
    # RecBole's run_recbole profiles a deep copy in train mode, which draws from the RNG; doing the same keeps
    # stock models' numbers identical to it. Models that hold an LLM set `skip_flops` (a copy would double memory).
    if getattr(model, "skip_flops", False):
        return
    flops = get_flops(model, dataset, config["device"], logger, construct_transform(config))
    logger.info(set_color("FLOPs", "blue") + f": {flops}")


def _build_trainer(config, model, dataset, valid_data, test_data):
    """The model's trainer, with the shared checkpoint name and, for sequential models, the long-tail group metrics
    and (``llm_exclude_history``) the exclusion of each user's history from the ranking.

    ``dataset`` (the whole dataset) and the evaluation loaders define the groups' training split.
    """
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if config["llm_checkpoint_name"]:
        trainer.saved_model_file = os.path.join(config["checkpoint_dir"], config["llm_checkpoint_name"])
    if config["llm_group_metrics"] and config["MODEL_TYPE"] == ModelType.SEQUENTIAL:
        attach_group_metrics(trainer, config, dataset, (valid_data, test_data))
    if config["llm_exclude_history"] and config["MODEL_TYPE"] == ModelType.SEQUENTIAL:
        attach_history_exclusion(trainer, dataset, valid_data, test_data)  # general models exclude it already
    return trainer


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """The objective for ``recbole.trainer.HyperTuning`` and the tests: one quiet run, returning its results."""
    config = Config(config_dict=config_dict, config_file_list=config_file_list)
    init_seed(config["seed"], config["reproducibility"])
    logger = getLogger()
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
    init_logger(config)
    logging.basicConfig(level=logging.ERROR)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = _build_trainer(config, model, dataset, valid_data, test_data)
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, verbose=False, saved=saved)
    test_result = trainer.evaluate(test_data, load_best_model=saved)
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }


def _log_to_file_only():
    """Drop the console handler ``init_logger`` gives the root logger and send warnings to the log: a command-line
    tool then prints its answer or one error line, and the rest stays in the log file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    logging.captureWarnings(True)


def load_data_and_model(model_file, console_log=True):
    """Rebuild the config, dataset, loaders and model of a checkpoint saved by a recbole_llm or RecBole run.

    Returns ``(config, model, dataset, train_data, valid_data, test_data)``, like RecBole's. With
    ``console_log=False`` RecBole's log (the config dump included) and Python's warnings go to the log file only.
    """
    checkpoint = read_checkpoint(model_file)
    config = checkpoint["config"]
    if config["device"].type == "cuda" and not torch.cuda.is_available():
        config["device"] = torch.device("cpu")
    if not config["single_spec"] and not dist.is_initialized():
        config["single_spec"] = True  # a DDP run's checkpoint, reloaded in one process: plain loaders, no gathers
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    if not console_log:
        _log_to_file_only()
    logger = getLogger()
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    init_seed(config["seed"], config["reproducibility"])
    try:
        model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
        model.load_state_dict(checkpoint["state_dict"])
    except Exception as error:  # a foreign state dict or config fails in many ways; name the checkpoint for all
        first_line = (str(error).splitlines() or [""])[0]
        raise RecBoleLLMError(
            f"checkpoint '{model_file}' does not load as model '{config['model']}' on dataset '{config['dataset']}' "
            f"({type(error).__name__}: {first_line}). Use a checkpoint saved by that model on that dataset."
        ) from error
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data
