"""export-hf and export-lora: write a checkpoint back as a Hugging Face directory, a task vector as a PEFT LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import typer

from tvedit.cli.common import (
    FORCE_HELP,
    JSON_HELP,
    guard,
    json_mode,
    parse_dtype_option,
    print_json,
)
from tvedit.errors import UsageError
from tvedit.safeio import check_output_parent


def register(app: typer.Typer) -> None:
    @app.command("export-hf")
    @guard
    def export_hf(
        checkpoint: Path = typer.Argument(..., help="A tvedit checkpoint (e.g. the output of add)."),
        output: Path = typer.Option(..., "--output", "-o", help="The Hugging Face directory to write."),
        like: Path | None = typer.Option(None, "--like", help="Copy config and tokenizer files from this Hugging Face directory (default: the directory the checkpoint records)."),
        dtype: str | None = typer.Option(None, "--dtype", help="Weights dtype (float32, float16, bfloat16). Default: the checkpoint's."),
        max_shard_size: str | None = typer.Option(None, "--max-shard-size", help="Largest weights file, e.g. 5GB, 500MB. Default: transformers' save_pretrained default."),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Write a checkpoint as a Hugging Face directory that AutoModel*.from_pretrained loads (any architecture)."""
        check_output_parent(output)
        from tvedit import hfdir

        if like is not None and hfdir.hf_root(like) is None:
            raise UsageError(f"--like {like}: not a Hugging Face directory (no config.json)")
        shard = hfdir.parse_size(max_shard_size) if max_shard_size is not None else None
        from tvedit.models.hf_seq2seq import export_hf

        art = export_hf(checkpoint, output, like=like, dtype=parse_dtype_option(dtype), force=force, max_shard_size=shard)
        if json_mode(as_json):
            print_json({"path": str(art.path), "kind": "hf-directory", "source": str(checkpoint), "sha256": art.manifest.sha256})
        else:
            typer.echo(f"wrote {art.path}")

    @app.command("export-lora")
    @guard
    def export_lora(
        vector: Path = typer.Argument(..., help="A task vector (e.g. from extract, add --emit vector or import)."),
        output: Path = typer.Option(..., "--output", "-o", help="The adapter directory to write (adapter_config.json, adapter_model.safetensors, README.md)."),
        base: Path = typer.Option(..., "--base", help="The Hugging Face directory of θ0 (the model PEFT loads the adapter onto)."),
        rank: int | None = typer.Option(None, "--rank", help="Keep this many singular triplets per matrix (at most its full rank)."),
        energy: float | None = typer.Option(None, "--energy", help="Per matrix, the smallest rank keeping this fraction of Σσ² (0 < E <= 1)."),
        modules_to_save: bool = typer.Option(False, "--modules-to-save", help="Save the modules of non-matrix entries (biases, norms) whole as modules_to_save (θ0 + τ) instead of dropping them."),
        force: bool = typer.Option(False, "--force", "-f", help="Replace an existing output directory (never an input)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON line: the path, the error per tensor, what was dropped."),
    ) -> None:
        """Write a task vector as a PEFT LoRA adapter: per matrix of a Linear, Conv1D or Embedding module its truncated SVD (B·A); the truncation error is reported per tensor and in the model card."""
        from tvedit.lora import export_adapter

        result = export_adapter(vector, output, base=base, rank=rank, energy=energy, modules_to_save=modules_to_save, force=force)
        if json_mode(as_json):
            print_json(result.to_dict())
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"wrote {result.path}", show_edge=False, header_style="bold")
        for col in ("tensor", "shape", "rank", "relative error"):
            t.add_column(col)
        for row in result.tensors:
            t.add_row(row.key, str(row.shape), f"{row.rank}/{row.full_rank}", f"{row.relative_error:.4g}")
        for d in result.dropped:
            t.add_row(d["key"], str(d["shape"]), "dropped", "1")
        Console().print(t)
        typer.echo(f"relative error over the task vector: {result.relative_error:.6g}" + (f"; modules_to_save: {', '.join(result.modules_to_save)}" if result.modules_to_save else ""))
