"""export-hf: write a text-model checkpoint back as a Hugging Face directory."""

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
        art = hfdir.export(checkpoint, output, like=like, dtype=parse_dtype_option(dtype), force=force, max_shard_size=shard)
        if json_mode(as_json):
            print_json({"path": str(art.path), "kind": "hf-directory", "source": str(checkpoint), "sha256": art.manifest.sha256})
        else:
            typer.echo(f"wrote {art.path}")
