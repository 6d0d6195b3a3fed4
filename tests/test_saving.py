"""Saving: nothing the user made is lost, and what dcfx saves loads back as the plain model.

- `pipe.save_pretrained` of a pipeline running dcfx (through `dcfx.enable`, or a U-Net
  assigned by hand, also compiled) saves the plain U-Net, `from_pretrained` gives back a
  pipeline that computes what the plain one did, and later saves (after `dcfx.disable` too)
  stay right; `enable` and `disable` leave the pipeline's config as it was; a pipeline
  running an AOT package refuses to save before writing anything;
- `DeepCacheGraphs.write` refuses a folder with anything in it, unless `overwrite=True`;
- a `DeepCacheUNet` pickles, deep-copies and goes through `torch.save` and `torch.load`.

(`benchmarks/bench_unet.py --variants` writing its own file: tests/test_bench_unet.py.)
"""

from __future__ import annotations

import copy
import io
import json
import logging
import pickle

import pytest
import torch
from _tiny_unet import CROSS_DIM, LATENT, TOKENS, prompt_embeds, tiny_pipe
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

import dcfx
from dcfx import DeepCacheUNet
from dcfx.passes.layout import CacheLayout, UNetCut
from dcfx.runtime import PackagedModel


def load(path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        path, text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> torch.Tensor:
    prompt, negative = prompt_embeds(seed=0)
    with torch.no_grad():
        return pipe(
            prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=4, height=LATENT,
            width=LATENT, output_type="latent", generator=torch.Generator().manual_seed(0),
        ).images


def saved_unet_record(path) -> list:
    return json.loads((path / "model_index.json").read_text())["unet"]


@pytest.fixture
def diffusers_warnings(log_records):
    with log_records("diffusers", logging.WARNING) as seen:
        yield seen


# -- save_pretrained of a pipeline running dcfx --------------------------------------------------


def test_save_pretrained_with_dcfx_enabled_saves_and_loads_the_plain_unet(unet, tmp_path, log_records):
    pipe = tiny_pipe(unet, EulerDiscreteScheduler(steps_offset=1))
    before = dict(pipe.config)
    fast = dcfx.enable(pipe, interval=2, branch=0)
    assert dict(pipe.config) == before  # still records diffusers' UNet2DConditionModel

    with log_records("diffusers", logging.WARNING) as warned:
        pipe.save_pretrained(tmp_path)
    assert not [r for r in warned if "unet" in r.getMessage()]  # nothing printed the module
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tmp_path / "unet" / "config.json").exists()
    assert pipe.unet is fast and pipe.config["unet"] == before["unet"]  # still enabled

    loaded = load(tmp_path)
    assert type(loaded.unet) is UNet2DConditionModel
    for (name, a), (_, b) in zip(loaded.unet.state_dict().items(), unet.state_dict().items()):
        assert torch.equal(a, b), name

    dcfx.disable(pipe)
    assert pipe.unet is unet and "save_pretrained" not in vars(pipe)


def test_disable_leaves_the_pipeline_config_as_before_enable(unet):
    pipe = tiny_pipe(unet, EulerDiscreteScheduler(steps_offset=1))
    before = dict(pipe.config)
    dcfx.enable(pipe, interval=3)
    dcfx.enable(pipe, interval=2)  # re-enabling replaces the first
    dcfx.disable(pipe)
    assert dict(pipe.config) == before and pipe.unet is unet

    # Assigned by hand, diffusers records DeepCacheUNet; disable (and enable) repair it.
    pipe.unet = dcfx.optimize(pipe.unet)
    assert pipe.config["unet"][1] == "DeepCacheUNet"
    dcfx.disable(pipe)
    assert dict(pipe.config) == before and pipe.unet is unet
    pipe.unet = dcfx.optimize(pipe.unet)
    dcfx.enable(pipe)
    assert dict(pipe.config) == before
    dcfx.disable(pipe)


def test_a_pipeline_with_a_hand_assigned_unet_saves_the_plain_unet(unet, tmp_path, diffusers_warnings):
    pipe = tiny_pipe(unet, DDIMScheduler())
    plain_latents = generate(pipe)  # the reference: the plain pipeline
    pipe.unet = fast = dcfx.optimize(pipe.unet, interval=2)
    dcfx_latents = generate(pipe)
    assert not torch.equal(dcfx_latents, plain_latents)  # shallow steps ran

    pipe.save_pretrained(tmp_path / "a")
    assert not [r for r in diffusers_warnings if "self.unet=" in r.getMessage()]  # None parts warn
    assert saved_unet_record(tmp_path / "a") == ["diffusers", "UNet2DConditionModel"]
    loaded = load(tmp_path / "a")
    assert type(loaded.unet) is UNet2DConditionModel
    torch.testing.assert_close(generate(loaded), plain_latents, rtol=0, atol=0)
    assert pipe.unet is fast  # saving changed nothing in use
    torch.testing.assert_close(generate(pipe), dcfx_latents, rtol=0, atol=0)

    # A record diffusers broke on an earlier save (it writes [null, null] and keeps that)
    # is repaired, not carried into the next save.
    pipe.register_to_config(unet=(None, None))
    pipe.save_pretrained(tmp_path / "b")
    assert saved_unet_record(tmp_path / "b") == ["diffusers", "UNet2DConditionModel"]

    # After disable the pipeline is the plain one and saves as such, again and again.
    assert dcfx.disable(pipe) is unet and pipe.unet is unet
    for name in ("c", "d"):
        pipe.save_pretrained(tmp_path / name)
        assert saved_unet_record(tmp_path / name) == ["diffusers", "UNet2DConditionModel"]
    torch.testing.assert_close(generate(load(tmp_path / "d")), plain_latents, rtol=0, atol=0)


