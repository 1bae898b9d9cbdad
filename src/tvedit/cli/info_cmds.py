"""info, import, methods, clean: looking at files, bringing them in, tidying up."""

from __future__ import annotations

from pathlib import Path

import typer

from tvedit.cli.common import FORCE_HELP, JSON_HELP, guard, json_mode, print_json, report
from tvedit.safeio import check_output_parent


def summarize(path: Path, tensors: bool, verify: bool) -> dict:
    """What ``info`` shows. Headers only (no torch, no tensor reads) unless ``tensors``: then the
    per-tensor table, the norm and the density measured on the data."""
    from tvedit.headers import file_content_hash, resolve_files, summary

    data = summary(path)
    data["norm"] = None
    if verify:
        m = data["manifest"] or {}
        actual = file_content_hash(resolve_files(path))
        data["sha256_actual"] = actual
        recorded = m.get("sha256")
        # True / False: the content hash of every stored tensor against the manifest's; None: the
        # file records no hash (no tvedit manifest), so only its readability was checked
        data["verified"] = None if recorded is None else actual == recorded
        if recorded is None:
            data["checked"] = f"no recorded hash to compare with (no tvedit manifest); every tensor read, content hash {actual}"
        elif data["verified"]:
            data["checked"] = f"content hash of all {data['tensors']} tensors recomputed and equal to the manifest's sha256 {recorded}"
        else:
            data["checked"] = f"content hash {actual} differs from the manifest's sha256 {recorded}"
    if tensors:
        data.update(_tensor_stats(path))
    return data


def _tensor_stats(path: Path) -> dict:
    import torch

    from tvedit.reader import open_checkpoint

    ckpt = open_checkpoint(path)
    rows = []
    nonzero = float_numel = 0
    sq = 0.0
    for key in ckpt.keys():
        info = ckpt.info(key)
        numel = 1
        for s in info.shape:
            numel *= s
        dt = str(info.dtype).replace("torch.", "")
        row = {"key": key, "shape": list(info.shape), "dtype": dt, "sparse": ckpt.is_sparse(key), "encoding": ckpt.encoding(key)}
        if info.dtype.is_floating_point or info.dtype == torch.bool:
            t = ckpt.get(key)
            nz = int(torch.count_nonzero(t))
            nonzero += nz
            float_numel += numel
            norm = float(t.double().norm()) if t.is_floating_point() else float(nz) ** 0.5
            sq += norm**2
            row.update(norm=norm, density=nz / numel if numel else None)
        rows.append(row)
    return {"density": nonzero / float_numel if float_numel else None, "norm": sq**0.5, "tensor_table": rows}


def _storage(data: dict) -> str:
    """'12.3% of dense (lowrank×3, dense×2)': stored tensor bytes over the dense bytes, per encoding."""
    ratio = "" if data["storage_ratio"] is None else f"{100 * data['storage_ratio']:.3g}% of dense "
    return ratio + "(" + ", ".join(f"{k}×{v}" for k, v in sorted(data["layouts"].items())) + ")"


