"""RecBole's own ``run_recbole``, for the parity test: ``python recbole_reference.py MODEL DATASET CONFIG...``.

``recbole.quick_start`` imports ray, which fails on numpy 2; ray is replaced by an empty stub, since run_recbole
never calls it. recbole_llm is imported only for its compat fixes, and anomaly detection is turned back on, as
stock RecBole runs, to show that turning it off changes no number.
"""
import json
import sys
import types

ray = types.ModuleType("ray")
ray.tune = types.ModuleType("ray.tune")
sys.modules.update({"ray": ray, "ray.tune": ray.tune})

import recbole_llm  # noqa: E402,F401  (numpy 2 / pandas 3 / torch.load fixes)
import torch  # noqa: E402
from recbole.quick_start import run_recbole  # noqa: E402

if __name__ == "__main__":
    model, dataset, *config_files = sys.argv[1:]
    torch.autograd.set_detect_anomaly(True)
    sys.argv = sys.argv[:1]
    result = run_recbole(model=model, dataset=dataset, config_file_list=config_files)
    print("RESULT " + json.dumps({"valid": dict(result["best_valid_result"]), "test": dict(result["test_result"])}))
