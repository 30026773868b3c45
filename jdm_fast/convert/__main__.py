"""``python -m jdm_fast.convert {guided-diffusion,to-diffusers} ...`` (see each subcommand's --help)."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module under jdm_fast.convert, one-line help)
SUBCOMMANDS = {
    "guided-diffusion": ("guided_diffusion", "a state dict of the authors' JDM code or of an OpenAI "
                                             "guided-diffusion UNet -> a jdm_fast checkpoint + safetensors"),
    "to-diffusers": ("to_diffusers", "a jdm_fast checkpoint/export -> a diffusers UNet2DModel + DDPMScheduler"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jdm_fast.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    modules = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        modules[name] = importlib.import_module(f"jdm_fast.convert.{module}")
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=modules[name].__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
