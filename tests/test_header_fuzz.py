"""Corrupt and hostile headers are input errors (exit 3), never internal errors (issue 16, section 2b).

Seeded mutations of a valid task vector's header: random bytes, a truncated manifest, odd offsets,
shapes and dtypes, bad sparse records, a ``__metadata__`` that is not a string map, manifest fields of
the wrong type. Each mutated file goes through what ``tvedit info --tensors`` and ``tvedit add`` do
(in-process, for speed: the header summary, opening the checkpoint and decoding every tensor), and a
few through the real commands in subprocesses with a timeout. Allowed outcomes: success, or a
TveditError (one line, documented exit code); any other exception is a bug.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import struct
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tvedit import arith, engine, headers
from tvedit.errors import TveditError
from tvedit.manifest import METADATA_KEY
from tvedit.pipeline import InputSpec, OutputTarget
from tvedit.reader import open_checkpoint

SEED = 16
N_MUTANTS = 160


@pytest.fixture(scope="module")
def vector(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and a sparse task vector that uses every sparse encoding and a low-rank tensor."""
    root = tmp_path_factory.mktemp("fuzz")
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(64, 64, generator=g), "b.bias": torch.randn(300, generator=g),
            "c.weight": torch.randn(200_000, generator=g), "d.weight": torch.randn(40, 30, generator=g),
            "pos": torch.arange(5)}  # fmt: skip
    ft = {k: v.clone() for k, v in base.items()}
    ft["a.weight"][::7, ::5] += 1.0  # sparse: indices or bitmap
    ft["b.bias"][:200] += 0.5  # dense (density 2/3)
    ft["c.weight"][::997] += 0.25  # block16
    ft["d.weight"] += torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)
    save_file(base, str(root / "base.safetensors"))
    save_file(ft, str(root / "ft.safetensors"))
    tv = arith.extract([InputSpec(root / "ft.safetensors")], InputSpec(root / "base.safetensors"), OutputTarget(root / "tv.safetensors"), engine.ArithOptions())[0]
    from tvedit.compress import compress
    from tvedit.keys import KeyFilter

    lr = compress([InputSpec(tv.path)], OutputTarget(root / "lr.safetensors"), rank=2, keys_filter=KeyFilter(("d.weight",), ()))[0]
    return {"base": root / "base.safetensors", "tv": tv.path, "lr": lr.path, "root": root}


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: Any, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


HOSTILE = [None, 0, -1, 1.5, "x", [], {}, [1, 2, 3], [-1], [2**62, 2**62], True, {"a": 1}, [[1]], "F32", 1e309]


