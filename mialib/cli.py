"""Command line: ``python -m mialib prepare|notebooks|all --preset configs/default.yaml``."""

from __future__ import annotations

import argparse
import time

from . import experiment


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mialib", description=__doc__)
    parser.add_argument("command", choices=["prepare", "notebooks", "all"], help="prepare: data and target; notebooks: papermill; all: both")
    parser.add_argument("--preset", default="configs/default.yaml", help="YAML preset of papermill parameters")
    parser.add_argument("--notebooks", nargs="*", default=list(experiment.NOTEBOOKS), help="notebook names to execute")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name for papermill")
    args = parser.parse_args(argv)

    params = experiment.load_preset(args.preset)
    if args.command in ("prepare", "all"):
        start = time.time()
        images = experiment.prepare_data(**experiment.data_args(params))
        print(f"data: {len(images)} images ready ({time.time() - start:.1f} s)", flush=True)
        start = time.time()
        model = experiment.prepare_target(params, images)
        print(f"target: {model} ready ({time.time() - start:.1f} s)", flush=True)
    if args.command in ("notebooks", "all"):
        output_dir = experiment.run_notebooks(args.preset, tuple(args.notebooks), args.kernel)
        print(f"results in {output_dir}", flush=True)


if __name__ == "__main__":
    main()
