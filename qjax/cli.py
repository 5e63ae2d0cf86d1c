"""The ``qjax`` command line: ``qjax run`` (the main job), ``qjax assets``, ``qjax presets``."""

from __future__ import annotations

import argparse
import logging
import sys

from qjax.errors import QjaxError


def _run(args: argparse.Namespace) -> int:
    from qjax.jobs import quantize_gguf_model

    quantize_gguf_model(args.model, args.preset)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from qjax.presets import PRESETS

    for name, spec in PRESETS.items():
        print(f"{name:16s} {spec.label()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["assets"]:
        from qjax import assets

        return assets.cli(argv[1:])
    parser = argparse.ArgumentParser(prog="qjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="quantize a real model and report what happened")
    run.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    run.add_argument("--preset", default="int4-g128", help="see `qjax presets`")
    run.set_defaults(fn=_run)
    sub.add_parser("presets", help="list the named quantization presets").set_defaults(fn=_presets)
    sub.add_parser("assets", help="list / fetch the real models and text (qjax assets --help)")
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except QjaxError as err:
        print(f"qjax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
