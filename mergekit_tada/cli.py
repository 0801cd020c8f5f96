"""``mergekit-tada``: the mergekit-yaml command line, plus retrieval composition.

    mergekit-tada CONFIG OUT [--adapter-only] [mergekit-yaml options]
    mergekit-tada index LIBRARY.yml --db DIR
    mergekit-tada route --db DIR --query TEXT [--json]
    mergekit-tada compose --db DIR --queries FILE OUT [--method M] [--adapter-only]

``--chroma-host/--chroma-port`` use a Chroma server instead of ``--db``.
Our errors print as one ``Error: ...`` line (``TadaError`` is a
``click.ClickException``). The console script enters at
:func:`mergekit_tada.fastpath.main`, which runs a plain adapter-only merge
without importing mergekit and hands everything else to :func:`main` here.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_tada.version import __version__

_GROUP_OPTIONS = ("--help", "-h", "--version", "--list-methods")


class _MergeByDefault(click.Group):
    """``mergekit-tada CONFIG OUT ...`` is the ``merge`` command (mergekit's habit)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in _GROUP_OPTIONS:
            args = ["merge", *args]
        return super().parse_args(ctx, args)


def _list_methods(ctx: click.Context, _param, value: bool) -> None:
    """Print every merge method mergekit-yaml knows, ours marked, and exit."""
    if not value or ctx.resilient_parsing:
        return
    from mergekit.merge_methods import registry

    from mergekit_tada.methods.registry import METHOD_NAMES

    for method in sorted(registry.registered_methods(), key=lambda m: m.spec.name):
        origin = "mergekit-tada" if method.spec.name in METHOD_NAMES else "mergekit"
        pretty = method.spec.pretty_name or ""
        click.echo(f"{method.spec.name:<24} {origin:<14} {pretty}")
    ctx.exit()


@click.group("mergekit-tada", cls=_MergeByDefault)
@click.version_option(__version__, prog_name="mergekit-tada")
@click.option(
    "--list-methods",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_list_methods,
    help="List every merge method (ours and mergekit's) and exit.",
)
def main() -> None:
    """Merge LoRA adapters (TaDA, TARA, the LoRA-space family) and compose them
    from a retrieval library. `mergekit-tada CONFIG OUT` runs a merge."""


@main.command("merge", cls=PrettyPrintHelp)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path")
@click.option(
    "--adapter-only",
    is_flag=True,
    help="Write only the merged PEFT adapter and the report; never read base weights.",
)
@add_merge_options
def merge_command(
    merge_options: MergeOptions, config_file: str, out_path: str, adapter_only: bool
):
    """Merge LoRA adapters with a mergekit-tada method (same YAML as mergekit-yaml)."""
    from mergekit_tada.api import merge

    merge_options.apply_global_options()
    merge(config_file, out_path, adapter_only=adapter_only, options=merge_options)


# ------------------------------------------------------------------ retrieval


def _store_options(func: Callable) -> Callable:
    for option in reversed(
        (
            click.option(
                "--db", type=click.Path(file_okay=False), help="Embedded Chroma folder."
            ),
            click.option(
                "--chroma-host", help="A Chroma server (chroma run) instead of --db."
            ),
            click.option("--chroma-port", type=int, default=8000, show_default=True),
            click.option(
                "--collection", default="mergekit-tada-adapters", show_default=True
            ),
            click.option(
                "--embedder",
                type=click.Path(exists=True, file_okay=False),
                help="A sentence-transformers model folder (default: the offline all-MiniLM-L6-v2).",
            ),
        )
    ):
        func = option(func)
    return func


def _routing_options(func: Callable) -> Callable:
    for option in reversed(
        (
            click.option(
                "--query", "query_texts", multiple=True, help="A query (repeatable)."
            ),
            click.option(
                "--queries",
                "queries_file",
                type=click.Path(exists=True),
                help="Queries: .txt (a line each), .jsonl or a saved dataset.",
            ),
            click.option(
                "--text-fields",
                default="text",
                show_default=True,
                help="Comma-separated fields of --queries rows.",
            ),
            click.option(
                "-k", "--top-k", "k", type=int, default=100, show_default=True
            ),
            click.option(
                "--weighting",
                type=click.Choice(["sum", "count"]),
                default="sum",
                show_default=True,
                help="Per adapter: sum of neighbour similarities, or their count.",
            ),
            click.option(
                "-p", "--nucleus", "p", type=float, default=0.9, show_default=True
            ),
            click.option("--max-adapters", type=int, default=None),
        )
    ):
        func = option(func)
    return func


def _store(db, chroma_host, chroma_port, collection):
    from mergekit_tada.retrieval.store import Store

    return Store(db=db, host=chroma_host, port=chroma_port, collection=collection)


def _embedder(path, quiet):
    from mergekit_tada.retrieval.store import Embedder

    return Embedder(path, quiet=quiet)


def _routing(
    store,
    embedder,
    query_texts,
    queries_file,
    text_fields,
    k,
    weighting,
    p,
    max_adapters,
):
    from mergekit_tada.errors import TadaError
    from mergekit_tada.retrieval.route import route
    from mergekit_tada.texts import read_texts

    queries = list(query_texts)
    if queries_file:
        fields = [f.strip() for f in text_fields.split(",") if f.strip()]
        queries += read_texts(queries_file, "queries", fields=fields, separator=" | ")
    if not queries:
        raise TadaError("give --query TEXT or --queries FILE")
    return route(
        queries,
        store,
        embedder,
        k=k,
        weighting=weighting,
        p=p,
        max_adapters=max_adapters,
    )


_QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")


@main.command("index")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@_store_options
@_QUIET
def index_command(library, db, chroma_host, chroma_port, collection, embedder, quiet):
    """Embed each library adapter's samples into the Chroma collection."""
    from mergekit_tada.retrieval.index import index_library

    summary = index_library(
        library,
        _store(db, chroma_host, chroma_port, collection),
        _embedder(embedder, quiet),
        quiet=quiet,
    )
    click.echo(
        f"indexed {', '.join(summary.indexed) or 'nothing'}; unchanged "
        f"{', '.join(summary.skipped) or 'none'}; removed "
        f"{', '.join(summary.removed) or 'none'}; {summary.rows} rows"
    )


@main.command("route")
@_store_options
@_QUIET
@_routing_options
@click.option(
    "--json", "as_json", is_flag=True, help="Print the whole routing as JSON."
)
def route_command(
    db, chroma_host, chroma_port, collection, embedder, quiet, as_json, **routing
):
    """Print the adapter weights for a new task's inputs."""
    from dataclasses import asdict

    result = _routing(
        _store(db, chroma_host, chroma_port, collection),
        _embedder(embedder, True),
        **routing,
    )
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2, sort_keys=True))
        return
    for name, weight in sorted(result.weights.items(), key=lambda kv: -kv[1]):
        click.echo(f"{name}\t{weight:.4f}")


