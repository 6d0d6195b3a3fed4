"""torch.compile (inductor) of the full and the shallow graph, of the smallest U-Net with the cut
(one test: a cold compile costs most of a minute here, a compile of each kernel). The other ways
of writing the compile reuse the same compiled graphs through inductor's FX graph cache;
test_compile_orders.py checks them with a cheap backend."""

import pytest
import torch
import torch._dynamo
from _tiny_unet import small_unet
from _tolerance import assert_float32_close, float64_copy
from diffusers import DDIMScheduler

import dcfx
from dcfx.passes.fuse import FUSED_OP


@pytest.mark.inductor
def test_compiled_graphs_equal_eager_and_never_recompile():
    unet = small_unet(seed=0)
    compiled = dcfx.optimize(unet, interval=3, branch=1, compile=True)
    eager = dcfx.optimize(unet, interval=3, branch=1)
    eager64 = dcfx.optimize(float64_copy(unet), interval=3, branch=1)  # the reference's float64 run
    # The order users write: same graphs, same inductor settings (an FX graph cache hit).
    wrapped = torch.compile(dcfx.optimize(unet, interval=3, branch=1))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50)
    latents = torch.randn(2, 4, 8, 8)
    ehs = torch.randn(2, 7, 32)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for i, t in enumerate(scheduler.timesteps):
            a = compiled(latents, t, encoder_hidden_states=ehs).sample
            b = eager(latents, t, encoder_hidden_states=ehs).sample
            c = wrapped(latents, t, encoder_hidden_states=ehs).sample
            b64 = eager64(latents.double(), t, encoder_hidden_states=ehs.double()).sample
            # compiled against eager: float32 against the eager graphs' float64 run (tests/_tolerance.py)
            assert_float32_close(a, b, b64, what=f"compile=True, step {i}")
            assert_float32_close(c, b, b64, what=f"torch.compile(dcfx), step {i}")
            if i == 0:
                # Lazy: nothing compiles before it is needed.
                assert list(compiled.compile_seconds) == ["full[0]"]
            latents = scheduler.step(b, t, latents).prev_sample
    assert compiled.history == (("FSS" * 17)[:50],)
    assert eager.history == compiled.history
    assert set(compiled.compile_seconds) == {"full[0]", "shallow[0]"}
    assert set(wrapped._orig_mod.compile_seconds) == {"full[0]", "shallow[0]"}
    # The fused op is in the graph that was compiled (fullgraph=True: dynamo took it whole).
    (entry,) = compiled.runtime.entries.current.values()
    assert any(n.target is FUSED_OP for n in entry.shallow.graph.graph.nodes)
