"""mask: sparsify task vectors (top-k, DARE, Breadcrumbs, TALL, consensus), apply and combine masks."""

from __future__ import annotations

from pathlib import Path

import typer

from tvedit.cli.arith_cmds import (
    COMPUTE_HELP,
    DEVICE_HELP,
    LAYOUT_HELP,
    arith_options,
    check_recipe,
    cli_target,
    recipe_name,
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
    lazy_help,
    progress_bar,
    report,
)
from tvedit.errors import UsageError
from tvedit.safeio import check_output_parent


def _help() -> str:
    from tvedit.masking import MASK_METHODS

    lines = "\n".join(f"  {m.name:<12} {m.summary} [{', '.join(m.options) or 'no options'}]" for m in MASK_METHODS.values())
    return (
        "Post-hoc masking of task vectors, and mask algebra. METHOD is one of:\n\n\b\n"
        f"{lines}\n\n"
        "density = fraction of entries KEPT (0..1). Options that do not apply to METHOD are rejected. "
        "--include/--exclude (fnmatch globs, repeatable) choose the tensors that are masked; the others "
        "pass through unchanged (or are zeroed with --zero-unselected). Nothing is excluded by default "
        "(some peers skip embeddings and logit_scale: --exclude '*embed*' --exclude logit_scale). "
        "Semantics: docs/methods.md.\n\n"
        "Example: tvedit extract ft.safetensors -b base.safetensors | tvedit mask topk - --density 0.1 "
        "| tvedit add - --alpha 0.3 -o merged.safetensors"
    )


def register(app: typer.Typer) -> None:
    @app.command(cls=lazy_help(_help), short_help="Sparsify task vectors (topk, dare, breadcrumbs, tall, consensus) or apply/combine masks.")
    @guard
    def mask(
        method: str = typer.Argument(..., help="topk | dare | breadcrumbs | tall | consensus | apply | invert | intersect | union"),
        inputs: list[str] = typer.Argument(..., help="Task vectors (mask files for invert/intersect/union), '-' for piped JSON lines, or a recipe."),
        density: float | None = typer.Option(None, "--density", "-k", help="Fraction of entries kept, 0..1 (topk, dare, breadcrumbs; required).", parser=FINITE),
        scope: str | None = typer.Option(None, "--scope", help="topk: tensor (default) or global (one threshold over the whole vector); breadcrumbs: row (default) or tensor."),
        seed: int | None = typer.Option(None, "--seed", help="dare: random seed (default 0; recorded in the manifest)."),
        rescale: str | None = typer.Option(None, "--rescale", help="dare: inverse (survivors / density, default) or l1 (match the L1 norm of tau)."),
        beta: float | None = typer.Option(None, "--beta", help="breadcrumbs: fraction of largest-|tau| outliers dropped per row (default 0.01).", parser=FINITE),
        lam: float | None = typer.Option(None, "--lambda", help="tall, consensus: lambda in |tau_t| >= lambda |tau_MTL - tau_t| (default 0.6).", parser=FINITE),
        min_agree: int | None = typer.Option(None, "--min-agree", help="consensus: keep entries where at least this many TALL masks agree (default 2)."),
        mask_file: Path | None = typer.Option(None, "--mask", help="apply: the mask file m in tau * m."),
        save_mask: Path | None = typer.Option(None, "--save-mask", help="Also write the mask(s) as kind: mask files (a file for one mask, a directory for several)."),
        include: list[str] = typer.Option([], "--include", help="Mask only keys matching this glob (repeatable)."),
        exclude: list[str] = typer.Option([], "--exclude", help="Do not mask keys matching this glob (repeatable)."),
        zero_unselected: bool = typer.Option(False, "--zero-unselected", help="Zero the tensors not selected by --include/--exclude instead of passing them through."),
        output: Path | None = typer.Option(None, "--output", "-o", help=OUT_HELP),
        out_dir: Path | None = typer.Option(None, "--out-dir", help=OUT_DIR_HELP + " Suffix: METHOD."),
        dtype: str | None = typer.Option(None, "--dtype", help="Output dtype. Default: the input's."),
        compute_dtype: str = typer.Option("float32", "--compute-dtype", help=COMPUTE_HELP + " (masks are computed in float32)"),
        layout: str = typer.Option("auto", "--layout", help=LAYOUT_HELP),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        from tvedit.keys import KeyFilter
        from tvedit.masking import MASK_METHODS
        from tvedit.masking import mask as run_mask
        from tvedit.pipeline import InputSpec

        if method not in MASK_METHODS:
            raise UsageError(f"unknown mask method {method!r}; choose one of: {', '.join(MASK_METHODS)}")
        options = {"density": density, "scope": scope, "seed": seed, "rescale": rescale, "beta": beta, "lambda": lam, "min_agree": min_agree}
        opts = arith_options(dtype, compute_dtype, False, False, layout, device=device)
        # validate options before reading stdin or any file
        from tvedit.masking import resolve_options

        resolve_options(MASK_METHODS[method], options)
        resolved = resolve_cli_inputs(inputs)
        check_recipe(resolved.options, recipe_name(inputs))
        if mask_file is None and resolved.options.get("mask"):
            mask_file = Path(resolved.options["mask"])
        target = cli_target(output, out_dir, force)
        if save_mask is not None:
            check_output_parent(save_mask)
        keys_filter = KeyFilter(tuple(include), tuple(exclude), zero_unselected)
        with progress_bar(f"mask {method}") as bar:
            result = run_mask(
                method, resolved.items, target, options=options, mask_file=InputSpec(mask_file) if mask_file else None,
                save_mask=save_mask, keys_filter=keys_filter, opts=opts, progress=bar,
            )  # fmt: skip
        if json_mode(as_json):
            report(result.outputs, True)  # only the outputs: a piped `add -` must not receive the masks
        else:
            report(result.outputs + result.masks, False)
