"""Tensor encodings of the safetensors format (docs/manifest.md): dtypes, bit-packed masks, the sparse
layouts (indices, block16, bitmap, mask) and the low-rank layout (U, S, V). Pure functions of tensors."""


from __future__ import annotations

from collections.abc import Iterable

import torch

from tvedit import headers
from tvedit.errors import InputError

SEP = "::"
DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPE_TO_ST[getattr(torch, _name)] = _st
        ST_TO_DTYPE[_st] = getattr(torch, _name)

# A task-vector tensor whose density is at or below this is stored sparse under layout "auto".
AUTO_SPARSE_DENSITY = 0.5
# Tensors smaller than this are always stored dense (the encoding overhead is not worth it).
MIN_SPARSE_NUMEL = 64


def parse_dtype(name: str) -> torch.dtype:
    """'float32' / 'fp32' / 'F32' / 'bf16' ... -> torch dtype (floating types only)."""
    table = {
        "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64, "double": torch.float64,
    }  # fmt: skip
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16, float64") from None


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return DTYPE_TO_ST[dtype]
    except KeyError:
        raise InputError(f"dtype {dtype} cannot be stored in safetensors") from None


# --------------------------------------------------------------------------------------------
# Bit packing (masks and bitmap-encoded sparse tensors)
# --------------------------------------------------------------------------------------------
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 bytes, one bit per entry in row-major order, MSB first (numpy.packbits)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS).ne(0).reshape(-1)
    return bits[:numel].reshape(shape)


# Stored parts of each sparse encoding (docs/manifest.md); files of every encoding stay readable.
SPARSE_PARTS = headers.ENCODING_PARTS  # indices, block16, bitmap, mask, lowrank
BLOCK16 = 1 << 16  # block16: positions are (block of 2^16 entries, 16-bit offset in the block)


def choose_encoding(nnz: int, numel: int) -> tuple[str, torch.dtype]:
    """The smallest of the index-list, block16 and bitmap encodings for ``nnz`` of ``numel``
    entries (ties: the first listed), and the index dtype of the index-list encoding."""
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    sizes = {
        "block16": 2 * nnz + 4 * -(-numel // BLOCK16),
        "indices": nnz * (4 if index_dtype == torch.int32 else 8),
        "bitmap": (numel + 7) // 8,
    }
    return min(sizes, key=sizes.__getitem__), index_dtype


def encode_parts(encoding: str, parts: Iterable[str], flat: torch.Tensor, start: int, numel: int, index_dtype: torch.dtype = torch.int32) -> dict[str, torch.Tensor]:
    """Stored ``parts`` of ``encoding`` for the entries ``flat`` found at ``start`` of a flattened
    tensor of ``numel`` entries. Parts of consecutive pieces concatenate to the whole tensor's part
    (bitmap: pieces start at multiples of 8), except block16's ``counts``, which add up."""
    nz = flat != 0
    positions = nz.nonzero().reshape(-1) + start if encoding in ("indices", "block16") else None
    out = {}
    for part in parts:
        if part == "values":
            out[part] = flat[nz]
        elif part == "bitmap":
            out[part] = pack_bits(nz)
        elif part == "indices":
            out[part] = positions.to(index_dtype)
        elif part == "counts":
            out[part] = torch.bincount(positions >> 16, minlength=-(-numel // BLOCK16)).to(torch.int32)
        else:  # offsets: the low 16 bits, two's complement
            low = (positions & (BLOCK16 - 1)).to(torch.int32)
            out[part] = torch.where(low >= BLOCK16 // 2, low - BLOCK16, low).to(torch.int16)
    return out


def encode_sparse(tensor: torch.Tensor) -> tuple[str, dict[str, torch.Tensor]]:
    """Pick the smallest of the index-list, block16 and bitmap encodings. Returns (encoding, parts)."""
    flat = tensor.reshape(-1)
    numel = flat.numel()
    encoding, index_dtype = choose_encoding(int(torch.count_nonzero(flat)), numel)
    return encoding, encode_parts(encoding, SPARSE_PARTS[encoding], flat, 0, numel, index_dtype)


def decode_sparse(encoding: str, parts: dict[str, torch.Tensor], shape: list[int], dtype: torch.dtype | None, where: str = "sparse tensor") -> torch.Tensor:
    """The dense tensor of stored parts (their shapes checked by headers.logical_entries); positions
    outside the tensor or a bitmap that does not count the values are an InputError naming ``where``."""
    if encoding == "mask":
        return unpack_bits(parts["bitmap"], shape)
    values = parts["values"]
    numel = 1
    for s in shape:
        numel *= s
    try:
        out = torch.zeros(numel, dtype=values.dtype)
    except (RuntimeError, MemoryError):  # a hostile shape: terabytes for a few stored values
        raise InputError(f"{where}: cannot allocate the {numel} entries of shape {list(shape)}") from None
    if encoding == "indices":
        positions = parts["indices"].long()
    elif encoding == "bitmap":
        bits = unpack_bits(parts["bitmap"], (numel,))
        if int(bits.sum()) != values.numel():
            raise InputError(f"{where}: bitmap marks {int(bits.sum())} entries for {values.numel()} values")
        out[bits] = values
        return out.reshape(shape)
    elif encoding == "block16":
        counts = parts["counts"].long()
        if counts.numel() != -(-numel // BLOCK16) or (counts.numel() and int(counts.min()) < 0) or int(counts.sum()) != values.numel() or parts["offsets"].numel() != values.numel():
            raise InputError(f"{where}: block16 parts do not fit a tensor of shape {list(shape)}")
        block = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        positions = block * BLOCK16 + (parts["offsets"].long() & (BLOCK16 - 1))
    else:
        raise InputError(f"{where}: unknown sparse encoding {encoding!r}")
    if positions.numel() != values.numel() or (positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= numel)):
        raise InputError(f"{where}: sparse positions fall outside a tensor of shape {list(shape)}")
    out[positions] = values
    return out.reshape(shape)


LOWRANK_PARTS = ("U", "S", "V")


def decode_lowrank(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """U diag(S) V^T, computed in float32 (float64 for float64 factors), in the factors' dtype."""
    u, s, v = (parts[p] for p in LOWRANK_PARTS)
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    return ((u.to(work) * s.to(work)) @ v.to(work).T).to(u.dtype)


# --------------------------------------------------------------------------------------------
# Reading
