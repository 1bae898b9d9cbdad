"""The one streaming executor under every tensor command.

Given input checkpoints, an output target and a per-key computation, it does what every command
needs and none should write again: opening and checking inputs (keys, shapes, bases, regimes,
families; all from the headers, before the first tensor is read), base resolution, read-ahead on a
background thread per input (hashing what is read), going in chunks of ``TVEDIT_CHUNK_MIB`` for huge
tensors, encoding, exclusive durable writing (``open_writer``), and the checks of what is written.
Commands (``arith``, ``masking``, ``compress``, ``mergekit``) keep only their semantics: which keys,
which pure function of ``ops/``, which manifest step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tvedit import hfdir
from tvedit.errors import InputError, MismatchError, NumericError, UsageError
from tvedit.manifest import Manifest, base_candidates
from tvedit.pipeline import InputSpec, OutputTarget
from tvedit.reader import Checkpoint, open_checkpoint
from tvedit.writer import CheckpointWriter

Progress = Callable[[int, int, str], None]


@dataclass
class ArithOptions:
    """Options shared by the arithmetic commands (ALGORITHMS.md section 1)."""

    dtype: torch.dtype | None = None  # output dtype; default: the base's (or the input's) dtype
    compute_dtype: torch.dtype = torch.float32
    allow_missing: bool = False  # a key missing from some inputs counts as zero
    allow_nonfinite: bool = False
    layout: str = "auto"  # task-vector storage: auto | dense | sparse
    allow_mismatch: frozenset[str] = frozenset()  # what inputs may disagree on: MISMATCHES
    verify_inputs: bool = False  # hash each input as it is read; a mismatch with its recorded hash fails
    device: torch.device | None = None  # --device: compute there (tensors staged to it and back); None: in place on the host

    def __post_init__(self) -> None:
        chunk_numel()  # a bad $TVEDIT_CHUNK_MIB fails before any file is opened
        self.allow_mismatch = parse_mismatch(self.allow_mismatch)

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "dtype": str(self.dtype).replace("torch.", "") if self.dtype else None,
            "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
            "allow_missing": self.allow_missing,
            "allow_nonfinite": self.allow_nonfinite,
        }
        if self.allow_mismatch:  # recorded only when a check was switched off
            params["allow_mismatch"] = sorted(self.allow_mismatch)
        if self.device is not None:  # recorded only when given: results may differ in the last ulp across devices
            params["device"] = str(self.device)
        return params


# What inputs may be allowed to disagree on (--allow-mismatch), each a check that is on by default.
MISMATCHES = ("base", "regime", "family")


def parse_mismatch(value: str | Iterable[str] | None) -> frozenset[str]:
    """``"base,regime"`` (or an iterable of words) -> the set; an unknown word is a usage error."""
    if value is None:
        return frozenset()
    words = value.split(",") if isinstance(value, str) else [w for v in value for w in str(v).split(",")]
    words = [w.strip() for w in words if w.strip()]
    bad = [w for w in words if w not in MISMATCHES]
    if bad:
        raise UsageError(f"--allow-mismatch: unknown check {bad[0]!r} (choose from {', '.join(MISMATCHES)}, comma-separated)")
    return frozenset(words)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def as_spec(x: InputSpec | str | os.PathLike[str]) -> InputSpec:
    return x if isinstance(x, InputSpec) else InputSpec(Path(x))


def as_target(x: OutputTarget | str | os.PathLike[str] | None, force: bool = False) -> OutputTarget:
    if isinstance(x, OutputTarget):
        return x
    if x is None:
        raise UsageError("an output path is required")
    return OutputTarget(output=Path(x), force=force)


# The hash of an input that is hashed while the operation streams it is not known when the output's
# header is reserved: the manifest holds this placeholder (same length) until the commit.
PENDING_HASH = "0" * 64


def hash_of(ckpt: Checkpoint, final: bool = True) -> str:
    """``ckpt``'s content hash; before the stream (``final=False``) a placeholder for a file
    without a known hash, which is then hashed as it is read (no separate hashing pass)."""
    if final or ckpt.known_sha256() is not None:
        return ckpt.sha256
    return PENDING_HASH if ckpt.hash_while_reading() else ckpt.sha256


def input_record(spec: InputSpec, ckpt: Checkpoint, weight: float | None = None, nested: bool = False, final: bool = True) -> dict[str, Any]:
    """One input in a provenance step; ``nested`` embeds the input's own provenance (multi-input ops)."""
    rec: dict[str, Any] = {
        "path": None if spec.ephemeral else str(spec.path),
        "sha256": hash_of(ckpt, final),
        "kind": ckpt.kind,
    }
    if weight is not None:
        rec["weight"] = weight
    if nested and ckpt.manifest and ckpt.manifest.provenance:
        rec["provenance"] = ckpt.manifest.provenance
    return rec


