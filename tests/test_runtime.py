"""DeepCacheUNet on a tiny random U-Net: a branch out of range, safety of the cache, call forms,
generations, and `dcfx.report`.

Every output is checked against the plain U-Net: full steps bit for bit against a plain call,
shallow steps against `ReferenceDeepCache` (the plain U-Net with the cached hidden state swapped
in by a hook, run in float32 and float64: tests/_tolerance.py).
The export of the tiny U-Net takes a few seconds per input signature and is shared by all
wrappers of the same U-Net object, so the tests reuse the session's U-Net and one signature
(the `unet` and `inputs` fixtures of tests/conftest.py: batch 2, 8x8 latents, integer
timesteps) wherever the test allows. (Bad configurations: test_input_checks.py; schedules:
test_schedules.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dcfx
from dcfx import DeepCacheConfig
from _tiny_unet import LATENT, NUM_SKIPS, ReferenceDeepCache, pattern_of, tiny_unet, uniform, unet_inputs
from _tolerance import assert_float32_close, assert_float32_far, assert_float64_close

# A full step runs the exported U-Net, its own ops in their order: bit for bit the plain call.
EXACT = dict(rtol=0, atol=0)
# A shallow step (the fused cut normalises in another order) against the float64 reference;
# one that reused nothing would be more than FAR such bounds away.
FAR = 100


def run(fast, x, t, e, **kwargs):
    with torch.no_grad():
        return fast(x, t, encoder_hidden_states=e, **kwargs).sample


def check_step(out, oracle, mode, x, t, e, **kwargs):
    """`out` against a `ReferenceDeepCache` step; gives the float32 and float64 references."""
    expected32, expected64 = oracle(mode, x, t, encoder_hidden_states=e, **kwargs)
    if mode == "F":
        torch.testing.assert_close(out, expected32, **EXACT)
    else:
        assert_float32_close(out, expected32, expected64, what=f"shallow step at t={t}")
    return expected32, expected64


# -- a branch the U-Net does not have --------------------------------------------------------


def test_branch_out_of_range_fails_at_first_call_naming_the_range(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=2, branch=NUM_SKIPS)  # nothing is checked yet
    with pytest.raises(
        ValueError,
        match=rf"branch {NUM_SKIPS} is out of range: this U-Net has {NUM_SKIPS} skip connections, "
        rf"valid branches are 0\.\.{NUM_SKIPS - 1}",
    ):
        run(fast, x, 900, e)
    # the failure left nothing behind for other wrappers of the same U-Net
    ok = dcfx.optimize(unet, interval=2, branch=NUM_SKIPS - 1)
    oracle = ReferenceDeepCache(unet, NUM_SKIPS - 1)
    for t, mode in zip((900, 800), "FS"):
        check_step(run(ok, x, t, e), oracle, mode, x, t, e)


# -- every branch, against the hand-made reference ------------------------------------------


@pytest.mark.parametrize(
    "branch, fuse_cut", [(0, True), (1, True), (2, True), (3, True), (0, False), (2, False)]
)
def test_each_branch_matches_manual_deepcache(unet, inputs, branch, fuse_cut):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=3, branch=branch, fuse_cut=fuse_cut)
    plain_outputs = []
    oracle = ReferenceDeepCache(unet, branch)
    for i, t in enumerate((900, 800, 700, 600, 500)):
        xt = x + 0.1 * i  # the sample changes between steps, as in a real loop
        out = run(fast, xt, t, e)
        expected = check_step(out, oracle, uniform(5, 3)[i], xt, t, e)
        with torch.no_grad():  # not through the oracle: an "F" call would refresh its cache
            plain_outputs.append((expected, unet(xt, t, encoder_hidden_states=e).sample))
    assert fast.history == ("FSSFS",)
    (entry,) = fast.runtime.entries.current.values()
    # the cut's concatenation (read by GroupNorm+SiLU and the 1x1 shortcut) is fused, or not
    assert entry.shallow.graph.meta.get("dcfx_fused", 0) == (1 if fuse_cut else 0)
    # the shallow steps really used the cache: they differ from the plain U-Net
    for i in (1, 2, 4):
        (expected32, expected64), plain = plain_outputs[i]
        assert_float32_far(plain, expected32, expected64, times=FAR, what=f"plain step {i}")


# -- input signatures -----------------------------------------------------------------------


def test_new_shape_mid_generation_gets_its_own_fresh_cache(unet):
    a = unet_inputs(batch=2, size=LATENT, seed=1)
    b = unet_inputs(batch=2, size=2 * LATENT, seed=2)  # another resolution
    c = unet_inputs(batch=1, size=LATENT, seed=3)  # another batch size
    fast = dcfx.optimize(unet, interval=5, branch=0)
    # (inputs, timestep, expected step kind)
    plan = [
        (a, 900, "F"),
        (a, 800, "S"),
        (b, 700, "F"),  # schedule says shallow, but b has no cache yet: full
        (b, 600, "S"),  # b's own cache, from the step before
        (a, 500, "S"),  # a's cache from step 0 of this generation
        (b, 400, "F"),  # step 5: full by the schedule
        # a new generation (timestep goes up): caches of the last generation are stale
        (c, 950, "F"),
        (a, 850, "F"),  # a has a cache, but from the previous generation: full
        (a, 750, "S"),
        (c, 650, "S"),  # c's cache from step 0 of this generation
    ]
    oracle = ReferenceDeepCache(unet, 0)
    for (x, e), t, mode in plan:
        check_step(run(fast, x, t, e), oracle, mode, x, t, e)
    assert fast.history == ("FSFSSF", "FFSS")


@pytest.mark.slow
def test_moving_to_float64_after_use_recaptures_and_stays_correct():
    own = tiny_unet(seed=5)
    fast = dcfx.optimize(own, interval=4, branch=1)
    x32, e32 = unet_inputs(seed=4)
    x64, e64 = x32.double(), e32.double()
    oracle = ReferenceDeepCache(own, 1)
    for t, mode in zip((900, 800), "FS"):
        check_step(run(fast, x32, t, e32), oracle, mode, x32, t, e32)
    # mid-generation: the float32 cache must not be used for float64 inputs
    own32 = copy.deepcopy(own)  # its float32 run measures the error the float64 bound scales
    fast.to(torch.float64)
    assert fast.dtype == torch.float64 and own.dtype == torch.float64
    outs = [run(fast, x64, t, e64) for t in (700, 600, 500)]
    assert all(o.dtype == torch.float64 for o in outs)
    assert fast.history == ("FSFSF",)
    oracle = ReferenceDeepCache(own32, 1)
    for out, t, mode in zip(outs, (700, 600, 500), "FSF"):
        expected32, expected64 = oracle(mode, x32, t, encoder_hidden_states=e32)
        if mode == "F":
            torch.testing.assert_close(out, expected64, **EXACT)
        else:
            assert_float64_close(out, expected32, expected64, what=f"float64 shallow step at t={t}")
    # the graphs now in use hold the U-Net's own (float64) parameters
    params = {id(p) for p in own.parameters()}
    for entry in fast.runtime.entries.current.values():
        for graph in (entry.full.graph, entry.shallow.graph):
            for _, p in graph.named_parameters():
                assert id(p) in params and p.dtype == torch.float64


def test_replaced_parameters_are_seen_at_the_next_generation(inputs):
    own = tiny_unet(seed=6)
    x, e = inputs
    fast = dcfx.optimize(own, interval=2)
    run(fast, x, 900, e)
    run(fast, x, 800, e)
    # e.g. a LoRA fused into a new Parameter object: the old graphs hold the old tensor
    own.conv_out.weight = nn.Parameter(own.conv_out.weight.detach() * -2.0)
    with torch.no_grad():
        expected = own(x, 900, encoder_hidden_states=e).sample
    torch.testing.assert_close(run(fast, x, 900, e), expected, **EXACT)
    assert fast.history == ("FS", "F")


def test_parameters_are_unchanged_and_shared_with_the_graphs(unet, inputs):
    x, e = inputs
    before = {name: (p, p.detach().clone()) for name, p in unet.named_parameters()}
    buffers = {name: b.clone() for name, b in unet.named_buffers()}
    training = unet.training
    fast = dcfx.optimize(unet, interval=2, branch=1)
    for t in (900, 800, 700, 600):
        run(fast, x, t, e)
    assert fast.history == ("FSFS",)
    assert fast.unet is unet and unet.training == training
    assert "forward" not in unet.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    after = dict(unet.named_parameters())
    assert after.keys() == before.keys()
    for name, (p, value) in before.items():
        assert after[name] is p, name
        assert torch.equal(p, value), name
    for name, b in unet.named_buffers():
        assert torch.equal(b, buffers[name]), name
    # no copies: every weight the graphs read is one of the U-Net's tensors (same storage)
    storage = {t.data_ptr() for t in (*unet.parameters(), *unet.buffers())}
    (entry,) = fast.runtime.entries.current.values()
    for graph in (entry.full.graph, entry.shallow.graph):
        read = 0
        for node in graph.graph.nodes:
            if node.op != "get_attr":
                continue
            value = graph
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                assert value.data_ptr() in storage, node.target
                read += 1
        assert read > 0
        for name, p in graph.named_parameters():
            assert p is after[name.removeprefix("unet.")], name


# -- generations: explicit and automatic ----------------------------------------------------


def test_begin_with_num_steps_reverts_to_automatic(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=2)
    fast.begin(3)
    # rising timesteps would each start a generation in automatic mode
    for t in (10, 20, 30):
        run(fast, x, t, e)
    assert fast.history == ("FSF",)
    # three calls done: automatic again, the timestep decides
    for t in (500, 400, 900, 800):
        run(fast, x, t, e)
    assert fast.history == ("FSF", "FS", "FS")


def test_begin_without_num_steps_lasts_until_the_next_begin(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=3)
    fast.begin()
    for t in (1, 2, 3, 4, 5):
        run(fast, x, t, e)
    fast.begin()
    run(fast, x, 1, e)
    assert fast.history == ("FSSFS", "F")


def test_begin_mid_generation_never_reuses_the_old_cache(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=2)
    oracle = ReferenceDeepCache(unet, 0)
    for t, mode in zip((900, 800, 700), "FSF"):
        check_step(run(fast, x, t, e), oracle, mode, x, t, e)
    fast.begin(2)
    x2 = x * 0.5
    for t, mode in zip((600, 500), "FS"):
        check_step(run(fast, x2, t, e), oracle, mode, x2, t, e)
    assert fast.history == ("FSF", "FS")


def test_automatic_mode_scheduler_repeats(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=2)
    # Heun-like: every timestep after the first comes twice; each call is a step
    for t in (999, 750, 750, 500, 500, 0, 0):
        run(fast, x, t, e)
    # PNDM-like: the repeat at steps 1-2, then single timesteps
    for t in (901, 851, 851, 801, 751, 701):
        run(fast, x, t, e)
    assert fast.history == ("FSFSFSF", "FSFSFS")


def test_repeated_one_step_generations_never_use_a_stale_cache(unet, inputs):
    # e.g. a one-step (turbo) sampler called again and again with the same timestep
    x, e = inputs
    fast = dcfx.optimize(unet, interval=2)
    oracle = ReferenceDeepCache(unet, 0)
    for i in range(3):
        xi = x + i
        check_step(run(fast, xi, 999, e), oracle, "F", xi, 999, e)
    assert fast.history[-1] == "F"


def test_nonuniform_needs_the_step_count(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=3, schedule="nonuniform", center=5)
    with pytest.raises(RuntimeError, match=r"needs the number of steps .*dcfx\.enable\(pipe, \.\.\.\).*begin\(num_steps\)"):
        run(fast, x, 900, e)
    with pytest.raises(RuntimeError, match=r"begin\(num_steps\)"):
        fast.is_full_step(3)
    with pytest.raises(ValueError, match=r"needs begin\(num_steps\)"):
        fast.begin()
    fast.begin(12)
    for i in range(12):
        run(fast, x, 1000 - 50 * i, e)
    expected = pattern_of(dcfx.nonuniform_full_steps(12, 3, center=5), 12)
    assert expected == "FSSFSFSSFSSS"  # (0, 3, 5, 8)
    assert fast.history[-1] == expected
    assert fast.full_steps(12) == (0, 3, 5, 8)
    # the planned generation is over: automatic mode cannot know the next step count
    with pytest.raises(RuntimeError, match=r"begin\(num_steps\)"):
        run(fast, x, 900, e)


def test_explicit_schedule_runs(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, schedule=[0, 2, 7])
    oracle = ReferenceDeepCache(unet, 0)
    for i in range(9):
        t = 900 - 100 * i
        check_step(run(fast, x, t, e), oracle, "FSFSSSSFS"[i], x, t, e)
    assert fast.history == ("FSFSSSSFS",)


# -- call forms -----------------------------------------------------------------------------


def test_return_types(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=2)
    with torch.no_grad():
        full = fast(x, 900, encoder_hidden_states=e)
        shallow = fast(x, 800, encoder_hidden_states=e, return_dict=False)
        full_tuple = fast(x, 700, e, return_dict=False)
        shallow_dict = fast(x, 600, e, return_dict=True)
    assert fast.history == ("FSFS",)
    assert isinstance(full, UNet2DConditionOutput) and isinstance(shallow_dict, UNet2DConditionOutput)
    for out in (shallow, full_tuple):
        assert type(out) is tuple and len(out) == 1 and isinstance(out[0], torch.Tensor)
    with torch.no_grad():
        plain = unet(x, 700, e, return_dict=False)
    assert type(plain) is tuple
    torch.testing.assert_close(full_tuple[0], plain[0], **EXACT)


TIMESTEP_FORMS = {
    "int": lambda t: t,
    "float": lambda t: float(t),
    "tensor0d": lambda t: torch.tensor(t),
    "tensor1d": lambda t: torch.tensor([t]),
}


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
@pytest.mark.parametrize("form", list(TIMESTEP_FORMS))
def test_timestep_forms(unet, inputs, form, keyword):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=2)
    oracle = ReferenceDeepCache(unet, 0)
    for i, (t, mode) in enumerate(zip((900, 600, 300), "FSF")):
        ts = TIMESTEP_FORMS[form](t)
        xt = x + 0.1 * i
        with torch.no_grad():
            out = fast(xt, timestep=ts, encoder_hidden_states=e) if keyword else fast(xt, ts, e)
        # the plain U-Net given the same form
        check_step(out.sample, oracle, mode, xt, ts, e)
    assert fast.history == ("FSF",)


def test_cross_attention_scale(unet, inputs):
    x, e = inputs
    kwargs = dict(cross_attention_kwargs={"scale": 0.5})
    fast = dcfx.optimize(unet, interval=2)
    oracle = ReferenceDeepCache(unet, 0)
    for t, mode in zip((900, 800, 700), "FSF"):
        check_step(run(fast, x, t, e, **kwargs), oracle, mode, x, t, e, **kwargs)
    assert fast.history == ("FSF",)


def test_arguments_passed_as_none(unet, inputs):
    """Every diffusers pipeline passes timestep_cond=None, added_cond_kwargs=None, ... ."""
    x, e = inputs
    kwargs = dict(timestep_cond=None, cross_attention_kwargs=None, added_cond_kwargs=None)
    fast = dcfx.optimize(unet, interval=2)
    oracle = ReferenceDeepCache(unet, 0)
    for t, mode in zip((900, 800, 700), "FSF"):
        check_step(run(fast, x, t, e, **kwargs), oracle, mode, x, t, e, **kwargs)
    assert fast.history == ("FSF",)


def controlnet_residuals(batch: int, seed: int):
    """Residuals for the tiny U-Net's skips s0..s3 and its mid block (as a ControlNet gives)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(32, 8), (32, 8), (32, 4), (64, 4)]  # (channels, size) of s0..s3
    down = tuple(torch.randn(batch, c, s, s, generator=g) for c, s in shapes)
    mid = torch.randn(batch, 64, 4, 4, generator=g)
    return dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)


