"""Run a recbole_llm model, or any stock RecBole model, under one protocol.

    python run_recbole_llm.py --model=SASRec --dataset=ml-100k [--config_files "a.yaml b.yaml"] [--key=value ...]

With no arguments it runs the embedded default, DEFAULT_MODEL on the ml-100k bundled in RecBole's wheel, for
DEFAULT_EPOCHS epochs: a few-minute offline smoke run on a 2-core CPU.
"""
import argparse
import json
import sys

DEFAULT_MODEL = "LLMESR_SASRec"
DEFAULT_DATASET = "ml-100k"
DEFAULT_EPOCHS = 20


def parse_args(argv):
    from recbole_llm.utils import plugin_model_names

    parser = argparse.ArgumentParser(
        description="Train and test a recbole_llm or RecBole model. Any other --key=value is passed to "
                    "RecBole's Config (e.g. --epochs=5 --train_batch_size=512).",
        epilog=f"With no arguments: --model={DEFAULT_MODEL} --dataset={DEFAULT_DATASET} --epochs={DEFAULT_EPOCHS}. "
               "recbole_llm models: " + (", ".join(plugin_model_names()) or "(none yet)")
               + ". Any RecBole model name also works (SASRec, GRU4Rec, BERT4Rec, BPR, ...).",
    )
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    parser.add_argument("--dataset", "-d", default=DEFAULT_DATASET, help=f"dataset name (default {DEFAULT_DATASET})")
    parser.add_argument("--config_files", default=None, help="space-separated YAML files, later ones win")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this node (DDP when > 1)")
    parser.add_argument("--world_size", type=int, default=-1, help="processes over all nodes")
    parser.add_argument("--group_offset", type=int, default=0, help="global rank of this node's first process")
    parser.add_argument("--ip", default="localhost", help="address of the rank-0 node")
    parser.add_argument("--port", default="5678", help="port of the rank-0 node")
    args, _ = parser.parse_known_args(argv)  # the rest reaches RecBole's Config, which reads sys.argv itself
    return args


def main():
    args = parse_args(sys.argv[1:])
    from recbole_llm.quick_start import run
    from recbole_llm.utils import RecBoleLLMError

    config_files = args.config_files.split() if args.config_files else None
    config_dict = {"epochs": DEFAULT_EPOCHS} if not sys.argv[1:] else None
    try:
        result = run(args.model, args.dataset, config_file_list=config_files, config_dict=config_dict, nproc=args.nproc,
                     world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.group_offset)
    except RecBoleLLMError as error:
        print(f"run_recbole_llm: error: {error}", file=sys.stderr)
        return 2
    if result is not None:
        for label, metrics in (("best valid", result["best_valid_result"]), ("test result", result["test_result"])):
            print(f"{label}: " + json.dumps({name: float(value) for name, value in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