def on_device(t: torch.Tensor, opts: ArithOptions) -> torch.Tensor:
    """``t`` where the command computes (``--device``; the host without one)."""
    return t if opts.device is None else t.to(opts.device)


def check_finite(t: torch.Tensor, out: Path, key: str, opts: ArithOptions) -> None:
    if opts.allow_nonfinite or not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)  # one pass, no temporary: NaN propagates and Inf shows at an end
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise NumericError(f"{out}: key {key!r}: result contains NaN or Inf (use --allow-nonfinite to keep it)")


def model_of(*ckpts: Checkpoint | None, like: Path | None = None) -> dict[str, Any]:
    for c in ckpts:
        if c is not None and c.manifest and c.manifest.family != "unknown":
            return dict(c.manifest.model)
    for c in ckpts:  # Hugging Face directories: the architecture from their config.json
        root = hfdir.hf_root(c.path) if c is not None else None
        if root is not None:
            return hfdir.model_info(root)
    return hfdir.model_info(like) if like is not None else {"family": "unknown"}


def family_group(family: str) -> str:
    return "hf" if family.startswith("hf") else family  # hf and hf-seq2seq weights mix


def check_families(ckpts: Iterable[Checkpoint], opts: ArithOptions) -> None:
    fams = {(family_group(c.manifest.family), c.path) for c in ckpts if c.manifest and c.manifest.family != "unknown"}
    if len({f for f, _ in fams}) > 1 and "family" not in opts.allow_mismatch:
        listing = ", ".join(f"{p} ({f})" for f, p in sorted(fams, key=str))
        raise MismatchError(f"inputs come from different model families: {listing} (use --allow-mismatch family to mix)")


def regime_of(ckpts: Sequence[Checkpoint], opts: ArithOptions) -> str:
    regimes = {c.path: (c.manifest.regime if c.manifest else "nonlinear") for c in ckpts}
    if len(set(regimes.values())) > 1:
        if "regime" not in opts.allow_mismatch:
            listing = ", ".join(f"{p} ({r})" for p, r in regimes.items())
            raise MismatchError(f"inputs mix regimes: {listing}; a linearized vector only means something under f_lin (use --allow-mismatch regime to mix)")
        return "nonlinear"
    return next(iter(regimes.values())) if regimes else "nonlinear"


def check_shapes(base: Checkpoint, other: Checkpoint, keys: Iterable[str]) -> None:
    for key in keys:
        a, b = base.info(key).shape, other.info(key).shape
        if a != b:
            raise MismatchError(f"{other.path}: key {key!r}: shape {list(b)} does not match {list(a)} in {base.path}")


def float_keys(ckpt: Checkpoint) -> list[str]:
    return [k for k in ckpt.keys() if ckpt.is_floating(k)]


def open_all(specs: Sequence[InputSpec]) -> list[Checkpoint]:
    return [open_checkpoint(s.path) for s in specs]


def out_dtype(opts: ArithOptions, fallback: torch.dtype) -> torch.dtype:
    return opts.dtype or fallback


def out_sizes(keys: Sequence[str], refs: Sequence[Checkpoint | None], opts: ArithOptions) -> dict[str, int]:
    """Output bytes per key (dense): the shape and dtype of the first reference holding it."""
    sizes = {}
    for key in keys:
        info = next(c.info(key) for c in refs if c is not None and key in c)
        dtype = opts.dtype if (opts.dtype is not None and info.dtype.is_floating_point) else info.dtype
        sizes[key] = numel(info.shape) * dtype.itemsize
    return sizes


