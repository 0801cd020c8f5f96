"""``mergekit-tada``: the mergekit-yaml command line, plus ``--adapter-only``."""

from __future__ import annotations

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_tada import __version__


def _list_methods(ctx: click.Context, _param, value: bool) -> None:
    """Print every merge method mergekit-yaml knows, ours marked, and exit."""
    if not value or ctx.resilient_parsing:
        return
    from mergekit.merge_methods import registry

    from mergekit_tada.methods.specs import METHOD_NAMES

    for method in sorted(registry.registered_methods(), key=lambda m: m.spec.name):
        origin = "mergekit-tada" if method.spec.name in METHOD_NAMES else "mergekit"
        pretty = method.spec.pretty_name or ""
        click.echo(f"{method.spec.name:<24} {origin:<14} {pretty}")
    ctx.exit()


@click.command("mergekit-tada", cls=PrettyPrintHelp)
@click.version_option(__version__, prog_name="mergekit-tada")
@click.option(
    "--list-methods",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_list_methods,
    help="List every merge method (ours and mergekit's) and exit.",
)
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

    merge_options.apply_global_options()
    # TadaError is a ClickException: click prints it as one "Error: ..." line
    merge(config_file, out_path, adapter_only=adapter_only, options=merge_options)


if __name__ == "__main__":
    main()