def test_a_compiled_dcfx_unet_assigned_by_hand_saves_the_plain_unet(unet, tmp_path):
    pipe = tiny_pipe(unet, DDIMScheduler())
    pipe.unet = torch.compile(dcfx.optimize(pipe.unet), backend="eager")  # nothing runs here
    pipe.save_pretrained(tmp_path)
    assert saved_unet_record(tmp_path) == ["diffusers", "UNet2DConditionModel"]
    assert type(load(tmp_path).unet) is UNet2DConditionModel


class _PackagedStandIn(PackagedModel):
    """Like the U-Net a loaded AOT package runs behind: a forward signature, graphs, no weights."""

    key, signature, out_spec = (None, (), None), "", None
    layout = CacheLayout(UNetCut(0, 1))
    runners = {"full": None, "shallow": None}

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        raise AssertionError("not called")


def test_a_pipeline_running_an_aot_package_refuses_to_save_before_writing(unet, tmp_path):
    pipe = tiny_pipe(unet, DDIMScheduler())
    pipe.unet = dcfx.optimize(_PackagedStandIn())
    with pytest.raises(TypeError, match=r"pipe\.unet runs an AOT package.*holds no U-Net to save"):
        pipe.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- DeepCacheGraphs.write ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def graphs(unet):
    x, e = torch.randn(2, 4, LATENT, LATENT), torch.randn(2, TOKENS, CROSS_DIM)
    return dcfx.optimize(unet).graphs(x, 999, encoder_hidden_states=e)


def test_write_refuses_a_folder_with_anything_in_it(graphs, tmp_path):
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "full.py").write_text("my own notes\n")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        graphs.write(kept)
    assert [p.name for p in kept.iterdir()] == ["full.py"] and (kept / "full.py").read_text() == "my own notes\n"

    first = tmp_path / "first"
    assert {p.name for p in graphs.write(first)} == {"full.py", "shallow.py", "cut.txt"}
    with pytest.raises(FileExistsError):  # an earlier write is work too
        graphs.write(first)

    empty = tmp_path / "empty"
    empty.mkdir()
    graphs.write(empty)  # an existing empty folder is fine
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        graphs.write(tmp_path / "file", overwrite=True)


def test_write_with_overwrite_replaces_its_files_only(graphs, tmp_path):
    (tmp_path / "full.py").write_text("old\n")
    (tmp_path / "notes.txt").write_text("keep\n")
    graphs.write(tmp_path, overwrite=True)
    assert (tmp_path / "full.py").read_text() != "old\n" and (tmp_path / "notes.txt").read_text() == "keep\n"


# -- pickle, deepcopy, torch.save ---------------------------------------------------------------


@pytest.mark.slow
def test_pickle_copy_and_torch_save_round_trip(unet):
    g = torch.Generator().manual_seed(3)
    uncond = torch.randn(1, TOKENS, CROSS_DIM, generator=g)
    torch.randn(1, TOKENS, CROSS_DIM, generator=g)  # a second conditioning, not used here
    x = torch.randn(1, 4, LATENT, LATENT, generator=g)
    fast = dcfx.optimize(unet, interval=2, branch=1)
    fast.begin()
    with torch.no_grad():
        expected = [fast(x, t, encoder_hidden_states=uncond).sample for t in (900, 700, 500)]

    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    clones = [
        pickle.loads(pickle.dumps(fast)),
        copy.deepcopy(fast),
        torch.load(buffer, weights_only=False),
    ]
    for clone in clones:
        assert isinstance(clone, DeepCacheUNet) and clone.unet is not unet
        assert clone.deepcache_config == fast.deepcache_config
        assert clone.history == () and not clone.runtime.entries.states  # graphs are rebuilt lazily
        with torch.no_grad():
            outs = [clone(x, t, encoder_hidden_states=uncond).sample for t in (900, 700, 500)]
        assert clone.history == ("FSF",)
        for a, b in zip(outs, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
