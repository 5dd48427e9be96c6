"""The `vgg` command line. Each command reads the profile, calls one function of the `vgg` library (or a driver in
`pipelines/`), and prints what it did. Any `VGGError` becomes one line, `error: ...`, and exit status 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.params import DEFAULT_PARAMS, load_profile
from vgg.config import Profile
from vgg.errors import VGGError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Reproduce VGG (Simonyan & Zisserman, ICLR 2015): data, training, every evaluation mode, report.",
)

ParamsOption = Annotated[Path, typer.Option("--params", help="params file holding the profiles")]
ProfileOption = Annotated[
    Optional[str], typer.Option("--profile", help="profile name (default: the params file's 'profile:' key)")
]
SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", help="override a profile key, e.g. --set train.lr=0.02 (repeatable)")
]


@app.callback()
def _root() -> None:
    """Reproduce VGG (Simonyan & Zisserman, ICLR 2015): data, training, every evaluation mode, report."""


def _profile(params: Path, profile: str | None, overrides: list[str] | None) -> Profile:
    return load_profile(params, profile=profile, overrides=overrides or ())


@app.command()
def profile(
    params: ParamsOption = DEFAULT_PARAMS, profile: ProfileOption = None, set_: SetOption = None
) -> None:
    """Print the resolved profile (after overrides) as YAML-like nested keys."""
    resolved = _profile(params, profile, set_)
    _print_tree(resolved.to_dict())


def _print_tree(tree: dict, indent: int = 0) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            typer.echo(" " * indent + f"{key}:")
            _print_tree(value, indent + 2)
        else:
            typer.echo(" " * indent + f"{key}: {value}")


def main() -> None:
    """Console-script entry point: user errors are one line on stderr and exit status 2."""
    try:
        app()
    except VGGError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