@main.command("compose", cls=PrettyPrintHelp)
@click.argument("out_path")
@_store_options
@_routing_options
@click.option(
    "--method",
    default="lora_task_arithmetic",
    show_default=True,
    help="a multi-adapter method: lora_task_arithmetic, lora_ties, lora_dare_ties, "
    "lora_dare_linear, lora_breadcrumbs, lora_breadcrumbs_ties, lora_della, "
    "lora_della_linear, lora_magnitude_prune, lora_knots_ties, lora_tsv_m",
)
@click.option(
    "--adapter-only", is_flag=True, help="Write the adapter, not the full model."
)
@click.option(
    "--rank", type=int, default=None, help="Output rank (default: the method's)."
)
@click.option("--dtype", default=None, help="dtype of the merged full model.")
@add_merge_options
def compose_command(
    merge_options: MergeOptions,
    out_path,
    db,
    chroma_host,
    chroma_port,
    collection,
    embedder,
    method,
    adapter_only,
    rank,
    dtype,
    **routing,
):
    """Route a new task's inputs and merge the selected adapters into OUT."""
    from mergekit_tada.retrieval.compose import check_method, compose

    check_method(method)  # before the seconds of embedding and routing
    merge_options.apply_global_options()
    result = _routing(
        _store(db, chroma_host, chroma_port, collection),
        _embedder(embedder, True),
        **routing,
    )
    compose(
        result,
        out_path,
        method=method,
        adapter_only=adapter_only,
        rank=rank,
        dtype=dtype,
        options=merge_options,
    )
    weights = ", ".join(f"{n} {w:.3f}" for n, w in result.weights.items())
    click.echo(f"composed {weights} with {method} into {out_path}")


if __name__ == "__main__":
    main()
