"""``mergekit-tada CONFIG OUT --adapter-only`` without importing mergekit.

An adapter-only merge reads LoRA factors and the base's safetensors headers
and writes an adapter: a fraction of a second of work, behind seconds of
imports (mergekit's modules import peft and transformers). The console script
offers every invocation to :func:`try_run` first; it takes one only when it
can run it exactly as the mergekit path would:

* the options are among ``--adapter-only`` (required), ``--quiet``, ``-v``,
  ``--num-threads/-j N`` and ``--device cpu``;
* the config is the plain ``models:`` form on local folders
  (:func:`mergekit_tada.config.read_plain_config`) naming one of our methods;
* the base's architecture has a JSON definition in mergekit
  (:func:`mergekit_tada.run.planners.from_definitions`) and every parameter
  resolves there.

The same :func:`mergekit_tada.run.main.run` does the rest, so validation,
outputs and errors are the run's. Anything else (and any doubt) returns
False before anything is written, and the click CLI runs with mergekit.
``tests/test_planning.py`` holds both paths to identical bytes.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

_FLAGS = {"--adapter-only", "--quiet", "--no-quiet"}
_VALUED = {"--num-threads", "-j", "--device"}


class Declined(Exception):
    """The plain planner cannot answer for this merge: mergekit's path runs."""


def _parse(args: list[str]) -> tuple[str, str, dict[str, Any]] | None:
    """(config, out, options) if every argument is one the fast path knows."""
    if args and args[0] == "merge":
        args = args[1:]
    positional, options = [], {"adapter_only": False, "quiet": False}
    options |= {"verbosity": 0, "num_threads": None, "device": "cpu"}
    i = 0
    while i < len(args):
        arg = args[i]
        name, _, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in _VALUED:
            value = inline or (args[i + 1] if i + 1 < len(args) else None)
            i += 1 if inline else 2
            if value is None:
                return None
            if name == "--device":
                if value != "cpu":
                    return None
            elif not value.isdigit() or int(value) < 1:
                return None
            else:
                options["num_threads"] = int(value)
            continue
        if arg in _FLAGS:
            if arg == "--adapter-only":
                options["adapter_only"] = True
            else:
                options["quiet"] = arg == "--quiet"
        elif len(arg) > 1 and arg.strip("v") == "-":
            options["verbosity"] += len(arg) - 1
        elif arg.startswith("-") or arg == "":
            return None
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2 or not options.pop("adapter_only"):
        return None
    return positional[0], positional[1], options


def try_run(args: list[str]) -> bool:
    """Run an adapter-only merge without mergekit if possible; False if not."""
    parsed = _parse(args)
    if parsed is None or not os.path.isfile(parsed[0]):
        return False
    config_file, out_path, values = parsed
    import yaml

    try:
        with open(config_file, encoding="utf-8") as fh:
            text = fh.read()
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # mergekit's path reports it
    from mergekit_tada.config import PlainOptions, read_plain_config
    from mergekit_tada.methods import registry

    config = read_plain_config(data)
    if config is None or registry.get(config.merge_method) is None:
        return False
    options = PlainOptions(**values)
    _apply(options)

    from mergekit_tada.errors import TadaError
    from mergekit_tada.run.main import run

    try:
        run(config, options, out_path, text, planner=definitions_planner)
    except Declined:
        return False
    except TadaError as error:
        error.show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:  # as click reports it (the run cleaned up already)
        print("\nAborted!", file=sys.stderr)
        sys.exit(1)
    return True


def _apply(options: Any) -> None:
    """What ``MergeOptions.apply_global_options`` does with these options."""
    levels = {0: logging.WARNING, 1: logging.INFO}
    logging.basicConfig(level=levels.get(options.verbosity, logging.DEBUG))
    if options.num_threads is not None:
        import torch

        torch.set_num_threads(options.num_threads)
        torch.set_num_interop_threads(options.num_threads)


def definitions_planner(plan: Any) -> list:
    """The plan's planner here: mergekit's JSON definitions, or Declined."""
    from mergekit_tada.errors import TadaError
    from mergekit_tada.run.planners import from_definitions

    try:
        planned = from_definitions(
            plan.config,
            plan.method.spec,
            plan.base_path,
            plan.headers.index.tensor_paths,
        )
    except TadaError:
        raise
    except Exception as error:  # e.g. a value mergekit's validation refuses
        raise Declined(str(error)) from error
    if planned is None:
        raise Declined("no JSON architecture definition")
    return planned


def main() -> None:
    """The ``mergekit-tada`` console script: this path if it applies, else the CLI."""
    if try_run(sys.argv[1:]):
        return
    from mergekit_tada.cli import main as cli

    cli()