def open_writer(
    target: OutputTarget, out: Path, manifest: Manifest, keys: Sequence[str], protect: Sequence[Path],
    opts: ArithOptions, refs: Sequence[Checkpoint | None], base: Checkpoint | None = None,
) -> CheckpointWriter | hfdir.HFDirWriter:
    """One safetensors file, or a Hugging Face directory when the target asks for one (hfdir.py)."""
    if target.hf is None:
        return CheckpointWriter(out, manifest, keys, force=target.force, inputs=protect, layout=opts.layout, ephemeral=target.ephemeral)
    root = next((r for r in (hfdir.hf_root(c.path) for c in refs if c is not None) if r is not None), None)
    source = target.hf.like or root or hfdir.recorded_source(manifest)  # else the directory the inputs' model record names
    if manifest.kind == "checkpoint" and source is None:
        raise UsageError(f"{out}: a Hugging Face directory needs a config.json, and no input is (or records) a Hugging Face directory; pass --like HF_DIR")
    drop = hfdir.tied_aliases(root or source, base, keys)
    return hfdir.HFDirWriter(
        out, manifest, out_sizes(keys, refs, opts), options=target.hf, force=target.force, inputs=protect,
        layout=opts.layout, source=source, drop=drop,
    )  # fmt: skip


def chunk_numel() -> int:
    """Entries per chunk for element-wise work on huge tensors ($TVEDIT_CHUNK_MIB of float32, default
    2: small enough to stay in the CPU caches across the passes over a chunk), a multiple of 8."""
    raw = os.environ.get("TVEDIT_CHUNK_MIB", "2")
    try:
        mib = float(raw)
    except ValueError:
        mib = float("nan")
    if not mib > 0 or mib == float("inf"):
        raise UsageError(f"TVEDIT_CHUNK_MIB={raw!r}: must be a positive number of MiB")
    return max(8, int(mib * (1 << 20)) // 4 // 8 * 8)  # whole bytes of a bit-packed mask


def goes_in_chunks(ckpt: Checkpoint, key: str) -> bool:
    """A dense-stored tensor larger than one chunk: element-wise work on it goes a chunk at a time
    (sparse and low-rank storage is decoded whole; it is small)."""
    return numel(ckpt.info(key).shape) > chunk_numel() and not ckpt.is_sparse(key)


# --------------------------------------------------------------------------------------------
# workspace: (N+2) buffers of the largest tensor, allocated once and reused for every key
# --------------------------------------------------------------------------------------------
def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_READER: ThreadPoolExecutor | None = None


def reader() -> ThreadPoolExecutor:
    """The background threads that read the next chunk ahead (Slot.load_range): one per slot in
    flight (a slot has at most one read ahead), so each input is read, and on first use hashed
    (Checkpoint.get_range; sha256 releases the GIL), on its own thread, beside the others and
    off the thread that computes and hands chunks to the writer."""
    global _READER
    if _READER is None:
        _READER = ThreadPoolExecutor(16, thread_name_prefix="tvedit-read")
    return _READER


class Slot:
    """One reusable buffer: tensors are read straight into it and converted in place.

    Reusing memory matters: a fresh buffer per tensor costs a page fault per 4 KiB page, several
    times the cost of the copy itself. Views returned by ``load`` are valid until the next load.

    Ranges of a huge tensor (``load_range``) are read one ahead: after serving a range, the next
    range of the same size is read on a background thread into a second buffer, so reading overlaps
    the caller's arithmetic and the writer's writing and hashing.

    With a ``device`` (``--device``), what ``load``/``load_range`` return, and ``zeros``/``buffer``,
    live in a buffer on that device: the bytes are read on the host (ahead, as above) and copied
    over; results go back to the host where they are written (``CheckpointWriter.write``,
    ``write_in_chunks``). Any explicit device stages, ``cpu`` included
    (the same numbers through the same code path: how the tests check the device plumbing).
    """

    def __init__(self, compute_dtype: torch.dtype, device: torch.device | None = None):
        self.compute_dtype = compute_dtype
        self.device = device
        self.work = torch.empty(0, dtype=compute_dtype, device="cpu")
        self.raw = torch.empty(0, dtype=torch.uint8, device="cpu")
        self.spare = torch.empty(0, dtype=torch.uint8, device="cpu")  # the read-ahead buffer
        self.dev = torch.empty(0, dtype=compute_dtype, device=device or "cpu")  # the device copy
        self._ahead: tuple[tuple[int, str, int, int], Future[Any]] | None = None

    def _work(self, shape: Sequence[int]) -> torch.Tensor:
        n = numel(shape)
        if self.work.numel() < n:
            self.work = torch.empty(n, dtype=self.compute_dtype, device="cpu")
        return self.work[:n].view(tuple(shape))

    def _dev(self, shape: Sequence[int]) -> torch.Tensor:
        """The device buffer (``--device``), or the host one."""
        if self.device is None:
            return self._work(shape)
        n = numel(shape)
        if self.dev.numel() < n:
            self.dev = torch.empty(n, dtype=self.compute_dtype, device=self.device)
        return self.dev[:n].view(tuple(shape))

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (on the host, any dtype) in the compute dtype on the device; ``t`` itself without one."""
        return t if self.device is None else self._dev(t.shape).copy_(t)

    def _raw(self, nbytes: int) -> torch.Tensor:
        if self.raw.numel() < nbytes:
            self.raw = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
        return self.raw[:nbytes]

    def _settle(self) -> tuple[int, str, int, int] | None:
        """Wait for the read ahead (its errors surface here); returns what it read, if it succeeded."""
        if self._ahead is None:
            return None
        (what, future), self._ahead = self._ahead, None
        future.result()
        return what

    def load(self, ckpt: Checkpoint, key: str) -> torch.Tensor:
        self._settle()
        info = ckpt.info(key)
        if ckpt.is_sparse(key):
            return self._dev(info.shape).copy_(ckpt.get(key))
        if info.dtype == self.compute_dtype:
            return self._staged(ckpt.get(key, out=self._work(info.shape)))
        nbytes = numel(info.shape) * info.dtype.itemsize
        raw = ckpt.get(key, out=self._raw(nbytes).view(info.dtype).view(info.shape))
        return self._dev(info.shape).copy_(raw)  # converted on the way (to the device, with one)

    def load_range(self, ckpt: Checkpoint, key: str, start: int, count: int) -> torch.Tensor:
        """Entries start .. start+count of a dense-stored key, flattened, in the compute dtype."""
        info = ckpt.info(key)
        item = info.dtype.itemsize
        nbytes = count * item
        if self._settle() == (id(ckpt), key, start, count):
            self.raw, self.spare = self.spare, self.raw
            raw = self.raw[:nbytes].view(info.dtype)
        else:
            raw = ckpt.get_range(key, start, self._raw(nbytes).view(info.dtype))
        total, after = numel(info.shape), start + count
        if after < total:  # read the next range of the same size ahead
            n_next = min(count, total - after)
            if self.spare.numel() < n_next * item:
                self.spare = torch.empty(n_next * item, dtype=torch.uint8, device="cpu")
            buf = self.spare[: n_next * item].view(info.dtype)
            self._ahead = ((id(ckpt), key, after, n_next), reader().submit(ckpt.get_range, key, after, buf))
        if info.dtype == self.compute_dtype and self.device is None:
            return raw  # the caller may modify it: the next read ahead goes into the other buffer
        return self._dev((count,)).copy_(raw)

    def zeros(self, shape: Sequence[int]) -> torch.Tensor:
        self._settle()
        return self._dev(shape).zero_()

    def buffer(self, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised view of the right shape (scratch space; on the device, with one)."""
        return self._dev(shape)


# --------------------------------------------------------------------------------------------
# vector sources: the task vectors of a set of inputs, one key at a time
# --------------------------------------------------------------------------------------------
@dataclass
class VectorSources:
    """Task-vector tensors of several inputs, key by key; checkpoints are extracted on the fly.

    ``vectors(key)`` returns views into reusable buffers, valid until the next call; ``base(key)``
    is the matching theta0 tensor (same lifetime).
    """

    inputs: list[Checkpoint]
    base_ckpt: Checkpoint | None
    opts: ArithOptions
    keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._slots = [Slot(self.opts.compute_dtype, self.opts.device) for _ in self.inputs]
        self._base_slot = Slot(self.opts.compute_dtype, self.opts.device)
        self._base_key: str | None = None

    def base(self, key: str) -> torch.Tensor:
        assert self.base_ckpt is not None
        if self._base_key != key:
            self._base_t = self._base_slot.load(self.base_ckpt, key)
            self._base_key = key
        return self._base_t

    def vectors(self, key: str) -> list[torch.Tensor]:
        out = []
        for slot, ckpt in zip(self._slots, self.inputs, strict=True):
            if key not in ckpt:
                out.append(slot.zeros(self._shape(key)))
                continue
            t = slot.load(ckpt, key)
            if ckpt.kind == "checkpoint":
                t.sub_(self.base(key))  # tau = theta* - theta0, in place
            out.append(t)
        return out

    def chunked(self, key: str) -> bool:
        """Whether ``key`` goes in chunks: huge and stored dense in every input that has it."""
        return all(goes_in_chunks(c, key) for c in [*self.inputs, self.base_ckpt] if c is not None and key in c)

    def base_range(self, key: str, start: int, count: int) -> torch.Tensor:
        assert self.base_ckpt is not None
        self._base_key = None  # the range goes into the buffer that holds the cached whole tensor
        return self._base_slot.load_range(self.base_ckpt, key, start, count)

    def vector_ranges(self, key: str, start: int, count: int, base: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Entries start .. start+count of each input's task vector (the flattened tensor);
        ``base``: the same range of theta0 when already loaded (``base_range``)."""
        out = []
        for slot, ckpt in zip(self._slots, self.inputs, strict=True):
            if key not in ckpt:
                out.append(slot.zeros((count,)))
                continue
            t = slot.load_range(ckpt, key, start, count)
            if ckpt.kind == "checkpoint":
                base = self.base_range(key, start, count) if base is None else base
                t.sub_(base)
            out.append(t)
        return out

    def vector_chunks(self, key: str, step: int | None = None) -> Iterator[list[torch.Tensor]]:
        """Each input's task vector for ``key``: whole, or in consecutive flattened chunks (of
        ``step`` entries, default chunk_numel()) when the key is huge (``chunked``); views valid
        until the next item."""
        if not self.chunked(key):
            yield self.vectors(key)
            return
        n, step = numel(self._shape(key)), step or chunk_numel()
        for start in range(0, n, step):
            yield self.vector_ranges(key, start, min(step, n - start))

    def _shape(self, key: str) -> tuple[int, ...]:
        for c in [*self.inputs, self.base_ckpt]:
            if c is not None and key in c:
                return c.info(key).shape
        raise MismatchError(f"key {key!r} is in no input")


def vector_keys(inputs: Sequence[Checkpoint], base: Checkpoint | None, opts: ArithOptions) -> list[str]:
    """Keys of the merged task vector, after checking keys and shapes across all inputs."""
    for c in inputs:
        if c.kind == "mask":
            raise MismatchError(f"{c.path}: is a mask, not a task vector or checkpoint (use tvedit mask --apply)")
    if base is not None:
        keys = float_keys(base)
        for c in inputs:
            extra = sorted(set(float_keys(c)) - set(keys))
            if extra:
                raise MismatchError(f"{c.path}: key {extra[0]!r} is not in the base {base.path}")
            present = [k for k in keys if k in c]
            check_shapes(base, c, present)
    else:
        keys = sorted({k for c in inputs for k in float_keys(c)})
        for c in inputs[1:]:
            check_shapes(inputs[0], c, [k for k in c.keys() if k in inputs[0]])
    if not opts.allow_missing:
        for c in inputs:
            for k in keys:
                if k not in c:
                    raise MismatchError(f"{c.path}: key {k!r} is missing (use --allow-missing to treat it as zero)")
    return keys


def check_base_hash(ckpt: Checkpoint, want: str, source: Path) -> None:
    """``ckpt`` (a --base) has the hash ``want`` that the task vector ``source`` records."""
    if ckpt.sha256 != want:
        raise MismatchError(f"{ckpt.path}: base hash {ckpt.sha256[:12]} differs from the base {want[:12]} recorded in {source} (use --allow-mismatch base to use it anyway)")


def verify_start(ckpts: Iterable[Checkpoint | None], opts: ArithOptions) -> None:
    """With --verify-inputs: hash each input with a recorded hash while the operation reads it."""
    if opts.verify_inputs:
        for c in ckpts:
            if c is not None:
                c.verify_while_reading()


def verify_end(ckpts: Iterable[Checkpoint | None]) -> None:
    """Before a commit: every input being verified hashes to its recorded hash (else InputError)."""
    for c in ckpts:
        if c is not None:
            c.verify_streamed()


def check_base(ckpt: Checkpoint | None) -> None:
    """The deferred check of a first-use --base against the hash its task vectors record."""
    if ckpt is not None and ckpt.expected is not None:
        check_base_hash(ckpt, *ckpt.expected)


def resolve_base(base: InputSpec | None, inputs: Sequence[Checkpoint], specs: Sequence[InputSpec], needed: bool, opts: ArithOptions) -> Checkpoint | None:
    """theta0 from --base or from the base recorded in the inputs; all must agree by hash."""
    recorded: dict[str, tuple[str | None, Path]] = {}
    for c in inputs:
        if c.manifest and c.manifest.base and c.kind == "task-vector":
            recorded.setdefault(c.manifest.base["sha256"], (c.manifest.base.get("path"), c.path))
    if len(recorded) > 1 and "base" not in opts.allow_mismatch:
        (h1, (_, p1)), (h2, (_, p2)) = list(recorded.items())[:2]
        raise MismatchError(f"{p2}: was extracted from base {h2[:12]}, but {p1} from base {h1[:12]} (use --allow-mismatch base to mix)")
    if any(c.kind == "checkpoint" for c in inputs):
        needed = True
    if base is not None:
        ckpt = open_checkpoint(base.path)
        if recorded and "base" not in opts.allow_mismatch:  # one recorded base (more were refused above)
            want, (_, source) = next(iter(recorded.items()))
            if ckpt.known_sha256() is None and ckpt.hash_while_reading():
                # a plain base seen for the first time: hashed as the operation reads it, checked
                # before the output is committed (check_base), instead of one more pass up front
                ckpt.expected = (want, source)
                return ckpt
            check_base_hash(ckpt, want, source)
        return ckpt
    if not needed:
        return None
    if not recorded:
        raise UsageError("no base: pass --base BASE (the inputs record none)")
    want, (path, src) = next(iter(recorded.items()))
    found = base_candidates(path, src)
    if not found:
        raise InputError(f"{src}: its recorded base {path!r} is not there (nor beside {src.name}); pass --base BASE")
    for candidate in found:
        ckpt = open_checkpoint(candidate)
        if ckpt.sha256 == want:
            return ckpt
    got = open_checkpoint(found[0]).sha256
    raise MismatchError(f"{found[0]}: base recorded in {src} has changed (hash {got[:12]} != {want[:12]}); pass --base")


def write_in_chunks(w: Any, key: str, shape: Sequence[int], dtype: Any, compute: Callable[[int, int], Any],
                     out: Path, opts: ArithOptions, check: bool = True, step: int | None = None) -> None:
    """Write one huge tensor whose entries ``start .. start+count`` (flattened) ``compute`` returns
    in the compute dtype (a buffer it may reuse): memory is set by the chunk size, not the tensor.
    The bytes equal those of the whole-tensor path (the writer re-encodes a sparse task vector).

    ``w`` may be a list of CheckpointWriters, ``dtype`` then a list with one dtype each: ``compute``
    returns one tensor per writer, so that one pass over the inputs feeds several outputs (mask's
    outputs and saved masks). ``step``: entries per chunk (default chunk_numel(); whole rows for a
    method that ranks rows)."""
    n, step = numel(shape), step or chunk_numel()
    writers, dtypes = (w, list(dtype)) if isinstance(w, list) else ([w], [dtype])
    converted = [torch.empty(0, dtype=d, device="cpu") for d in dtypes]

    def convert(j: int, chunk: torch.Tensor, count: int) -> torch.Tensor:
        """The chunk in the output dtype, on the host (from the device, with --device)."""
        if check:
            check_finite(chunk, out, key, opts)
        if chunk.dtype == dtypes[j] and chunk.device.type == "cpu":
            return chunk
        if converted[j].numel() < count:
            converted[j] = torch.empty(count, dtype=dtypes[j], device="cpu")
        return converted[j][:count].copy_(chunk.reshape(-1))

    def ranges() -> Iterator[tuple[int, int]]:
        for start in range(0, n, step):
            yield start, min(step, n - start)

    if not isinstance(w, list):
        w.write_chunks(key, shape, dtype, (convert(0, compute(s, c), c) for s, c in ranges()))
        return
    sinks = [x.open_chunks(key, shape, d) for x, d in zip(writers, dtypes, strict=True)]
    for start, count in ranges():
        for j, (sink, chunk) in enumerate(zip(sinks, compute(start, count), strict=True)):
            sink.add(convert(j, chunk, count))
    for sink in sinks:
        sink.close()
