"""Plain `--help` for `bcc` and `bcc-train`: typer's defaults show `<bool>` after flags (as if they
took a value), `{root}` in usage lines and `<list[Path]>` for repeatable options; a lab user reads
`--csv`, `ROOT` and `BUNDLE` instead.  Every command is declared with `@app.command(cls=Command)`.
"""

from __future__ import annotations

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption


class Command(TyperCommand):
    """A typer command whose help shows flags bare and arguments as NAME (or [NAME])."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for p in self.params:
            if isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
                p.metavar = ""  # a flag takes no value: show none

    # typer passes its own Context; the base class names the click it vendors (typer._click).
    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:  # type: ignore[override]
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = (p.metavar or p.name or "").upper()
                pieces.append(name if p.required else f"[{name}]")
            else:
                pieces.extend(p.get_usage_pieces(ctx))
        return pieces

    def get_help_option(self, ctx: typer.Context) -> TyperOption | None:  # type: ignore[override]
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
PRECISION_CHOICES = "auto|fp32|bf16|fp16|int8"
