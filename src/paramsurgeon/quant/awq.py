"""awq: AutoAWQ's gemm layout. ``x.qweight`` int32 [in, out/8] and ``x.qzeros`` int32 [groups, out/8]
hold eight 4-bit codes a word along the outputs, nibble i the output ORDER[i] of its eight
(0,2,4,6,1,3,5,7); ``x.scales`` [groups, out], consecutive groups of ``group_size`` inputs. A
value is scale * (code - zero) of its group (zero points stored as they are), in float32 rounded
to the dtype, as AutoAWQ's ``dequantize_gemm`` computes it. The logical tensor is ``x.weight`` [out, in].
"""

from __future__ import annotations

from .base import Group, Partial
from .gptq import QweightScheme, group_size, looks_like_awq, unpack

ROLES = ("qweight", "qzeros", "scales")
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output each nibble of a word holds
BITS = 4
ROWS = 1 << 22  # codes unpacked at a time


class Awq(QweightScheme):
    name = "awq"
    roles = ROLES
    markers = (".qweight", ".qzeros", ".scales")
    methods = ("awq",)

    def claims(self, tensors, parts):
        return looks_like_awq(tensors, parts)

    def names_orphan(self, role, method):
        return method == "awq"

    def group(self, base: str, parts: dict[str, str], tensors: dict, config: dict) -> Group | Partial:
        """The group of ``base``'s parts, or why they do not make one."""
        named = list(parts.values())
        missing = [base + "." + r for r in ("qzeros", "scales") if r not in parts]
        if missing:
            return Partial(named, f"{parts['qweight']} without its {' and '.join(missing)}")
        version = str(config.get("version") or config.get("format") or "gemm").lower()
        bits = config.get("bits", config.get("w_bit", BITS))
        if version != "gemm" or bits != BITS:
            return Partial(named, f"awq version {version} with {bits} bits is not read (only the 4-bit gemm layout)")
        qweight, qzeros, scales = (tensors[parts[r]] for r in ROLES)
        if any(len(t.shape) != 2 for t in (qweight, qzeros, scales)) or qweight.dtype.name != "int32" \
                or qzeros.dtype.name != "int32" or not scales.dtype.floating:
            return Partial(named, f"{parts['qweight']} {qweight.dtype}, {parts['qzeros']} {qzeros.dtype},"
                           f" {parts['scales']} {scales.dtype}: not 2-D int32 codes and zero points with"
                           " floating scales")
        rows, groups, columns = qweight.shape[0], scales.shape[0], qweight.shape[1] * 8
        size = group_size(config, rows, groups)
        if scales.shape[1] != columns or qzeros.shape != (groups, qweight.shape[1]) or not size \
                or rows % size or rows // size != groups:
            return Partial(named, f"qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales"
                           f" {list(scales.shape)} do not fit 4-bit codes of {columns} outputs in groups of"
                           f" {config.get('group_size', 'the same size')} inputs")
        return Group(base + ".weight", parts, (columns, rows), {"bits": BITS, "block": [1, size]})

    def dequantize(self, tensor):
        import torch

        from ..checkpoint.values import to_torch
        from ..dtypes import torch_dtype

        columns, rows = tensor.shape
        size = tensor.params["block"][1]
        order = torch.tensor(ORDER).argsort()  # the nibble of each output within its word
        where = (torch.arange(columns) // 8 * 8 + order.repeat(columns // 8))
        scales = to_torch(tensor.parts["scales"]).float()
        zeros = unpack(to_torch(tensor.parts["qzeros"]), BITS, dim=1)[:, where]
        qweight = to_torch(tensor.parts["qweight"])
        out = torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype))
        step = max(size, ROWS // max(columns, 1) // size * size)  # whole groups of inputs
        for start in range(0, rows, step):
            codes = unpack(qweight[start:start + step], BITS, dim=1)[:, where]
            group = slice(start // size, (start + codes.shape[0] + size - 1) // size)
            values = (codes.view(-1, size, columns) - zeros[group, None]) * scales[group, None]
            out[:, start:start + codes.shape[0]] = values.view(-1, columns).t()
        return out