def _mutate(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    """One mutation of a valid (header, data) pair, as the file's bytes."""
    h = copy.deepcopy(header)
    manifest = json.loads(h["__metadata__"][METADATA_KEY])
    keys = [k for k in h if k != "__metadata__"]
    sparse_keys = list(manifest["sparse"])
    kind = rng.randrange(12)
    if kind == 0:  # random bytes anywhere in the header (same length)
        raw = bytearray(_join(h, data))
        n = struct.unpack("<Q", raw[:8])[0]
        for _ in range(rng.randint(1, 8)):
            raw[8 + rng.randrange(n)] = rng.randrange(256)
        return bytes(raw)
    if kind == 1:  # a truncated manifest string
        text = h["__metadata__"][METADATA_KEY]
        h["__metadata__"][METADATA_KEY] = text[: rng.randrange(len(text))]
    elif kind == 2:  # odd offsets
        info = h[rng.choice(keys)]
        choice = rng.randrange(4)
        if choice == 0:
            info["data_offsets"] = info["data_offsets"][::-1]
        elif choice == 1:
            info["data_offsets"] = [x + rng.choice([-3, 1, 8, 4096]) for x in info["data_offsets"]]
        else:
            info["data_offsets"] = rng.choice(HOSTILE)
    elif kind == 3:  # odd shapes
        info = h[rng.choice(keys)]
        info["shape"] = rng.choice([*HOSTILE, list(reversed(info["shape"])), [*info["shape"], 1], [0], [1, 0]])
    elif kind == 4:  # odd dtypes
        h[rng.choice(keys)]["dtype"] = rng.choice(["F32", "F16", "I64", "BOOL", "U8", "F8_E4M3", "C64", "U16", None, 3, ""])
    elif kind == 5:  # a bad sparse record
        key = rng.choice(sparse_keys)
        manifest["sparse"][key] = rng.choice([*HOSTILE, {"shape": [64, 64]}, {"encoding": "indices"}, {"shape": [64, 64], "encoding": "zip"},
                                              {"shape": [3, 3], "encoding": manifest["sparse"][key]["encoding"]},
                                              {"shape": [64, 64], "encoding": "lowrank", "rank": 2}, {"shape": [64, 64], "encoding": "mask"},
                                              {**manifest["sparse"][key], "rank": -1}])  # fmt: skip
    elif kind == 6:  # a sparse record whose stored part is gone, or renamed
        key = rng.choice(sparse_keys)
        part = rng.choice([k for k in keys if k.startswith(key + "::")])
        h[part.replace("::", "::x") if rng.random() < 0.5 else part + "_"] = h.pop(part)
    elif kind == 7:  # __metadata__ that is not a string map
        h["__metadata__"] = rng.choice([None, 1, "x", ["tvedit"], {"tvedit": 1}, {"tvedit": None}, {"tvedit": {"kind": "task-vector"}}, {"other": [1]}])
    elif kind == 8:  # manifest fields of the wrong type or range
        field = rng.choice(["kind", "model", "regime", "base", "density", "layout", "sparse", "task", "provenance", "sha256", "format"])
        manifest[field] = rng.choice(HOSTILE)
    elif kind == 9:  # the manifest's base record
        manifest["base"] = rng.choice([{"sha256": 1}, {"path": 3}, {"sha256": None, "path": None}, {"sha256": "0" * 64, "path": []}])
    elif kind == 10:  # an entry that is not an object, or a huge key
        h[rng.choice(keys)] = rng.choice([None, 1, "x", [], {"dtype": "F32"}])
    else:  # a header-length field that lies
        raw = bytearray(_join(h, data))
        raw[:8] = struct.pack("<Q", rng.choice([0, 1, 7, len(raw), 2**63, struct.unpack("<Q", raw[:8])[0] - rng.randint(1, 50)]))
        return bytes(raw)
    if kind not in (7,) and isinstance(h.get("__metadata__"), dict) and METADATA_KEY in h["__metadata__"] and kind != 1:
        h["__metadata__"][METADATA_KEY] = json.dumps(manifest)
    return _join(h, data)


def _use(path: Path, base: Path, out: Path) -> None:
    """What `tvedit info --tensors` and `tvedit add` do with a file: summary, every tensor, a merge."""
    headers.summary(path)
    ckpt = open_checkpoint(path)
    for key in ckpt.keys():
        ckpt.get(key)
    arith.add([InputSpec(path)], OutputTarget(out, force=True), base=InputSpec(base), alpha=0.5)


def _mutants(source: Path, seed: int, n: int) -> list[bytes]:
    header, data = _split(source)
    rng = random.Random(seed)
    return [_mutate(rng, header, data) for _ in range(n)]


@pytest.mark.parametrize("which", ["tv", "lr"])
def test_header_mutations_are_input_errors(vector: dict[str, Path], tmp_path: Path, which: str) -> None:
    outcomes: dict[str, int] = {}
    bugs = []

    def hang(signum: int, frame: object) -> None:
        raise TimeoutError("no result within 120 s: a hang")

    previous = signal.signal(signal.SIGALRM, hang)
    for i, blob in enumerate(_mutants(vector[which], SEED + (which == "lr"), N_MUTANTS)):
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(blob)
        signal.alarm(120)
        try:
            _use(path, vector["base"], tmp_path / "out.safetensors")
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except TveditError as exc:
            assert "\n" not in str(exc)
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        except Exception as exc:  # noqa: BLE001 - exactly what this test looks for
            bugs.append(f"mutant {i}: {type(exc).__name__}: {exc} {traceback.format_exc(limit=-3)}")
        finally:
            signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    assert not bugs, "\n".join(bugs[:10])
    assert outcomes.get("InputError", 0) >= N_MUTANTS // 2, outcomes  # the mutations do bite
    assert [p.name for p in tmp_path.iterdir() if ".tvedit-tmp-" in p.name] == []


def test_every_reported_case_of_the_issue(vector: dict[str, Path], tmp_path: Path) -> None:
    """The cases named in the issue: a sparse record that is null or a number, a __metadata__ that
    is not a string map; each an InputError naming the file and the field."""
    header, data = _split(vector["tv"])
    key = next(iter(json.loads(header["__metadata__"][METADATA_KEY])["sparse"]))
    for record, field in ((None, "sparse record"), (3, "sparse record")):
        h = copy.deepcopy(header)
        m = json.loads(h["__metadata__"][METADATA_KEY])
        m["sparse"][key] = record
        h["__metadata__"][METADATA_KEY] = json.dumps(m)
        path = tmp_path / "bad.safetensors"
        path.write_bytes(_join(h, data))
        for use in (headers.summary, open_checkpoint):
            with pytest.raises(TveditError, match=f"bad.safetensors: manifest {field} {key!r}: not an object") as info:
                use(path)
            assert info.value.exit_code == 3
    h = copy.deepcopy(header)
    h["__metadata__"] = ["tvedit"]
    path.write_bytes(_join(h, data))
    for use in (headers.summary, open_checkpoint):
        with pytest.raises(TveditError, match="bad.safetensors: __metadata__: not a map of strings to strings"):
            use(path)


def test_mutated_headers_through_the_cli(vector: dict[str, Path], tmp_path: Path) -> None:
    """A few mutants through the real commands: exit 0 or a documented code, one line, no traceback,
    no hang (timeout), nothing left in the output directory."""
    blobs = _mutants(vector["tv"], SEED + 7, 4)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = dict(os.environ)
    for i, blob in enumerate(blobs):
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(blob)
        script = (f"{sys.executable} -m tvedit info --tensors {path} > /dev/null; echo rc=$? >&2; "
                  f"{sys.executable} -m tvedit add {path} --base {vector['base']} -o {out_dir}/x.safetensors --force > /dev/null; echo rc=$? >&2")  # fmt: skip
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env)
        lines = proc.stderr.splitlines()
        codes = [int(line[3:]) for line in lines if line.startswith("rc=")]
        assert len(codes) == 2 and all(c in (0, 2, 3, 4, 5, 6) for c in codes), proc.stderr
        assert "Traceback" not in proc.stderr and "\x1b" not in proc.stderr
        assert len(lines) - 2 == sum(c != 0 for c in codes), proc.stderr  # one line per failure
        assert all(".tvedit-tmp-" not in p.name for p in out_dir.iterdir())