def test_controlnet_residuals_without_caching_equal_plain(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=1)
    for i, t in enumerate((900, 800, 700)):
        residuals = controlnet_residuals(2, seed=i)
        with torch.no_grad():
            expected = unet(x, t, encoder_hidden_states=e, **residuals).sample
        torch.testing.assert_close(run(fast, x, t, e, **residuals), expected, **EXACT)
    assert fast.history == ("FFF",)


@pytest.mark.parametrize("branch", [0, 2])
def test_controlnet_residuals_with_caching(unet, inputs, branch):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=3, branch=branch)
    oracle = ReferenceDeepCache(unet, branch)
    for i, (t, mode) in enumerate(zip((900, 800, 700, 600, 500), "FSSFS")):
        residuals = controlnet_residuals(2, seed=i)  # fresh residuals every step
        check_step(run(fast, x, t, e, **residuals), oracle, mode, x, t, e, **residuals)
    assert fast.history == ("FSSFS",)


# -- dcfx.report ----------------------------------------------------------------------------

# Modules each branch's shallow step runs (besides parameter-free ones), for the tiny U-Net;
# DEEPCACHE.md's table, specialised to 1 layer per block.
SHALLOW_MODULES = {0: ["time_embedding", "conv_in", "conv_out", "up_blocks.1.resnets.1", "up_blocks.1.attentions.1"]}
SHALLOW_MODULES[1] = SHALLOW_MODULES[0] + [
    "down_blocks.0.resnets.0",
    "down_blocks.0.attentions.0",
    "up_blocks.1.resnets.0",
    "up_blocks.1.attentions.0",
]
SHALLOW_MODULES[2] = SHALLOW_MODULES[1] + [
    "down_blocks.0.downsamplers.0",
    "up_blocks.0.resnets.1",
    "up_blocks.0.upsamplers.0",
]
SHALLOW_MODULES[3] = SHALLOW_MODULES[2] + ["down_blocks.1.resnets.0", "up_blocks.0.resnets.0"]


