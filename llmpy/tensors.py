"""FlatTensors: one flat buffer and a named view into it per tensor.

The parameters, their gradients and AdamW's m and v each live in one such
buffer (llm.c's layout): an optimizer or a collective walks one array, a
layer reads its named view, and a file is the buffer plus a header.
"""
from __future__ import annotations

import numpy as np


class FlatTensors:
    """One flat buffer and a named view into it per tensor: `t.flat`, `t.wte`, ..."""

    def __init__(self, shapes, xp, flat=None, dtype=np.float32):
        self.shapes = dict(shapes)
        self.offsets = {}
        n = 0
        for name, shape in shapes:
            self.offsets[name] = n
            n += int(np.prod(shape))
        self.flat = xp.zeros(n, dtype=dtype) if flat is None else flat
        self.views = {}
        for name, shape in shapes:
            o = self.offsets[name]
            self.views[name] = self.flat[o:o + int(np.prod(shape))].reshape(shape)

    def __getattr__(self, name):
        try:
            return self.__dict__["views"][name]
        except KeyError:
            raise AttributeError(name) from None

    def segments(self):
        """(name, start, stop) of every tensor in the flat buffer."""
        for name, shape in self.shapes.items():
            o = self.offsets[name]
            yield name, o, o + int(np.prod(shape))
