"""gptq: AutoGPTQ/GPTQModel's layout. ``x.qweight`` int32 [in*bits/32, out] (the input dimension's
codes packed as a little-endian bit stream down each column: 32/bits a word for 2/4/8 bits, 32
in three words for 3 bits), ``x.qzeros`` int32 [groups, out*bits/32] (packed the same way along
a row), ``x.scales`` [groups, out], ``x.g_idx`` [in] (the group of each input; not monotonic
under act-order). A value is scale * (code - zero) of its group, in float32 rounded to the dtype;
zero points are stored minus one in format v1 (``checkpoint_format: gptq``, the default), not
in v2 (``gptq_v2``). The logical tensor is ``x.weight`` [out, in].
"""

from __future__ import annotations

import math

from .base import Group, Partial, Scheme

ROLES = ("qweight", "qzeros", "scales", "g_idx")
BITS = (2, 3, 4, 8)
FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what the stored zero points lack
ELEMENTS = 1 << 22  # codes unpacked at a time


class QweightScheme(Scheme):
    """What GPTQ and AWQ share: the group ``x.weight`` stored as ``x.qweight``, ``x.qzeros``, ``x.scales``
    (and GPTQ's ``x.g_idx``); without a config, ``claims`` tells whose parts they are."""

    def part_name(self, name, role):
        return base_of(name) + "." + role

    def claims(self, tensors: dict, parts: dict[str, str]) -> bool:
        """Whether parts found without a quantization_config are this scheme's."""
        raise NotImplementedError

    def names_orphan(self, role: str, method: str | None) -> bool:
        """Whether a part ``role`` without its codes is named (a partial group) under ``method``."""
        raise NotImplementedError

    def find(self, tensors, config):
        method = config.get("quant_method")
        if method not in (None, self.name):
            return
        for name in tensors:
            if not name.endswith(self.markers):
                continue
            base, role = name.rsplit(".", 1)
            if role == "qweight":
                parts = {r: base + "." + r for r in self.roles if base + "." + r in tensors}
                if method == self.name or self.claims(tensors, parts):
                    yield self.group(base, parts, tensors, config)
            elif base + ".qweight" not in tensors and self.names_orphan(role, method):
                article = "an" if self.name[0] in "aeiou" else "a"
                yield Partial([name], f"{article} {self.name} {role} without its codes {base}.qweight")


