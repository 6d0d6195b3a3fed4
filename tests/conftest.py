"""Settings of the test session, shared fixtures, and the order the files run in."""

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

# Inductor compiles one kernel at a time, in the process that asks (read when inductor is
# imported): the pytest-xdist workers keep the cores busy already, and a pool of compile workers
# would cost each worker that compiles two more interpreter start-ups.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# Without a GPU, run the Triton kernels on CPU tensors through Triton's interpreter. Triton
# reads TRITON_INTERPRET when it is first imported, so this must happen before any test module
# imports it. With a GPU the compiled kernels run instead (set TRITON_INTERPRET=1 yourself to
# run the interpreter tests there; the CUDA tests then skip).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# No Python stack trace per traced node: torch.export and dynamo record one for every node (a
# third of a capture's time here), as debugging text in node.meta and in the generated code,
# and no test reads them.
torch.fx.config.do_not_emit_stack_traces = True


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
def unet():
    """The tiny U-Net (`_tiny_unet.tiny_unet(seed=0)`), shared by every test that only reads it:
    dcfx shares a U-Net's captures between its wrappers, so each call signature is exported once
    per session. A test that changes its U-Net builds its own; a file that needs another U-Net
    defines its own `unet` fixture."""
    from _tiny_unet import tiny_unet

    return tiny_unet(seed=0)


@pytest.fixture(scope="session")
def inputs():
    """`(sample, encoder_hidden_states)` of batch 2 for the tiny U-Net (`_tiny_unet.unet_inputs()`),
    read only."""
    from _tiny_unet import unet_inputs

    return unet_inputs()


@contextlib.contextmanager
def _records(name: str, level: int):
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = seen.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="session")
def log_records():
    """`with log_records(name, level) as seen:` collects the log records of logger `name` and its
    children at `level` or above in the list `seen`, whatever propagation says."""
    return _records


@pytest.fixture(scope="session")
def digits_judge():
    """The digits judge (a scikit-learn MLP, seconds to train): trained once per session, and
    the same object `dcfx demo` uses in-process (`dcfx.models.quality.judge` is cached)."""
    from dcfx.models.quality import judge

    return judge()


# What `import dcfx` and the CLI load, seen in a fresh interpreter (this one has imported far
# more): module names after each of these steps, in order.
IMPORT_STEPS = {
    "import dcfx": "import dcfx; dcfx.optimize, dcfx.report, dcfx.package",
    "import dcfx.cli": "import dcfx.cli",
    "the serve parser": "dcfx.cli.parser('serve')",
    "the demo command": "dcfx.cli.command('demo')",
}


@pytest.fixture(scope="session")
def modules_after(tmp_path_factory):
    """{step of IMPORT_STEPS: the modules loaded after it}, from one fresh interpreter per test
    run (`python -P` in the checkout root), shared by test_imports.py and test_cli.py."""
    from _shared import built_once

    probe = "import json, sys\nafter = {}\n" + "".join(
        f"{code}\nafter[{step!r}] = sorted(sys.modules)\n" for step, code in IMPORT_STEPS.items()
    ) + "print(json.dumps(after))\n"

    def run(folder):
        out = subprocess.run([sys.executable, "-P", "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        (folder / "modules.json").write_text(out.stdout)

    return json.loads((built_once(tmp_path_factory, "modules-after", probe, run) / "modules.json").read_text())


# pytest-xdist (scripts/test.sh: --dist loadfile --no-loadscope-reorder) hands out whole files in
# collection order, a worker taking its next file while its last tests run: the files with the
# slowest kinds of test go first, so that no long file starts last and runs alone.
SLOWEST_KINDS_FIRST = ("aot", "inductor", "subprocess", "trained")
# The Ray tests last: their server, replica and study tasks are a dozen processes that start
# Python, torch and diffusers, so they are the tests a busy neighbour slows most; at the end the
# other worker runs a short file or none (an AOTInductor build beside them doubled their time).
LAST = "ray"


def pytest_collection_modifyitems(items):
    def kind(item):
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            return len(SLOWEST_KINDS_FIRST)  # skipped: takes no time
        if item.get_closest_marker(LAST):
            return len(SLOWEST_KINDS_FIRST) + 1
        return next((i for i, m in enumerate(SLOWEST_KINDS_FIRST) if item.get_closest_marker(m)), len(SLOWEST_KINDS_FIRST))

    kinds: dict = {}
    for item in items:
        kinds.setdefault(item.path, set()).add(kind(item))
    last = len(SLOWEST_KINDS_FIRST) + 1  # a file ranks by its slowest kind; Ray's anywhere puts it last
    rank = {path: last if last in ks else min(ks) for path, ks in kinds.items()}
    items.sort(key=lambda item: rank[item.path])  # stable: the order within a file stays
