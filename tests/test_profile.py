"""Profiler ranges per step, `DeepCacheUNet.graphs()` and its `cut`, and the `dcfx profile` /
`dcfx graphs` commands, on tiny U-Nets (no torch.compile)."""

from __future__ import annotations

import ast
import json

import pytest
import torch
import torch.utils._pytree as pytree
from _tiny_unet import CROSS_DIM, LATENT, NUM_SKIPS, TOKENS, skip_consumer, tiny_unet
from torch.profiler import profile, record_function

import dcfx
from dcfx import profile as profile_cmd
from dcfx.cli import main
from dcfx.inspection import WRITTEN_BY

FUSED_OP = "dcfx::cat_group_norm_silu"


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def call():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, LATENT, LATENT, generator=gen)
    ehs = torch.randn(2, TOKENS, CROSS_DIM, generator=gen)
    return (x, torch.tensor([999])), {"encoder_hidden_states": ehs}


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


def test_ranges_name_every_step(unet, call):
    args, kwargs = call
    fast = dcfx.optimize(unet, interval=3, branch=0)
    with torch.no_grad():
        fast(*args, **kwargs)  # capture outside the profile
        fast.begin(6)
        with profile() as prof:
            for i in range(6):
                with record_function(f"call {i}"):
                    fast(*args, **kwargs)
    assert fast.history[-1] == "FSSFSS"
    events = prof.events()
    by_name = lambda name: [e for e in events if e.name == name]  # noqa: E731
    full, shallow, copies = by_name("dcfx.full[b0]"), by_name("dcfx.shallow[b0]"), by_name("dcfx.cache_copy")
    assert (len(full), len(shallow), len(copies)) == (2, 4, 2)
    # Each step's range sits in its own call, in schedule order; the copy inside the full range.
    assert [next(_ancestors(e)) for e in full] == ["call 0", "call 3"]
    assert [next(_ancestors(e)) for e in shallow] == ["call 1", "call 2", "call 4", "call 5"]
    assert all(next(_ancestors(e)) == "dcfx.full[b0]" for e in copies)
    fused = by_name(FUSED_OP)
    assert len(fused) == 4 and all("dcfx.shallow[b0]" in _ancestors(e) for e in fused)

    # Another branch says so in its range names.
    other = dcfx.optimize(unet, interval=2, branch=2)
    with torch.no_grad(), profile() as prof:
        other.begin(2)
        other(*args, **kwargs)
        other(*args, **kwargs)
    names = [e.name for e in prof.events() if e.name.startswith("dcfx.")]
    assert names.count("dcfx.full[b2]") == 1 and names.count("dcfx.shallow[b2]") == 1


def test_graphs_are_what_the_runtime_runs(unet, call):
    args, kwargs = call
    fast = dcfx.optimize(unet, interval=2, branch=1)
    graphs = fast.graphs(*args, **kwargs)
    assert fast.history == ()  # no step ran
    assert graphs.branch == 1 and graphs.inputs[0] is args[0]
    weight = graphs.full.get_parameter("unet.conv_in.weight")
    assert weight.data_ptr() == unet.conv_in.weight.data_ptr()  # the U-Net's own weights
    with torch.no_grad():
        out = graphs.full(*graphs.inputs)
        leaves, cached = out[: -graphs.num_cached], out[-graphs.num_cached :]
        by_hand_full = pytree.tree_unflatten(list(leaves), graphs.out_spec).sample
        by_hand_shallow = pytree.tree_unflatten(list(graphs.shallow(*graphs.inputs, *cached)), graphs.out_spec).sample
        fast.begin(2)
        ran_full = fast(*args, **kwargs).sample
        ran_shallow = fast(*args, **kwargs).sample  # an exact repeat starts the next step
    assert fast.history[-1] == "FS"
    assert torch.equal(ran_full, by_hand_full)
    assert torch.equal(ran_shallow, by_hand_shallow)
    assert not torch.equal(ran_full, ran_shallow)  # the shallow step really is another graph


