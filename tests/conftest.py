# Without a GPU, run the Triton kernels on CPU tensors through Triton's interpreter. Triton
# reads TRITON_INTERPRET when it is first imported, so this must happen before any test module
# imports it. With a GPU the compiled kernels run instead (set TRITON_INTERPRET=1 yourself to
# run the interpreter tests there; the CUDA tests then skip).
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # The test models are tiny and gain nothing from intra-op threads; on a loaded 2-core
    # machine spinning OpenMP threads make them about ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_judge():
    """The digits judge (a scikit-learn MLP, seconds to train): trained once per session, and
    the same object `dcfx demo` uses in-process (`dcfx.models.quality.judge` is cached)."""
    from dcfx.models.quality import judge

    return judge()