@pytest.fixture(scope="module")
def module_flops(unet, inputs):
    # The plain module on the meta device: attention counted as its matrix products, as on
    # any device (a CPU's fused attention kernel has no FLOP formula in the counter).
    x, e = inputs
    with torch.device("meta"):
        twin = type(unet).from_config(unet.config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        twin(x.to("meta"), 900, encoder_hidden_states=e.to("meta"))
    prefix = type(unet).__name__ + "."
    per_module = {
        name.removeprefix(prefix): sum(counts.values()) for name, counts in counter.get_flop_counts().items()
    }
    return counter.get_total_flops(), per_module


@pytest.fixture(scope="module")
def full_report(unet, inputs):
    x, e = inputs
    return dcfx.report(unet, x, torch.tensor([900]), encoder_hidden_states=e, config=DeepCacheConfig(interval=3), num_steps=10)


def test_report_rows_and_flops(full_report, module_flops):
    total, per_module = module_flops
    rep = full_report
    assert rep.num_skips == NUM_SKIPS and rep.model == "UNet2DConditionModel"
    assert [r.branch for r in rep.branches] == list(range(NUM_SKIPS))
    shallow = []
    for r in rep.branches:
        assert r.full_flops == total
        expected = sum(per_module[name] for name in SHALLOW_MODULES[r.branch])
        assert r.shallow_flops == expected, r.branch
        assert r.shallow_nodes < r.full_nodes
        assert r.shallow_fraction == pytest.approx(expected / total)
        shallow.append(r.shallow_flops)
    assert all(a < b for a, b in zip(shallow, shallow[1:])), shallow
    assert shallow[-1] < total


def test_report_speedup_bound(full_report):
    num_steps, num_full = 10, 4  # full steps 0, 3, 6, 9
    for r in full_report.branches:
        assert (r.num_steps, r.num_full_steps) == (num_steps, num_full)
        m_f, m_s = r.full_flops, r.shallow_flops
        bound = num_steps * m_f / (num_full * m_f + (num_steps - num_full) * m_s)
        assert r.speedup_bound == pytest.approx(bound, rel=1e-12)  # float64 arithmetic, in another order
        assert 1 < r.speedup_bound < num_steps / num_full


def test_report_table(full_report):
    text = str(full_report)
    lines = text.splitlines()
    assert lines[0].startswith("dcfx report: UNet2DConditionModel, 4 skip connections (branches 0..3)")
    assert "schedule uniform, interval 3, 10 steps (4 full)" in lines[0]
    assert "speedup bound" in lines[1]
    rows = lines[3:]
    assert [row.split()[0] for row in rows] == ["0", "1", "2", "3"]
    for row, r in zip(rows, full_report.branches):
        assert f"{r.speedup_bound:.2f}x" in row


def test_report_of_a_wrapper_uses_its_config(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=5, branch=1, schedule="nonuniform")
    rep = dcfx.report(fast, x, 900, e, num_steps=50, branches=[1, 3])
    assert rep.config == fast.deepcache_config
    assert [r.branch for r in rep.branches] == [1, 3]
    assert all(r.num_full_steps == 10 for r in rep.branches)  # nonuniform_full_steps(50, 5)
    assert "schedule nonuniform, interval 5, 50 steps (10 full)" in str(rep)


def test_report_bad_arguments(unet, inputs):
    x, e = inputs
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        dcfx.report(unet, x, 900, e, num_steps=0)
    with pytest.raises(ValueError, match=r"branch 7 is out of range: .*valid branches are 0\.\.3"):
        dcfx.report(unet, x, 900, e, branches=[7])


def test_noop_moves_keep_the_cache(unet, inputs):
    # CPU-offload hooks call .to(device) before every forward: caching must survive it.
    x, e = inputs
    fast = dcfx.optimize(unet, interval=3)
    for t in (900, 800, 700, 600, 500, 400):
        fast.to("cpu")
        run(fast, x, t, e)
    assert fast.history == ("FSSFSS",)


def test_cache_made_under_inference_mode_works_outside_it(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=2)
    with torch.inference_mode():
        fast(x, 900, e), fast(x, 800, e)
    run(fast, x, 900, e), run(fast, x, 800, e)
    assert fast.history == ("FS", "FS")


def test_autocast_is_part_of_the_signature(unet, inputs):
    x, e = inputs
    fast = dcfx.optimize(unet, interval=2)
    run(fast, x, 900, e)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(fast, x, 800, e)  # a new capture: runs full, no dtype clash
        expected = run(unet, x, 800, e)
    assert len(fast.runtime.entries.current) == 2
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_changed_module_state_is_recaptured(inputs):
    # FreeU changes scalar attributes of the up blocks, no parameter: the next generation
    # must see it.
    unet = tiny_unet(seed=0)
    x, e = inputs
    fast = dcfx.optimize(unet, interval=2)
    run(fast, x, 900, e), run(fast, x, 800, e)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    torch.testing.assert_close(run(fast, x, 900, e), run(unet, x, 900, e), rtol=0, atol=0)
    unet.disable_freeu()  # checked at the next generation (a larger timestep starts one)
    torch.testing.assert_close(run(fast, x, 950, e), run(unet, x, 950, e), rtol=0, atol=0)


@pytest.mark.parametrize("forecast", [0, 2])
def test_report_cache_memory_is_what_the_runtime_keeps(unet, inputs, forecast):
    x, e = inputs
    config = DeepCacheConfig(interval=3, branch=1, forecast=forecast)
    rep = dcfx.report(unet, x, torch.tensor([900]), encoder_hidden_states=e, config=config, branches=[1])
    cut = dcfx.optimize(unet, config).graphs(x, torch.tensor([900]), encoder_hidden_states=e).cut
    feature = cut.cached[0].nbytes
    assert rep.branches[0].cached_bytes == cut.cached_bytes
    assert sum(c.nbytes for c in cut.cached if c.name.startswith("deepcache_feature")) >= (1 + forecast) * feature
    assert f"{cut.cached_bytes / 2**20:.2f}" in str(rep).splitlines()[3]
