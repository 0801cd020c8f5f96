"""``mergekit-tada``: the mergekit-yaml command line, plus ``--adapter-only``."""

from __future__ import annotations

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options


@click.command("mergekit-tada", cls=PrettyPrintHelp)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path")
@click.option(
    "--adapter-only",
    is_flag=True,
    help="Write only the merged PEFT adapter and the report; never read base weights.",
)
@add_merge_options
def main(
    merge_options: MergeOptions, config_file: str, out_path: str, adapter_only: bool
):
    """Merge LoRA adapters with a mergekit-tada method (same YAML as mergekit-yaml)."""
    from mergekit_tada.api import merge
    from mergekit_tada.errors import TadaError

    merge_options.apply_global_options()
    try:
        merge(config_file, out_path, adapter_only=adapter_only, options=merge_options)
    except TadaError as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
