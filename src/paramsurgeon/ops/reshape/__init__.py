"""Operations that change shapes: resize (grow or shrink along a dim), split (one fused tensor
into parts), concat (parts into one), transpose (swap two dims).

    common.py     what they share: dims, index lists, torch values
    transpose.py  transpose
    resize.py     resize: kept slices, new slices filled (mean, a number, a scheme, the layer default)
    parts.py      split and concat: names mapped as rename maps them, destinations, ties

Every check (names, dims, sizes, dtypes, ties, destinations) runs in ``plan`` and every
problem is reported at once; values are computed lazily, when the writer reaches a tensor,
so memory holds one result at a time.
"""

from .parts import Concat, Split
from .resize import Resize
from .transpose import Transpose

__all__ = ["Resize", "Transpose", "Split", "Concat"]
