"""Whether Intel MKL loads here (ops/mkl.py), for the tests that need it:
MKL_MISSING is the one-line reason it does not (None where it does), and
needs_mkl skips a test with that reason."""
from __future__ import annotations

import pytest

from llmpy.errors import LlmpyError
from llmpy.ops import mkl

try:
    mkl.library()
    MKL_MISSING = None
except LlmpyError as e:
    MKL_MISSING = str(e)
needs_mkl = pytest.mark.skipif(MKL_MISSING is not None, reason=str(MKL_MISSING))
