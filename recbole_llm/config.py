"""Config: RecBole's Config with the plugin's model lookup, YAML layering, type checks and CPU DDP."""
import difflib
import os
import re
from pathlib import Path

import recbole
import torch
import yaml
from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_llm.utils import RecBoleLLMError, get_model


def properties_dir():
    """The plugin's default YAML: the installed package data, else ``properties/`` beside the package in a clone."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "properties", package_dir.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise RecBoleLLMError(f"recbole_llm's properties/overall.yaml is missing beside {package_dir}; reinstall the package.")


# `key: value  # (type) meaning`, the convention of RecBole's and our property files.
_DECLARED_TYPE = re.compile(r"^([A-Za-z_][\w]*)\s*:.*#\s*\(([^)]*)\)")
# The plugin's key families; RecBole owns every other key.
PLUGIN_KEY_PREFIXES = ("llm_", "llmesr_", "hllm_", "reclora_", "slmrec_")
# Keys that name a preset of a model family's switches in properties/setting/<family>_<value>.yaml.
SETTING_KEYS = ("llmesr_setting",)
_TYPE_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    # RecBole stringifies these itself (gpu_id: 0 is common), so any scalar is accepted.
    "str": lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
    "list": lambda v: isinstance(v, (list, tuple)),
    "dict": lambda v: isinstance(v, dict),
    "none": lambda v: v is None,
}


def declared_types(yaml_file):
    """``{key: [type names]}`` from the ``# (type)`` comments of a property file's top-level keys."""
    types = {}
    with open(yaml_file, encoding="utf-8") as f:
        for line in f:
            match = _DECLARED_TYPE.match(line)
            if match:
                names = [t.strip().lower() for t in re.split(r"\bor\b|,|\|", match.group(2))]
                if all(name in _TYPE_CHECKS for name in names):
                    types[match.group(1)] = names
    return types


def _model_yaml_files(model_class, props):
    """The model YAML of each class a recbole_llm model derives from, base classes first.

    ``LLMESR_SASRec`` thus gets RecBole's ``SASRec.yaml``, then our ``DualLLM.yaml``, ``DualLLMSASRec.yaml``,
    ``LLMESR.yaml`` and ``LLMESR_SASRec.yaml``: defaults are written once, where the mechanism is. A stock model
    gets only its own file (RecBole has loaded its own already).
    """
    recbole_models = Path(recbole.__file__).parent / "properties" / "model"
    if not model_class.__module__.startswith("recbole_llm."):
        return [props / "model" / f"{model_class.__name__}.yaml"]
    files = []
    for cls in reversed(model_class.__mro__):
        files += [recbole_models / f"{cls.__name__}.yaml", props / "model" / f"{cls.__name__}.yaml"]
    return files


