"""The ``qjax`` command line: ``qjax run`` (the main job), ``qjax convert``, ``qjax assets``,
``qjax presets``."""

from __future__ import annotations

import argparse
import logging
import sys

from qjax.errors import QjaxError


def _run(args: argparse.Namespace) -> int:
    from qjax.jobs import RunConfig, run

    fields = {f: getattr(args, f) for f in RunConfig.__dataclass_fields__}
    run(RunConfig(**fields))
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
    run = sub.add_parser("run", help="quantize a real model, report perplexity/KLD before/after")
    from qjax.jobs import RunConfig

    defaults = RunConfig()
    run.add_argument("--model", default=defaults.model, choices=["smollm2", "gemma3"])
    run.add_argument("--method", default=defaults.method, help="rtn | gptq | awq | hqq")
    run.add_argument("--preset", default=defaults.preset, help="the grid; see `qjax presets`")
    for name in ("samples", "length", "context", "windows", "seed"):
        run.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    run.set_defaults(fn=_run)
    ev = sub.add_parser("eval", help="perplexity of a real model (optionally quantized, with KLD)")
    ev.add_argument("--model", default=defaults.model, choices=["smollm2", "gemma3"])
    ev.add_argument("--method", default="none", help="none | rtn | gptq | awq | hqq")
    ev.add_argument("--preset", default=defaults.preset)
    for name in ("samples", "length", "context", "windows", "seed"):
        ev.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    ev.set_defaults(fn=_run)
    sub.add_parser("presets", help="list the named quantization presets").set_defaults(fn=_presets)
    from qjax.convert.cli_convert import add_parser as add_convert

    add_convert(sub)
    sub.add_parser("assets", help="list / fetch the real models and text (qjax assets --help)")
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except QjaxError as err:
        print(f"qjax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
