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
    # machine spinning OpenMP threads make them about ten times slower. DCFX_TEST_THREADS sets
    # another count: other threads sum in other orders, which the tolerances must survive.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DCFX_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_judge():
    """The digits judge (a scikit-learn MLP, seconds to train): trained once per session, and
    the same object `dcfx demo` uses in-process (`dcfx.models.quality.judge` is cached)."""
    from dcfx.models.quality import judge

    return judge()


# The files that take longest (an AOTInductor build, an inductor compile, interpreter start-ups
# per command, the trained model), first: pytest-xdist hands out whole files in collection
# order (scripts/test.sh: --dist loadfile), so a long file collected last would run alone.
SLOW_FILES_FIRST = ("test_package.py", "test_compile.py", "test_cli.py", "test_models.py", "test_compile_orders.py",
                    "test_serve_package.py")
# The Ray tests last: their server, replica and study tasks are a dozen processes that start
# Python, torch and diffusers, so they are the tests a busy neighbour slows most; at the end the
# other worker runs a short file or none (an AOTInductor build beside them doubled their time).
LAST = "test_serve.py"


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        if name == LAST:
            return len(SLOW_FILES_FIRST) + 1
        return SLOW_FILES_FIRST.index(name) if name in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)

    items.sort(key=rank)  # stable: the order within a file stays
