"""Nothing the user made is lost or broken without a word (issue 15, part C).

- `DeepCacheGraphs.write` refuses a folder with anything in it, unless `overwrite=True`;
- `DeepCacheConfig` is hashable (its compile options too) and compares and prints as before;
- a diffusers pipeline whose U-Net was replaced by hand (`pipe.unet = dcfx.optimize(...)`)
  saves the plain U-Net, `from_pretrained` gives back a pipeline that computes what the
  plain one did, and later saves (after `dcfx.disable` too) stay right.

(`benchmarks/bench_unet.py --variants` writing its own file: tests/test_bench_unet.py.)
"""

from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest
import torch
from _tiny_unet import CROSS_DIM, LATENT, TOKENS, tiny_unet, tiny_vae
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn

import dcfx
from dcfx import DeepCacheConfig
from dcfx.passes.layout import CacheLayout, UNetCut
from dcfx.runtime import PackagedModel


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0)


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


# -- DeepCacheConfig is hashable ----------------------------------------------------------------


def test_config_is_hashable_and_compares_and_prints_as_before():
    options = {"freezing": True, "cpp.simdlen": None, "some_list": [1, 2]}
    a = DeepCacheConfig(compile_options=options)
    b = DeepCacheConfig(compile_options=dict(reversed(options.items())))
    assert a == b and hash(a) == hash(b) and len({a, b, DeepCacheConfig()}) == 2
    assert {a: "settings"}[b] == "settings"
    assert a.compile_options == options and dict(a.compile_options) == options
    assert "compile_options={'freezing': True, 'cpp.simdlen': None, 'some_list': [1, 2]}" in repr(a)
    assert DeepCacheConfig() == DeepCacheConfig(compile_options={}) and hash(DeepCacheConfig()) == hash(DeepCacheConfig())
    assert DeepCacheConfig(compile_options={"freezing": True}) != DeepCacheConfig(compile_options={"freezing": False})
    # Frozen: neither the config nor its options change, also when the given dict does.
    options["freezing"] = False
    assert a.compile_options["freezing"] is True
    with pytest.raises(TypeError):
        a.compile_options["freezing"] = False
    with pytest.raises(AttributeError):
        a.compile_options.update(freezing=False)
    for copied in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
        assert copied == a and hash(copied) == hash(a)


# -- saving a pipeline whose U-Net was replaced by hand ----------------------------------------


def tiny_pipe(unet: nn.Module) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed=1), text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        path, text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(1, TOKENS, CROSS_DIM, generator=g), torch.randn(1, TOKENS, CROSS_DIM, generator=g)
    with torch.no_grad():
        return pipe(
            prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=4, height=LATENT,
            width=LATENT, output_type="latent", generator=torch.Generator().manual_seed(0),
        ).images


def saved_unet_record(path) -> list:
    return json.loads((path / "model_index.json").read_text())["unet"]


@pytest.fixture
def diffusers_warnings():
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


def test_a_pipeline_with_a_hand_assigned_unet_saves_the_plain_unet(unet, tmp_path, diffusers_warnings):
    pipe = tiny_pipe(unet)
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
    pipe = tiny_pipe(unet)
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
    pipe = tiny_pipe(unet)
    pipe.unet = dcfx.optimize(_PackagedStandIn())
    with pytest.raises(TypeError, match=r"pipe\.unet runs an AOT package.*holds no U-Net to save"):
        pipe.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
