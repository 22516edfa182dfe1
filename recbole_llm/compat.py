"""Fixes that let RecBole 1.2.1 run on today's stack (numpy 2, pandas 3, torch >= 2.6) and run fast on a CPU.

Every fix patches RecBole from here, at import of ``recbole_llm``; site-packages are never edited. Each one is
idempotent and has a test in ``tests/test_compat.py`` that fails without it.
"""
import contextlib
import ctypes
import functools
import os
import warnings

import numpy as np
import pandas as pd
import torch

# Aliases numpy 2 removed; RecBole 1.2.1 uses them in Config, the metrics, Interaction and Dataset.
NUMPY_ALIASES = {
    "bool": np.bool_,
    "int": np.int_,
    "float": np.float64,
    "complex": np.complex128,
    "object": np.object_,
    "str": np.str_,
    "long": np.int_,
    "unicode": np.str_,
}

# glibc mallopt parameters (malloc.h), and how much freed heap to keep / grow by at a time.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_KEEP_BYTES, _TOP_PAD_BYTES = 2**31 - 1, 256 * 1024 * 1024
# glibc's initial mmap count limit and its initial mmap threshold, trim threshold and top pad (mallopt(3)); set
# explicitly, they stop glibc from raising the thresholds as it runs
_GLIBC_MMAP_MAX, _GLIBC_INITIAL_BYTES = 65536, 128 * 1024


def install_numpy_aliases():
    """Set ``np.float``, ``np.bool``, ... without touching ``np.float_`` and friends, which numpy 2 removed."""
    for name, value in NUMPY_ALIASES.items():
        setattr(np, name, value)


def _numpy_safe_compatibility_settings(self):
    # Replaces recbole.config.Config.compatibility_settings, which reads np.float_ and fails on numpy 2.
    install_numpy_aliases()


def _fill_nan_copy_on_write(self):
    """RecBole's ``Dataset._fill_nan``, with assignments instead of chained ``fillna(inplace=True)``.

    Under pandas 3 Copy-on-Write a chained in-place fillna is a no-op, so NaN tokens and floats would stay NaN.
    """
    from recbole.utils import FeatureType

    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x
                )


@contextlib.contextmanager
def pandas2_semantics():
    """Give RecBole's dataset code the two pandas 2 behaviours it relies on, while it builds a dataset.

    - Empty ``token_seq``/``float_seq`` cells become ''. RecBole fills them with a chained
      ``df[field].fillna("", inplace=True)``, a no-op under pandas 3 Copy-on-Write, after which ``NaN.split`` fails.
      The columns are recognised by RecBole's ``field:type`` header names at ``read_csv`` time.
    - ``Series.agg(len)`` gives each cell's length. pandas 3 passes the whole Series instead, so the split points
      of remapped sequences collapse (``Length of values (1) does not match length of index``).
    """
    read_csv, agg = pd.read_csv, pd.Series.agg

    def read_csv_seq_cells_as_empty(*args, **kwargs):
        df = read_csv(*args, **kwargs)
        for column in df.columns:
            if str(column).endswith(("token_seq", "float_seq")):
                df[column] = df[column].fillna("")
        return df

    def agg_len_per_cell(self, func=None, *args, **kwargs):
        return self.map(len) if func is len else agg(self, func, *args, **kwargs)

    pd.read_csv, pd.Series.agg = read_csv_seq_cells_as_empty, agg_len_per_cell
    try:
        with warnings.catch_warnings():
            # RecBole's chained fillna calls warn on every dataset; the cells they meant to fill are filled above.
            warnings.simplefilter("ignore", getattr(pd.errors, "ChainedAssignmentError", FutureWarning))
            yield
    finally:
        pd.read_csv, pd.Series.agg = read_csv, agg


@contextlib.contextmanager
def trusted_checkpoint_load():
    """Let ``torch.load`` unpickle RecBole's own checkpoints, which store the Config object.

    torch >= 2.6 defaults to ``weights_only=True`` and refuses them. The documented switch
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set only while RecBole reloads a file its trainer wrote.
    """
    previous = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = previous


