"""extract, add, scale, negate: the arithmetic commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tvedit.checks import finite_number
from tvedit.cli.common import (
    FINITE,
    FORCE_HELP,
    JSON_HELP,
    MISMATCH_HELP,
    OUT_DIR_HELP,
    OUT_HELP,
    guard,
    json_mode,
    parse_dtype_option,
    piped,
    progress_bar,
    report,
)
from tvedit.errors import UsageError
from tvedit.safeio import check_output_parent

DTYPE_HELP = "Output dtype (float32, float16, bfloat16, float64). Default: the base's dtype."
COMPUTE_HELP = "Accumulate in float32 (default) or float64."
MISSING_HELP = "Treat a key missing from some inputs as zero instead of failing."
NONFINITE_HELP = "Write results that contain NaN/Inf instead of failing."
LAYOUT_HELP = "Task-vector storage: auto (sparse when a tensor is at most half non-zero), dense, sparse."
FORMAT_HELP = "Output format: auto (a Hugging Face directory when -o ends with '/' or is an existing directory), safetensors, hf."
SHARD_HELP = "Largest weights file of a Hugging Face directory output, e.g. 5GB, 500MB. Default: transformers' save_pretrained default."
VERIFY_HELP = (
    "Hash every input as it is read and fail (exit 3, nothing written) when one does not match the"
    " content hash its manifest records (or the hash cached on its first use). Costs the sha256 of the inputs."
)
DEVICE_HELP = (
    "Compute on this device: cpu, cuda, cuda:N or auto (CUDA when available). Tensors are read on the"
    " host, copied over and back. Default: in place on the host (no copies)."
)
LIKE_HELP = "Copy config and tokenizer files from this Hugging Face directory (default: the base's directory)."


def arith_options(dtype: str | None, compute: str, allow_missing: bool, allow_nonfinite: bool, layout: str, allow_mismatch: str | None = None,
                  verify_inputs: bool = False, device: str | None = None):
    import torch

    from tvedit.engine import ArithOptions, parse_mismatch
    from tvedit.models.base import pick_device

    if compute not in ("float32", "float64"):
        raise UsageError(f"--compute-dtype must be float32 or float64, not {compute!r}")
    if layout not in ("auto", "dense", "sparse"):
        raise UsageError(f"--layout must be auto, dense or sparse, not {layout!r}")
    return ArithOptions(
        dtype=parse_dtype_option(dtype),
        compute_dtype=torch.float64 if compute == "float64" else torch.float32,
        allow_missing=allow_missing,
        allow_nonfinite=allow_nonfinite,
        layout=layout,
        allow_mismatch=parse_mismatch(allow_mismatch),
        verify_inputs=verify_inputs,
        device=pick_device(device) if device is not None else None,
    )


def resolve_cli_inputs(args: list[str]):
    from tvedit.pipeline import resolve_inputs

    if not args:
        raise UsageError("no inputs given")
    return resolve_inputs(args)


def cli_target(raw_output: str | None, out_dir: Path | None, force: bool, fmt: str = "safetensors", max_shard_size: str | None = None, like: Path | None = None):
    from tvedit import hfdir
    from tvedit.pipeline import output_target

    hf = hfdir.wants_directory(raw_output, fmt)  # the raw string: Path() drops a trailing '/'
    output = Path(raw_output) if raw_output is not None else None
    if not hf and (max_shard_size is not None or like is not None):
        raise UsageError("--max-shard-size and --like apply to Hugging Face directory outputs (-o DIR/ or --format hf)")
    if hf and output is None and out_dir is None:
        raise UsageError("a Hugging Face directory output needs -o DIR or --out-dir DIR")
    if like is not None and hfdir.hf_root(like) is None:
        raise UsageError(f"--like {like}: not a Hugging Face directory (no config.json)")
    if hf and output is not None and output.exists() and not output.is_dir() and not force:
        raise UsageError(f"{output}: is a file; a Hugging Face directory output needs a directory path (or --force to replace it)")
    for path in (output, out_dir):  # a missing parent directory is a typo: exit 6 before any work
        if path is not None:
            check_output_parent(path)
    target = output_target(output, out_dir, force, piped())
    if hf:
        target.hf = hfdir.HFOutput(hfdir.parse_size(max_shard_size) if max_shard_size is not None else None, like)
    return target


def register(app: typer.Typer) -> None:
    @app.command()
    @guard
    def extract(
        finetuned: list[str] = typer.Argument(..., help="Fine-tuned checkpoints (or '-' for piped JSON lines, or a recipe)."),
        base: Path = typer.Option(..., "--base", "-b", help="The pre-trained checkpoint theta0."),
        output: str | None = typer.Option(None, "--output", "-o", help=OUT_HELP),
        out_dir: Path | None = typer.Option(None, "--out-dir", help=OUT_DIR_HELP + " Suffix: tv."),
        fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
        max_shard_size: str | None = typer.Option(None, "--max-shard-size", help=SHARD_HELP),
        dtype: str | None = typer.Option(None, "--dtype", help=DTYPE_HELP),
        compute_dtype: str = typer.Option("float32", "--compute-dtype", help=COMPUTE_HELP),
        layout: str = typer.Option("auto", "--layout", help=LAYOUT_HELP),
        allow_missing: bool = typer.Option(False, "--allow-missing", help=MISSING_HELP),
        allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help=NONFINITE_HELP),
        allow_mismatch: str | None = typer.Option(None, "--allow-mismatch", help=MISMATCH_HELP),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        verify_inputs: bool = typer.Option(False, "--verify-inputs", help=VERIFY_HELP),
        device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Task vectors tau = theta* - theta0, one per fine-tuned checkpoint (floating tensors only)."""
        from tvedit import arith
        from tvedit.pipeline import InputSpec

        opts = arith_options(dtype, compute_dtype, allow_missing, allow_nonfinite, layout, allow_mismatch, verify_inputs, device)
        inputs = resolve_cli_inputs(finetuned)
        target = cli_target(output, out_dir, force, fmt, max_shard_size)
        with progress_bar("extract") as bar:
            arts = arith.extract(inputs.items, InputSpec(base), target, opts, bar)
        report(arts, json_mode(as_json))

    @app.command()
    @guard
    def add(
        inputs: list[str] = typer.Argument(..., help="Task vectors or fine-tuned checkpoints, '-' for piped JSON lines, or a YAML recipe."),
        alpha: float | None = typer.Option(None, "--alpha", "-a", help="Scaling coefficient applied to the merged vector. Default 1.0.", parser=FINITE),
        weights: str | None = typer.Option(None, "--weights", "-w", help="Comma-separated per-input weights, e.g. 1,0.5,0.5 (default 1 each)."),
        base: Path | None = typer.Option(None, "--base", "-b", help="theta0. Default: the base recorded in the inputs."),
        method: str | None = typer.Option(None, "--method", "-m", help="Merge method (see `tvedit methods`). Default: sum."),
        option: list[str] = typer.Option([], "--option", help="Method option KEY=VALUE (repeatable), e.g. --option density=0.2."),
        include: list[str] = typer.Option([], "--include", help="tsv, iso-c, iso-cts: only keys matching this glob take the SVD path (repeatable)."),
        exclude: list[str] = typer.Option([], "--exclude", help="tsv, iso-c, iso-cts: keys matching this glob skip the SVD path (repeatable)."),
        emit: str = typer.Option("checkpoint", "--emit", help="checkpoint: theta0 + alpha*merged; vector: alpha*merged as a task vector."),
        output: str | None = typer.Option(None, "--output", "-o", help=OUT_HELP + " A directory path writes a Hugging Face directory."),
        fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
        max_shard_size: str | None = typer.Option(None, "--max-shard-size", help=SHARD_HELP),
        like: Path | None = typer.Option(None, "--like", help=LIKE_HELP),
        dtype: str | None = typer.Option(None, "--dtype", help=DTYPE_HELP),
        compute_dtype: str = typer.Option("float32", "--compute-dtype", help=COMPUTE_HELP),
        layout: str = typer.Option("auto", "--layout", help=LAYOUT_HELP + " (with --emit vector)"),
        allow_missing: bool = typer.Option(False, "--allow-missing", help=MISSING_HELP),
        allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help=NONFINITE_HELP),
        allow_mismatch: str | None = typer.Option(None, "--allow-mismatch", help=MISMATCH_HELP),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        verify_inputs: bool = typer.Option(False, "--verify-inputs", help=VERIFY_HELP),
        device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Merge task vectors into theta0: theta = theta0 + alpha * merge(w_i tau_i)."""
        from tvedit import arith
        from tvedit.pipeline import InputSpec

        opts = arith_options(dtype, compute_dtype, allow_missing, allow_nonfinite, layout, allow_mismatch, verify_inputs, device)
        recipe = _mergekit_recipe(inputs)
        if recipe is not None:
            given = [n for n, v in (("--method", method), ("--weights", weights), ("--alpha", alpha), ("--base", base)) if v is not None]
            if given or emit != "checkpoint" or any(not o.startswith("seed=") for o in option):
                raise UsageError(f"{inputs[0]}: a mergekit recipe sets method, weights and base itself; only --option seed=N applies ({(given or ['--option/--emit'])[0]} given)")
            target = cli_target(output, None, force, fmt, max_shard_size, like)
            _run_mergekit(recipe, option, opts, target, dtype, compute_dtype, as_json)
            return
        cli_options = parse_options(option)
        cli_options.update({k: v for k, v in (("include", include), ("exclude", exclude)) if v})
        if method is not None:  # options given with --method are checked before stdin or any file is read
            _check_method_options(method, cli_options)
        resolved = resolve_cli_inputs(inputs)
        recipe = resolved.options
        check_recipe(recipe, recipe_name(inputs))
        method = method or recipe.get("method", "sum")
        method_options: dict[str, Any] = dict(recipe.get("options") or {})
        method_options.update(cli_options)
        _check_method_options(method, method_options)
        if alpha is None:
            alpha = finite_number(recipe.get("alpha", 1.0), f"{recipe_name(inputs)}: alpha")
        weight_list = parse_weights(weights, len(resolved.items)) if weights else None
        base_path = base or (Path(recipe["base"]) if recipe.get("base") else None)
        target = cli_target(output, None, force, fmt, max_shard_size, like)
        with progress_bar(f"add ({method})") as bar:
            art = arith.add(
                resolved.items, target, base=InputSpec(base_path) if base_path else None, alpha=alpha,
                weights=weight_list, method=method, method_options=method_options, emit=emit, opts=opts, progress=bar,
            )  # fmt: skip
        report([art], json_mode(as_json))

    def _unary(op: str, inputs: list[str], by: float, output, out_dir, fmt, max_shard_size, dtype, compute_dtype, layout, allow_nonfinite, force, as_json, verify_inputs, device) -> None:
        from tvedit import arith

        opts = arith_options(dtype, compute_dtype, False, allow_nonfinite, layout, verify_inputs=verify_inputs, device=device)
        resolved = resolve_cli_inputs(inputs)
        target = cli_target(output, out_dir, force, fmt, max_shard_size)
        with progress_bar(op) as bar:
            arts = arith.scale(resolved.items, by, target, opts, bar, _op=op)
        report(arts, json_mode(as_json))

    @app.command()
    @guard
    def scale(
        inputs: list[str] = typer.Argument(..., help="Task vectors, '-' for piped JSON lines, or a recipe."),
        by: float = typer.Option(..., "--by", "-c", help="The coefficient c in c * tau.", parser=FINITE),
        output: str | None = typer.Option(None, "--output", "-o", help=OUT_HELP),
        out_dir: Path | None = typer.Option(None, "--out-dir", help=OUT_DIR_HELP + " Suffix: scaled."),
        fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
        max_shard_size: str | None = typer.Option(None, "--max-shard-size", help=SHARD_HELP),
        dtype: str | None = typer.Option(None, "--dtype", help="Output dtype. Default: the input's."),
        compute_dtype: str = typer.Option("float32", "--compute-dtype", help=COMPUTE_HELP),
        layout: str = typer.Option("auto", "--layout", help=LAYOUT_HELP),
        allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help=NONFINITE_HELP),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        verify_inputs: bool = typer.Option(False, "--verify-inputs", help=VERIFY_HELP),
        device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Scale task vectors: c * tau."""
        _unary("scale", inputs, by, output, out_dir, fmt, max_shard_size, dtype, compute_dtype, layout, allow_nonfinite, force, as_json, verify_inputs, device)

    @app.command()
    @guard
    def negate(
        inputs: list[str] = typer.Argument(..., help="Task vectors, '-' for piped JSON lines, or a recipe."),
        output: str | None = typer.Option(None, "--output", "-o", help=OUT_HELP),
        out_dir: Path | None = typer.Option(None, "--out-dir", help=OUT_DIR_HELP + " Suffix: neg."),
        fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
        max_shard_size: str | None = typer.Option(None, "--max-shard-size", help=SHARD_HELP),
        dtype: str | None = typer.Option(None, "--dtype", help="Output dtype. Default: the input's."),
        compute_dtype: str = typer.Option("float32", "--compute-dtype", help=COMPUTE_HELP),
        layout: str = typer.Option("auto", "--layout", help=LAYOUT_HELP),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        verify_inputs: bool = typer.Option(False, "--verify-inputs", help=VERIFY_HELP),
        device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Negate task vectors: -tau (add the result to theta0 to forget a task)."""
        _unary("negate", inputs, -1.0, output, out_dir, fmt, max_shard_size, dtype, compute_dtype, layout, False, force, as_json, verify_inputs, device)


def _mergekit_recipe(args: list[str]):
    """A single YAML argument with a ``merge_method`` key: a mergekit recipe (parsed, validated)."""
    if len(args) != 1 or Path(args[0]).suffix not in (".yaml", ".yml"):
        return None
    import yaml

    from tvedit import mergekit
    from tvedit.errors import InputError

    path = Path(args[0])
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read recipe: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from None
    return mergekit.parse(path, data) if mergekit.is_mergekit_recipe(data) else None


def _run_mergekit(recipe, option: list[str], opts, target, dtype: str | None, compute_dtype: str, as_json: bool) -> None:
    import torch

    from tvedit import arith, hfdir, mergekit
    from tvedit.pipeline import InputSpec

    seed = parse_options(option).get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--option seed={seed}: must be an integer >= 0")
    if dtype is None and (recipe.out_dtype or recipe.dtype):
        opts.dtype = parse_dtype_option(recipe.out_dtype or recipe.dtype)
    if recipe.dtype and parse_dtype_option(recipe.dtype) == torch.float64:
        opts.compute_dtype = torch.float64
    method, zeroed = mergekit.merge_method(recipe, seed)
    with progress_bar(f"add (mergekit {recipe.method_name})") as bar:
        art = arith.add(
            [InputSpec(p) for p in recipe.models], target, base=InputSpec(recipe.base), alpha=1.0,
            method=method.name, method_options=mergekit.provenance_options(recipe, seed), opts=opts, progress=bar, custom=method,
        )  # fmt: skip
    if zeroed:
        hfdir.warn(f"{recipe.path}: breadcrumbs zeroed {len(zeroed)} tensor(s) whose gamma * size < 1, as mergekit does (e.g. {zeroed[0]!r}); use a filter to give them density 1")
    report([art], json_mode(as_json))


def _check_method_options(method: str, options: dict[str, Any]) -> None:
    from tvedit.merging import METHODS, OPTION_DEFAULTS, resolve_options

    if method not in METHODS:
        raise UsageError(f"--method: unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    bad = sorted(set(options) - set(METHODS[method].options))
    if bad:
        allowed = ", ".join(METHODS[method].options) or "none"
        flag = f"--{bad[0]}" if bad[0] in ("include", "exclude") else "--option"
        raise UsageError(f"{flag}: {method} does not take {bad[0]!r} (it takes: {allowed})")
    if method in OPTION_DEFAULTS:
        resolve_options(method, dict(options))


def recipe_name(args: list[str]) -> str:
    """The recipe among the input arguments (what a value read from a recipe is reported against)."""
    from tvedit.pipeline import RECIPE_SUFFIXES

    return next((a for a in args if Path(a).suffix in RECIPE_SUFFIXES), "recipe")


# what each command default in a recipe must be (alpha and per-input weights: finite numbers)
RECIPE_TYPES: dict[str, tuple[type, str]] = {
    "method": (str, "a method name"), "base": (str, "a path"), "mask": (str, "a path"), "options": (dict, "a mapping of option: value"),
}  # fmt: skip


def check_recipe(recipe: dict[str, Any], name: str) -> None:
    """Each command default a recipe sets has its type (a usage error naming the recipe and key)."""
    for key, (kind, what) in RECIPE_TYPES.items():
        value = recipe.get(key)
        if value is not None and not isinstance(value, kind):
            raise UsageError(f"{name}: {key}: {value!r} is not {what}")
    if isinstance(recipe.get("options"), dict) and not all(isinstance(k, str) for k in recipe["options"]):
        raise UsageError(f"{name}: options: every option name must be a string")


def parse_weights(text: str, n: int) -> list[float]:
    values = [finite_number(x.strip(), f"--weights {text!r}") for x in text.split(",")]
    if len(values) != n:
        raise UsageError(f"--weights: {len(values)} weights for {n} inputs")
    return values


def parse_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values parsed as YAML scalars (numbers, booleans, strings)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--option: {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out