class Gptq(QweightScheme):
    name = "gptq"
    roles = ROLES
    markers = (".qweight", ".qzeros", ".g_idx", ".scales")
    methods = ("gptq",)
    per_weight = ("g_idx",)

    def claims(self, tensors, parts):
        return not looks_like_awq(tensors, parts)

    def names_orphan(self, role, method):
        return role != "scales" or method == "gptq"  # 'scales' alone is too common a name

    def group(self, base: str, parts: dict[str, str], tensors: dict, config: dict) -> Group | Partial:
        """The group of ``base``'s parts, or why they do not make one."""
        named = list(parts.values())
        missing = [base + "." + r for r in ("qzeros", "scales") if r not in parts]
        if missing:
            return Partial(named, f"{parts['qweight']} without its {' and '.join(missing)}")
        fmt = checkpoint_format(config)
        if not isinstance(fmt, str) or fmt not in FORMATS:
            return Partial(named, f"checkpoint_format {fmt!r} is not read (only gptq and gptq_v2)")
        qweight, qzeros, scales = (tensors[parts[r]] for r in ("qweight", "qzeros", "scales"))
        g_idx = tensors.get(parts.get("g_idx"))
        layout = f"qweight {list(qweight.shape)} {qweight.dtype}, qzeros {list(qzeros.shape)} {qzeros.dtype}," \
                 f" scales {list(scales.shape)} {scales.dtype}"
        if any(len(t.shape) != 2 for t in (qweight, qzeros, scales)) or qweight.dtype.name != "int32" \
                or qzeros.dtype.name != "int32" or not scales.dtype.floating:
            return Partial(named, f"{layout}: not 2-D int32 codes and zero points with floating scales")
        groups, columns = scales.shape
        bits = config.get("bits") or (qzeros.shape[1] * 32 // columns if columns else 0)
        if bits not in BITS or qweight.shape[1] != columns or columns * bits % 32 or qweight.shape[0] * 32 % bits \
                or qzeros.shape != (groups, columns * bits // 32):
            return Partial(named, f"{layout} do not fit {bits}-bit codes of {columns} outputs")
        rows = qweight.shape[0] * 32 // bits
        size = group_size(config, rows, groups)
        if g_idx is not None and (g_idx.shape != (rows,) or g_idx.dtype.floating):
            return Partial(named, f"g_idx {list(g_idx.shape)} {g_idx.dtype} does not name a group for each of the"
                           f" {rows} inputs of {parts['qweight']}")
        if g_idx is None and (size is None or math.ceil(rows / size) != groups):
            return Partial(named, f"{layout}: no g_idx, and {groups} groups of scales do not split {rows} inputs"
                           f" in groups of {config.get('group_size', 'the same size')}")
        params = {"bits": bits, "block": [1, size or rows], "offset": FORMATS[fmt]}
        if g_idx is not None:
            params["g_idx"] = parts["g_idx"]  # its stored name, for an error about its values
        return Group(base + ".weight", parts, (columns, rows), params)

    def dequantize(self, tensor):
        import torch

        from ..checkpoint.values import to_torch
        from ..dtypes import torch_dtype

        bits, offset = tensor.params["bits"], tensor.params["offset"]
        columns, rows = tensor.shape
        scales = to_torch(tensor.parts["scales"]).float()
        zeros = unpack(to_torch(tensor.parts["qzeros"]), bits, dim=1)
        if offset:
            zeros = (zeros + offset) & ((1 << bits) - 1)
        groups, size = group_index(tensor, rows, scales.shape[0]), tensor.params["block"][1]
        # groups of consecutive inputs broadcast their scales; act-order gathers them input by input
        consecutive = rows % size == 0 and size % 32 == 0 and torch.equal(groups, torch.arange(rows) // size)
        qweight = to_torch(tensor.parts["qweight"])
        out = torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype))
        whole = size if consecutive else 32  # inputs a chunk holds a multiple of (32: whole words)
        step = max(whole, ELEMENTS // max(columns, 1) // whole * whole) * bits // 32
        for start in range(0, qweight.shape[0], step):
            codes = unpack(qweight[start:start + step], bits, dim=0)
            first, count = start * 32 // bits, codes.shape[0]
            if consecutive:
                part = slice(first // size, (first + count) // size)
                values = (codes.view(-1, size, columns) - zeros[part, None]) * scales[part, None]
            else:
                index = groups[first:first + count]
                values = (codes - zeros[index]) * scales[index]
            out[:, first:first + count] = values.view(count, columns).to(out.dtype).t()
        return out


def base_of(name: str) -> str:
    """The stored prefix of the parts of the logical tensor ``name`` (``x`` for ``x.weight``)."""
    return name[:-len(".weight")] if name.endswith(".weight") else name


def checkpoint_format(config: dict) -> str:
    """The layout a GPTQ config names: ``checkpoint_format`` (GPTQModel's newer ``format``), else v1."""
    named = config.get("checkpoint_format") or config.get("format")
    return named if named else "marlin" if config.get("is_marlin_format") else "gptq"


def looks_like_awq(tensors: dict, parts: dict[str, str]) -> bool:
    """Whether codes and scales without a config are AWQ's (packed along the outputs, no g_idx)."""
    if "g_idx" in parts or "scales" not in parts:
        return False
    qweight, scales = tensors[parts["qweight"]], tensors[parts["scales"]]
    return len(qweight.shape) == len(scales.shape) == 2 and scales.shape[1] != qweight.shape[1]


def group_size(config: dict, rows: int, groups: int) -> int | None:
    """Inputs a group: the config's ``group_size`` (-1: all), else what splits ``rows`` evenly."""
    size = config.get("group_size")
    if isinstance(size, int) and not isinstance(size, bool):
        return rows if size == -1 else size if size > 0 else None
    return rows // groups if groups and rows % groups == 0 else None


def group_index(tensor, rows: int, groups: int):
    """The group of each input: ``g_idx`` (checked against the scales), else consecutive groups."""
    import torch

    from ..checkpoint.values import to_torch
    from ..errors import CorruptCheckpointError

    if "g_idx" not in tensor.parts:
        return torch.arange(rows) // tensor.params["block"][1]
    index = to_torch(tensor.parts["g_idx"]).long()
    if rows and (index.min() < 0 or index.max() >= groups):
        raise CorruptCheckpointError(f"{tensor.params['g_idx']} names groups {int(index.min())}..{int(index.max())}"
                                     f" where its scales hold groups 0..{groups - 1}; the gptq layer cannot be read")
    return index


def unpack(words, bits: int, dim: int):
    """The ``bits``-bit codes packed little-endian in the int32 ``words`` along ``dim``, as int32:
    code k of a column (``dim`` 0) or row (``dim`` 1) is bits k*bits.. of its words' bit stream."""
    import torch

    words = words if dim == 0 else words.t()
    mask = (1 << bits) - 1
    if bits != 3:  # a whole number of codes a word
        shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, -1, *[1] * (words.dim() - 1))
        out = ((words.unsqueeze(1) >> shifts) & mask).reshape(-1, *words.shape[1:])
        return out if dim == 0 else out.t()
    period = 3  # words that hold a whole number of codes
    chunk = words.reshape(-1, period, *words.shape[1:])
    codes = []
    for k in range(32 * period // bits):
        word, shift = divmod(k * bits, 32)
        if shift + bits <= 32:
            code = (chunk[:, word] >> shift) & mask
        else:  # the code runs into the next word (3 bits)
            low = (chunk[:, word] >> shift) & ((1 << (32 - shift)) - 1)
            code = low | ((chunk[:, word + 1] << (32 - shift)) & mask)
        codes.append(code)
    out = torch.stack(codes, 1).reshape(-1, *words.shape[1:])
    return out if dim == 0 else out.t()