def register(app: typer.Typer) -> None:
    @app.command()
    @guard
    def info(
        files: list[Path] = typer.Argument(..., help="safetensors files, HF index files or model directories."),
        tensors: bool = typer.Option(False, "--tensors", "-t", help="Read every tensor: list each (shape, dtype, norm, density), and the total norm and measured density."),
        verify: bool = typer.Option(False, "--verify", help="Read every tensor, recompute the content hash and compare it with the manifest's (a file without a manifest: says there is nothing to compare with; exit 4 on a mismatch)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object per file."),
    ) -> None:
        """Show a file's manifest, tensor count, sizes, dtypes and hash (from the header; --tensors adds norms and densities)."""
        from rich.console import Console
        from rich.table import Table

        from tvedit.errors import MismatchError

        console = Console()
        bad = []
        for path in files:
            data = summarize(path, tensors, verify)
            if verify and data["verified"] is False:
                bad.append(path)
            if json_mode(as_json):
                print_json(data)
                continue
            m = data["manifest"] or {}
            table = Table(title=str(path), show_header=False, show_edge=False)
            table.add_column(style="bold")
            table.add_column()
            density = "" if data["density"] is None else f"{data['density']:.4g}"
            for k, v in [
                ("kind", data["kind"]), ("model", (m.get("model") or {}).get("architecture") or (m.get("model") or {}).get("family", "unknown")),
                ("regime", m.get("regime", "nonlinear")), ("layout", m.get("layout", "dense")),
                ("storage", _storage(data)),
                ("tensors", data["tensors"]), ("parameters", f"{data['parameters']:,}"), ("bytes", f"{data['bytes']:,}"),
                ("dtypes", ", ".join(f"{k}×{v}" for k, v in data["dtypes"].items())), ("density", density),
                ("norm", "" if data["norm"] is None else f"{data['norm']:.6g}"), ("sha256", data["sha256"]),
                ("base", (m.get("base") or {}).get("sha256", "")[:12] + "  " + str((m.get("base") or {}).get("path") or "")),
                ("provenance", " → ".join(s["op"] for s in m.get("provenance", []))),
            ]:  # fmt: skip
                table.add_row(k, str(v))
            if verify:
                verdict = {True: "yes", False: "[red]NO[/]", None: "nothing to verify against"}[data["verified"]]
                table.add_row("verified", f"{verdict}: {data['checked']}")
            console.print(table)
            if tensors:
                t = Table(show_edge=False, header_style="bold")
                for col in ("key", "shape", "dtype", "norm", "density", "stored as"):
                    t.add_column(col)
                for r in data["tensor_table"]:
                    t.add_row(r["key"], str(r["shape"]), r["dtype"], f"{r.get('norm', 0):.4g}" if "norm" in r else "",
                              f"{r['density']:.3g}" if r.get("density") is not None else "", "" if r["encoding"] == "dense" else r["encoding"])  # fmt: skip
                console.print(t)
        if bad:
            raise MismatchError(f"{bad[0]}: content hash does not match its manifest (file modified?)")

    @app.command("import")
    @guard
    def import_(
        source: Path = typer.Argument(..., help="A pickled PyTorch checkpoint (.pt, .pth, .bin), or a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."),
        output: Path = typer.Option(..., "--output", "-o", help="The safetensors file to write."),
        base: Path | None = typer.Option(None, "--base", help="Adapters: the model the adapter was trained on (default: the adapter's base_model_name_or_path, when that is a local path)."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling arbitrary objects (runs code from the file!)."),
        kind: str = typer.Option("checkpoint", "--kind", help="checkpoint or task-vector (pickles; an adapter is always a task vector)."),
        strip_prefix: str = typer.Option("", "--strip-prefix", help="Remove this prefix from every key (e.g. 'module.'; pickles only)."),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Convert a pickled .pt checkpoint to safetensors (refuses arbitrary objects unless --trust-pickle), or a PEFT LoRA adapter directory to a task vector against its base (each ΔW = scale·B·A stored low-rank)."""
        check_output_parent(output)
        from tvedit.errors import UsageError

        if source.is_dir():
            if kind != "checkpoint" or strip_prefix or trust_pickle:
                raise UsageError(f"{source}: is an adapter directory: --kind, --strip-prefix and --trust-pickle apply to pickled checkpoints only")
            from tvedit.lora import import_adapter

            report([import_adapter(source, output, base=base, force=force)], json_mode(as_json))
            return
        from tvedit.convert import import_pickle

        if base is not None:
            raise UsageError(f"{source}: --base applies to adapter directories only")
        if kind not in ("checkpoint", "task-vector"):
            raise UsageError(f"--kind must be checkpoint or task-vector, not {kind!r}")
        report([import_pickle(source, output, trust=trust_pickle, kind=kind, strip_prefix=strip_prefix, force=force)], json_mode(as_json))

    @app.command()
    @guard
    def methods(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """List the merge methods of `tvedit add --method` and their options."""
        from tvedit.merging import METHODS

        if json_mode(as_json):
            print_json({m.name: {"summary": m.summary, "options": list(m.options)} for m in METHODS.values()})
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(show_edge=False, header_style="bold")
        for col in ("method", "what it does", "options"):
            t.add_column(col)
        for m in METHODS.values():
            t.add_row(m.name, m.summary, ", ".join(m.options))
        Console().print(t)

    @app.command()
    @guard
    def clean(
        paths: list[Path] = typer.Argument(None, help="Outputs or directories to look beside for temporaries (the scratch directory is always searched)."),
        dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Only list what would be removed."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON line per file."),
    ) -> None:
        """Remove what killed runs left: pipeline intermediates in the scratch directory that no live process holds (an flock test), and temporaries (.NAME.tvedit-tmp-PID, PID dead) in the scratch directory, the hash and head caches, and beside PATHS (with their OUT.resume directories)."""
        from tvedit.headers import cache_dir
        from tvedit.pipeline import scratch_dir
        from tvedit.safeio import remove_stale, unheld_intermediates

        scratch = scratch_dir()
        dirs = [scratch, cache_dir() / "hashes", cache_dir() / "heads"]
        for p in paths or []:
            if p.is_dir():  # a directory, and the resume directories (OUT.resume) of outputs in it
                found_dirs = [p, *sorted(c for c in p.glob("*.resume") if c.is_dir())]
            else:  # beside an output, and its resume directory
                stem = p.name.removesuffix(".safetensors")
                found_dirs = [p.parent, p.with_name(f"{stem}.resume")]
            for d in found_dirs:
                if d.is_dir() and all(d.resolve() != x.resolve() for x in dirs):
                    dirs.append(d)
        temporaries = [item for d in dirs for item in remove_stale(d, dry_run=dry_run)]
        intermediates = unheld_intermediates(scratch, dry_run=dry_run)
        found = temporaries + intermediates
        if json_mode(as_json):
            for path, size in found:
                print_json({"path": str(path), "bytes": size, "removed": not dry_run})
            return
        verb = "would remove" if dry_run else "removed"
        for path, size in found:
            typer.echo(f"{verb} {path} ({size:,} bytes)")
        t, i = len(temporaries), len(intermediates)
        typer.echo(f"{verb} {t} stale temporar{'y' if t == 1 else 'ies'} and {i} unheld intermediate{'' if i == 1 else 's'}, "
                   f"{sum(s for _, s in found):,} bytes", err=True)  # fmt: skip
