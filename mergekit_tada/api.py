"""Python API for notebooks: the same merge as ``mergekit-yaml`` / ``mergekit-tada``."""

from __future__ import annotations

import os
from typing import Any

import pydantic
import yaml


def load_config(config: str | os.PathLike | dict | Any):
    """A MergeConfiguration from a YAML path, YAML text, a dict or itself.

    Unreadable YAML and mergekit's own validation errors become one
    ``TadaError`` line naming the file and the offending key.
    """
    from mergekit.config import MergeConfiguration

    from mergekit_tada.errors import TadaError

    if isinstance(config, MergeConfiguration):
        from mergekit_tada.run.report import config_as_written

        return config, yaml.safe_dump(config_as_written(config, None))
    where, text = "config", None
    if isinstance(config, dict):
        data, text = config, yaml.safe_dump(config)
    else:
        text = str(config)
        if "\n" not in text and os.path.exists(text):
            where = text
            with open(text, encoding="utf-8") as fh:
                text = fh.read()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            message = f"{where}: not valid YAML ({error})".replace("\n", " ")
            raise TadaError(message) from None
    try:
        return MergeConfiguration.model_validate(data), text
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}"
            for e in error.errors()
        )
        raise TadaError(
            f"{where}: invalid mergekit configuration: {problems}"
        ) from None


def merge(
    config: str | os.PathLike | dict | Any,
    out_path: str | os.PathLike,
    *,
    adapter_only: bool = False,
    options: Any = None,
    extra_files: dict[str, str] | None = None,
    **option_values: Any,
) -> str:
    """Run a merge; return the output folder.

    ``config``: a YAML path, YAML text, a dict or a ``MergeConfiguration``.
    ``adapter_only``: write only the PEFT adapter and the report (the base
    weights are never read). ``options``: a ``mergekit.options.MergeOptions``,
    or give its fields as keywords (``out_shard_size=...``, ``device="cuda"``).
    ``extra_files``: name -> text written with the outputs (same commit), for
    our methods only.
    """
    import mergekit.merge
    from mergekit.options import MergeOptions

    from mergekit_tada._hook import ensure_installed
    from mergekit_tada.integration import run_ours

    ensure_installed()
    merge_config, source = load_config(config)
    if options is None:
        options = MergeOptions(**option_values)
    elif option_values:
        options = options.model_copy(update=option_values)
    out_path = str(out_path)
    if adapter_only or extra_files:
        run_ours(
            merge_config,
            options,
            out_path,
            source,
            full=not adapter_only,
            extra_files=extra_files,
        )
    else:
        mergekit.merge.run_merge(
            merge_config, out_path, options=options, config_source=source
        )
    return out_path