class Config(RecBoleConfig):
    """RecBole's Config, resolving ``recbole_llm`` models and layering the plugin's YAML.

    Order, a later source winning: RecBole's YAML, ours (``overall`` -> ``model/<M>`` -> ``dataset/<D>``), the
    ``config_file_list``, ``config_dict``, then the command line. Values are checked against the ``# (type)``
    declared in the property files; a mismatch is an error naming the key.
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        self.key_types = {}
        super().__init__(model, dataset, config_file_list, config_dict)

    def _load_config_files(self, file_list):
        file_config_dict = {}
        for file in file_list or []:
            if not os.path.isfile(file):
                raise RecBoleLLMError(f"config file '{file}' does not exist; check the path given to --config_files.")
            with open(file, encoding="utf-8") as f:
                try:
                    loaded = yaml.load(f.read(), Loader=self.yaml_loader)
                except yaml.YAMLError as error:
                    mark = getattr(error, "problem_mark", None)
                    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
                    raise RecBoleLLMError(f"config file '{file}' is not valid YAML{where}: {problem}; fix that line.") from None
            if loaded is None:
                continue
            if not isinstance(loaded, dict):
                raise RecBoleLLMError(f"config file '{file}' must hold 'key: value' lines, not a {type(loaded).__name__}.")
            file_config_dict.update(loaded)
        return file_config_dict

    def _get_model_and_dataset(self, model, dataset):
        if model is None and isinstance(self.external_config_dict.get("model"), str):
            model = self.external_config_dict["model"]
        if isinstance(model, str):
            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _update_internal_config_dict(self, file):
        self.key_types.update(declared_types(file))
        return super()._update_internal_config_dict(file)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        props = properties_dir()
        self._layer([props / "overall.yaml", *_model_yaml_files(model_class, props)])
        # the settings read the model's defaults, so they are chosen only now, then the dataset's file goes on top
        self._layer([*self._setting_files(props), props / "dataset" / f"{dataset}.yaml"])
        self._drop_negatives_for_ce(model_class)

    def _layer(self, files):
        """Load each existing file of ``files`` over the defaults, in order."""
        for file in files:
            if file.is_file():
                self._update_internal_config_dict(str(file))

    def _setting_files(self, props):
        """The preset of each ``<family>_setting`` key the model declares (``llmesr_setting: faithful`` ->
        ``properties/setting/llmesr_faithful.yaml``), layered over the model's defaults and under the user's keys;
        the value ``default`` adds none."""
        files = []
        for key in [k for k in self.internal_config_dict if k in SETTING_KEYS]:
            value = self.external_config_dict.get(key, self.internal_config_dict[key])
            if value == "default":
                continue
            family = key[: -len("_setting")]
            file = props / "setting" / f"{family}_{value}.yaml"
            if not file.is_file():
                known = sorted(f.stem[len(family) + 1:] for f in (props / "setting").glob(f"{family}_*.yaml"))
                raise RecBoleLLMError(f"config key '{key}' is '{value}', which is no setting of {self.model}; "
                                      f"use one of {['default', *known]}.")
            files.append(file)
        return files

    def _drop_negatives_for_ce(self, model_class):
        """Sequential models with CE loss train on all items: no negative sampling unless the user asks for it.

        RecBole 1.2.1 keeps its default ``train_neg_sample_args`` and then refuses CE, so a plain
        ``--model=SASRec`` fails there (RecBole-GNN sets ``train_neg_sample_args: ~`` for the same reason).
        """
        merged = {**self.internal_config_dict, **self.external_config_dict}
        sequential = self.internal_config_dict.get("MODEL_TYPE") == ModelType.SEQUENTIAL
        own_input_type = hasattr(model_class, "input_type")
        if sequential and not own_input_type and merged.get("loss_type") == "CE" \
                and "train_neg_sample_args" not in self.external_config_dict:
            self.internal_config_dict["train_neg_sample_args"] = None

    def _get_final_config_dict(self):
        self._check_plugin_keys_exist()
        self._check_external_types()
        return super()._get_final_config_dict()

    def _check_plugin_keys_exist(self):
        """A plugin key from the command line or config_dict must be one the model's property files declare.

        RecBole takes any key, so a misspelt or another model's ``llmesr_...`` would otherwise change nothing and say
        nothing. Config files are not checked: a protocol file is shared by several models, each reading its own keys.
        """
        for source, values in self._external_sources()[1:]:  # all but the config files
            for key in values:
                if key.startswith(PLUGIN_KEY_PREFIXES) and key not in self.internal_config_dict:
                    raise RecBoleLLMError(f"config key '{key}' from the {source} is not a key of {self.model}"
                                          f"{self._closest_key_hint(key)}; check its spelling, or drop it for this model.")

    def _closest_key_hint(self, key):
        known = [k for k in self.internal_config_dict if k.startswith(PLUGIN_KEY_PREFIXES)]
        close = difflib.get_close_matches(key, known, n=1)
        return f" (did you mean '{close[0]}'?)" if close else ""

    def _external_sources(self):
        """``(name, values)`` of the user's key sources, in the order a later one wins."""
        return (("config file", self.file_config_dict), ("config_dict", self.variable_config_dict),
                ("command line", self.cmd_config_dict))

    def _check_external_types(self):
        for source, values in self._external_sources():
            for key, value in values.items():
                expected = self.key_types.get(key)
                if value is None or not expected or any(_TYPE_CHECKS[t](value) for t in expected):
                    continue
                raise RecBoleLLMError(
                    f"config key '{key}' must be {' or '.join(expected)}, got {value!r} ({type(value).__name__}) "
                    f"from the {source}; fix its value."
                )

    def _init_device(self):
        """RecBole's device set-up, plus DDP on CPUs with gloo (RecBole hard-codes NCCL and CUDA)."""
        if "local_rank" in self.final_config_dict and not self._use_cuda():
            self._init_cpu_process_group()
        else:
            super()._init_device()

    def _use_cuda(self):
        gpu_id = str(self.final_config_dict["gpu_id"]).strip("()[] ")
        return self.final_config_dict["use_gpu"] and bool(gpu_id) and torch.cuda.is_available()

    def _init_cpu_process_group(self):
        cfg = self.final_config_dict
        torch.distributed.init_process_group(
            backend="gloo",
            rank=cfg["local_rank"] + cfg["offset"],
            world_size=cfg["world_size"],
            init_method=f"tcp://{cfg['ip']}:{cfg['port']}",
        )
        cfg["device"] = torch.device("cpu")
        cfg["single_spec"] = False
        if cfg["local_rank"] != 0:
            cfg["state"], cfg["show_progress"], cfg["verbose"] = "error", False, False
