import os
import shutil
import sys

# Without a GPU the Triton kernels run under Triton's interpreter, which must
# be chosen before triton is first imported: frameworks the suite imports
# (torch._dynamo, through lightning and transformers) import it too.
if os.environ.get("TRITON_INTERPRET") is None and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

# The Linear op's weight gradient from the fused kernels, not from whichever path
# a timing probe of tiny shapes happens to pick (gradnoise.ops.fusion): the tests
# of that choice set the mode themselves.
os.environ.setdefault("GRADNOISE_WEIGHT_GRAD", "fused")

# Let the tests import their ground-truth helpers as `tests.ground_truth`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from tests.helpers import VARIANT_IDS, VARIANTS  # noqa: E402


@pytest.fixture(params=VARIANTS, ids=VARIANT_IDS)
def variant(request, monkeypatch):
    """A CPU backend of the kernel tests: the reference, or the compiled kernels
    forced to one instruction set this CPU runs."""
    backend, isa = request.param
    if isa is not None:
        monkeypatch.setenv("GRADNOISE_CPU_ISA", isa)
    return backend
