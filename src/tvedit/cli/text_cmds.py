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


def register(app: typer.Typer) -> None:
    @app.command("export-hf")
    @guard
    def export_hf(
        checkpoint: Path = typer.Argument(..., help="A tvedit checkpoint of an hf-seq2seq model (e.g. the output of add)."),
        output: Path = typer.Option(..., "--output", "-o", help="The Hugging Face directory to write."),
        like: Path | None = typer.Option(None, "--like", help="Copy config and tokenizer files from this Hugging Face directory (default: the config and tokenizer the checkpoint records)."),
        dtype: str | None = typer.Option(None, "--dtype", help="Weights dtype (float32, float16, bfloat16). Default: the checkpoint's."),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Write a checkpoint as a Hugging Face directory that AutoModelForSeq2SeqLM.from_pretrained loads."""
        from tvedit.models.hf_seq2seq import export_directory

        out = export_directory(checkpoint, output, like=like, dtype=parse_dtype_option(dtype), force=force)
        if json_mode(as_json):
            print_json({"path": str(out), "kind": "hf-directory", "source": str(checkpoint)})
        else:
            typer.echo(f"wrote {out}")