def _run_within(context):
    """A patch maker: the patched RecBole method runs inside ``context()``."""

    def make_wrapper(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            with context():
                return method(*args, **kwargs)

        wrapper.__recbole_llm_patched__ = True
        return wrapper

    return make_wrapper


def _ddp_for_module_device(ddp_class):
    """RecBole passes ``device_ids=[local_rank]`` to DDP, which torch rejects for a CPU module (gloo)."""

    @functools.wraps(ddp_class)
    def make_ddp(module, device_ids=None, **kwargs):
        on_cpu = next(module.parameters()).device.type == "cpu"
        return ddp_class(module, device_ids=None if on_cpu else device_ids, **kwargs)

    make_ddp.__recbole_llm_patched__ = True
    return make_ddp


def _atomic_checkpoint(save):
    """RecBole's ``_save_checkpoint`` writes the ``.pth`` in place, so a run killed mid-write leaves a truncated
    checkpoint under the final name. Write it to a temporary file beside it, then rename it over the old one."""

    @functools.wraps(save)
    def save_atomically(self, epoch, verbose=True, **kwargs):
        from recbole.utils import set_color

        from recbole_llm.utils import atomic_target

        target = kwargs.pop("saved_model_file", self.saved_model_file)
        with atomic_target(target) as temporary:
            save(self, epoch, verbose=False, saved_model_file=str(temporary), **kwargs)
            written = temporary.exists()  # DDP ranks other than 0 write nothing
        if written and verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {target}")

    save_atomically.__recbole_llm_patched__ = True
    return save_atomically


def _patch(owner, name, make_wrapper):
    current = getattr(owner, name)
    if not getattr(current, "__recbole_llm_patched__", False):
        setattr(owner, name, make_wrapper(current))


def _ensure_dir_race_free(dir_path):
    """RecBole's ``ensure_dir`` checks, then creates: two DDP ranks can both pass the check, and the second
    ``makedirs`` raises FileExistsError. Creating with ``exist_ok`` has no window."""
    os.makedirs(dir_path, exist_ok=True)


# RecBole modules that bound ``ensure_dir`` by name at import, so each needs its own reference replaced.
_ENSURE_DIR_USERS = ("recbole.utils", "recbole.utils.utils", "recbole.utils.logger", "recbole.data.utils",
                     "recbole.data.dataset.dataset", "recbole.trainer.trainer")


def install_race_free_ensure_dir():
    import importlib

    for module_name in _ENSURE_DIR_USERS:
        importlib.import_module(module_name).ensure_dir = _ensure_dir_race_free


def disable_anomaly_detection():
    """RecBole's ``sine.py`` turns on autograd anomaly detection for the whole process when it is imported,
    which slows every training step 1.6-2x. Import the model package once, then turn it off."""
    import recbole.model.sequential_recommender  # noqa: F401  (runs sine.py's side effect now, not mid-run)

    torch.autograd.set_detect_anomaly(False)


def _mallopt(*settings):
    """Apply glibc ``mallopt`` (parameter, value) pairs; False where the C library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(parameter, value) for parameter, value in settings])


def keep_freed_memory():
    """Stop glibc from handing large tensor buffers back to the OS after each step.

    glibc serves allocations above its mmap threshold (at most 32 MB through mallopt) with fresh mmaps and unmaps
    them on free; on VMs where first-touch of pages is slow, re-faulting them every step doubled SASRec's step time.
    With mmap off for malloc and a high trim threshold, freed buffers stay in the heap and are reused. Returns False
    where the C library is not glibc, where nothing is changed.
    """
    return _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BYTES), (_M_TOP_PAD, _TOP_PAD_BYTES))


def return_freed_memory():
    """Hand every large freed buffer back to the OS: glibc's initial mmap and trim thresholds (128 KiB), fixed.

    By default glibc raises that threshold to the size of any mmapped buffer it frees (up to 32 MB), so later
    buffers of that size come from the heap, which fragments and keeps the RSS of a run's largest steps. Returns
    False where the C library is not glibc, where nothing is changed.
    """
    return _mallopt((_M_MMAP_MAX, _GLIBC_MMAP_MAX), (_M_MMAP_THRESHOLD, _GLIBC_INITIAL_BYTES),
                    (_M_TRIM_THRESHOLD, _GLIBC_INITIAL_BYTES), (_M_TOP_PAD, _GLIBC_INITIAL_BYTES))


# llm_malloc: the launcher's glibc malloc settings, by name.
MALLOC_MODES = {"keep": keep_freed_memory, "lean": return_freed_memory, "glibc": lambda: True}


def apply():
    """Apply every fix that does not depend on the process's role (idempotent)."""
    install_numpy_aliases()
    from recbole.config import Config
    from recbole.data.dataset import Dataset
    from recbole.trainer import trainer as trainer_module

    Config.compatibility_settings = _numpy_safe_compatibility_settings
    Dataset._fill_nan = _fill_nan_copy_on_write
    _patch(Dataset, "_from_scratch", _run_within(pandas2_semantics))
    _patch(trainer_module.Trainer, "evaluate", _run_within(trusted_checkpoint_load))
    _patch(trainer_module.Trainer, "resume_checkpoint", _run_within(trusted_checkpoint_load))
    _patch(trainer_module, "DistributedDataParallel", _ddp_for_module_device)
    _patch(trainer_module.Trainer, "_save_checkpoint", _atomic_checkpoint)
    install_race_free_ensure_dir()
    disable_anomaly_detection()