@pytest.mark.parametrize("branch,fuse", [(0, True), (0, False), (NUM_SKIPS - 1, True)])
def test_cut_names_the_unets_modules(unet, call, branch, fuse):
    args, kwargs = call
    graphs = dcfx.optimize(unet, branch=branch, fuse_cut=fuse).graphs(*args, **kwargs)
    cut = graphs.cut
    assert (cut.branch, cut.num_skips) == (branch, NUM_SKIPS)
    assert unet.get_submodule(cut.consumer) is skip_consumer(unet, branch)
    with torch.no_grad():
        cached = graphs.full(*graphs.inputs)[-graphs.num_cached :]
    assert len(cut.cached) == len(cached) == (2 if fuse else 1)
    assert cut.cached[0].name == "deepcache_feature"
    for described, tensor in zip(cut.cached, cached):
        assert described.shape == tuple(tensor.shape) and described.dtype == tensor.dtype
        assert described.nbytes == tensor.numel() * tensor.element_size()
    assert cut.cached_bytes == sum(t.numel() * t.element_size() for t in cached)
    unet.get_submodule(cut.cached[0].producer)

    # Every listed module exists; together they cover each module whose weights the full
    # graph reads exactly once; a shallow step reads all weights of the ones it runs and
    # none of the skipped ones'.
    def read(gm):
        return {n.target.removeprefix("unet.") for n in gm.graph.nodes if n.op == "get_attr"}

    full_params, shallow_params = read(graphs.full), read(graphs.shallow)
    listed = cut.shallow_modules + cut.skipped_modules
    assert len(set(listed)) == len(listed)
    for path in listed:
        unet.get_submodule(path)
    for param in full_params:
        assert sum(param.startswith(path + ".") for path in listed) == 1, param
    for path in cut.shallow_modules:
        assert {p for p in full_params if p.startswith(path + ".")} <= shallow_params, path
    for path in cut.skipped_modules:
        assert not any(p.startswith(path + ".") for p in shallow_params), path
    assert "mid_block" in cut.skipped_modules
    assert {"conv_in", "conv_out"} <= set(cut.shallow_modules)
    assert 0 < cut.shallow_nodes < cut.full_nodes
    text = str(cut)
    assert cut.consumer in text and f"{cut.cached_bytes:,} bytes" in text and "mid_block" in text


def test_write_readable_graphs(unet, call, tmp_path):
    args, kwargs = call
    graphs = dcfx.optimize(unet).graphs(*args, **kwargs)
    paths = graphs.write(tmp_path / "graphs")
    assert [p.name for p in paths] == ["full.py", "shallow.py", "cut.txt"]
    for p in paths[:2]:
        code = p.read_text()
        ast.parse(code)
        assert code.startswith(WRITTEN_BY) and "# -- module: conv_in" in code
    assert "torch.ops.dcfx.cat_group_norm_silu" in paths[1].read_text()
    assert str(graphs.cut) in paths[2].read_text()


# -- the commands -------------------------------------------------------------------------

TINY = ["--resolution", "8"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A pipeline-style folder: the tiny U-Net's config and weights in unet/."""
    root = tmp_path_factory.mktemp("pipe")
    tiny_unet().save_pretrained(root / "unet")
    return root


def test_profile_command(model_folder, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["profile", "--model", str(model_folder), *TINY, "--steps", "4", "--interval", "2",
                 "--trace", str(trace), "--device", "cpu", "--threads", "1", "--top", "5"]) == 0
    out = capsys.readouterr().out
    for text in ("UNet2DConditionModel from", "full steps:", "shallow steps:", f"fused op {FUSED_OP}",
                 "cache copy dcfx.cache_copy", "shallow/full step time", "in FLOPs", "ui.perfetto.dev"):
        assert text in out, text
    data = json.loads(trace.read_text())
    assert data["otherData"]["producer"] == "dcfx profile" and data["otherData"]["steps"] == "FSFS"
    names = [e.get("name") for e in data["traceEvents"]]
    assert names.count("dcfx.full[b0]") == 2 and names.count("dcfx.shallow[b0]") == 2
    assert names.count("dcfx.cache_copy") == 2 and names.count("step 3") == 1
    # Its own file may be replaced; a foreign one may not (unless forced).
    assert "written by an earlier dcfx profile" in profile_cmd.check_trace(trace, force=False)
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    assert main(["profile", "--size", "tiny", *TINY, "--trace", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was not written by dcfx profile" in err and "--force" in err
    assert foreign.read_text() == '{"mine": 1}'
    assert profile_cmd.check_trace(foreign, force=True) == f"overwrote {foreign} (--force)"


def test_graphs_command(model_folder, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["graphs", "--size", "tiny", *TINY, "--out", str(out), "--branch", "1"]) == 0
    printed = capsys.readouterr().out
    assert "tiny U-Net" in printed and "dcfx cut at branch 1" in printed and "meta" in printed
    assert sorted(p.name for p in out.iterdir()) == ["cut.txt", "full.py", "shallow.py"]
    # Its own files are replaced; here with a --model folder (only its config is read).
    assert main(["graphs", "--model", str(model_folder), *TINY, "--out", str(out), "--no-fuse"]) == 0
    assert "UNet2DConditionModel from" in capsys.readouterr().out
    assert "cat_group_norm_silu" not in (out / "shallow.py").read_text()
    (out / "full.py").write_text("# my notes\n")
    assert main(["graphs", "--size", "tiny", "--out", str(out)]) == 2
    assert "full.py exists and was not written by dcfx" in capsys.readouterr().err
    assert (out / "full.py").read_text() == "# my notes\n"


def test_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for command, output in (("profile", "--trace"), ("graphs", "--out")):
        assert main([command, "--model", str(tmp_path / "empty"), output, str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not a diffusers U-Net" in err
    assert main(["profile", "--model", str(tmp_path / "missing"), "--trace", str(tmp_path / "t.json")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["profile", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
