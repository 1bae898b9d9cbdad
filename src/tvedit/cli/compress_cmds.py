"""compress: task vectors as truncated SVD factors (the low-rank layout)."""

from __future__ import annotations

from pathlib import Path

import typer

from tvedit.cli.arith_cmds import (
    COMPUTE_HELP,
    DEVICE_HELP,
    LAYOUT_HELP,
    arith_options,
    cli_target,
    resolve_cli_inputs,
)
from tvedit.cli.common import (
    FINITE,
    FORCE_HELP,
    JSON_HELP,
    OUT_DIR_HELP,
    OUT_HELP,
    guard,
    json_mode,
    parse_dtype_option,
    progress_bar,
    report,
)


def register(app: typer.Typer) -> None:
    @app.command()
    @guard
    def compress(
        inputs: list[str] = typer.Argument(..., help="Task vectors, '-' for piped JSON lines, or a recipe."),
        rank: int | None = typer.Option(None, "--rank", help="Keep this many singular triplets per matrix (at most min(m, n))."),
        rank_fraction: float | None = typer.Option(None, "--rank-fraction", help="Keep floor(F * min(m, n)) triplets (at least 1), F in (0, 1].", parser=FINITE),
        energy: float | None = typer.Option(None, "--energy", help="Keep the fewest triplets holding this share of sum(sigma^2), in (0, 1].", parser=FINITE),
        factor_dtype: str | None = typer.Option(None, "--factor-dtype", help="Storage dtype of U, S, V (float32, bfloat16, ...). Default: the tensor's."),
        include: list[str] = typer.Option([], "--include", help="Factor only keys matching this glob (repeatable)."),
        exclude: list[str] = typer.Option([], "--exclude", help="Do not factor keys matching this glob (repeatable)."),
        output: Path | None = typer.Option(None, "--output", "-o", help=OUT_HELP),
        out_dir: Path | None = typer.Option(None, "--out-dir", help=OUT_DIR_HELP + " Suffix: lr."),
        compute_dtype: str = typer.Option("float32", "--compute-dtype", help=COMPUTE_HELP + " (the SVDs)"),
        layout: str = typer.Option("auto", "--layout", help=LAYOUT_HELP + " (tensors that are not factored)"),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Store each 2-D tensor of task vectors as its truncated SVD: KEY::U, KEY::S, KEY::V (every command reads it back dense)."""
        from tvedit.compress import check_rank_options
        from tvedit.compress import compress as run
        from tvedit.keys import KeyFilter

        check_rank_options(rank, rank_fraction, energy)
        opts = arith_options(None, compute_dtype, False, False, layout, device=device)
        dtype = parse_dtype_option(factor_dtype)
        resolved = resolve_cli_inputs(inputs)
        target = cli_target(output, out_dir, force)
        with progress_bar("compress") as bar:
            arts = run(
                resolved.items, target, rank=rank, rank_fraction=rank_fraction, energy=energy,
                keys_filter=KeyFilter(tuple(include), tuple(exclude)), factor_dtype=dtype, opts=opts, progress=bar,
            )  # fmt: skip
        report(arts, json_mode(as_json))
