"""Files the package ships: DeepSpeed config templates (`ds_configs/`) and run configs (`launch/configs/`).

Both directories stay where they are in the repository; setup.cfg maps them into the package as
`pipeline.ds_configs` and `pipeline.run_configs`, so a wheel installed anywhere carries them and an
editable install reads them in place (docs/design.md §8).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pipeline.errors import UserError

DS_CONFIGS = "pipeline.ds_configs"
RUN_CONFIGS = "pipeline.run_configs"


def ds_config_template(name: str) -> dict:
    """`ds_configs/NAME.json` (zero1, zero2, zero3, fp32, bf16) as a dict."""
    return json.loads(resources.files(DS_CONFIGS).joinpath(f"{name}.json").read_text())


def shipped_run_configs() -> list[str]:
    """Names of the run configs that `--config NAME` accepts (launch/configs/NAME.yaml)."""
    files = resources.files(RUN_CONFIGS).iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def run_config_text(config: str) -> tuple[str, str]:
    """(text, where) of `--config`: a YAML file path, or the name of a shipped run config (tiny_cpu).

    A file of that path wins over a shipped config of that name; a name has no directory and no suffix.
    """
    path = Path(config)
    if path.is_file():
        try:
            return path.read_text(), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--config {config}: cannot read the file ({exc})") from exc
    names = shipped_run_configs()
    if config in names:
        return resources.files(RUN_CONFIGS).joinpath(f"{config}.yaml").read_text(), f"shipped {config}.yaml"
    what = "is not a file" if path.exists() else "no such file"
    raise UserError(f"--config {config}: {what}, and not a shipped run config (one of: {', '.join(names)})")
