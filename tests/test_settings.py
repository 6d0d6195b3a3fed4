"""Settings: a `DeepCacheConfig` written short (`DeepCacheConfig.from_setting`, `config.setting`),
and a config as a value: hashable (its compile options too), frozen, compared and printed by
its fields. (Bad field values: test_input_checks.py.)"""

from __future__ import annotations

import copy
import pickle

import pytest

from dcfx import DeepCacheConfig


@pytest.mark.parametrize(
    "text, config, canonical",
    [
        ("3:0", DeepCacheConfig(interval=3, branch=0), "3:0"),
        (" 3 : 0:uniform ", DeepCacheConfig(interval=3), "3:0"),
        ("5:2:nonuniform", DeepCacheConfig(interval=5, branch=2, schedule="nonuniform"), "5:2:nonuniform"),
        ("2:1:f1", DeepCacheConfig(interval=2, branch=1, forecast=1), "2:1:f1"),
        ("5:0:f2:nonuniform", DeepCacheConfig(interval=5, schedule="nonuniform", forecast=2), "5:0:nonuniform:f2"),
        ("cut:0", DeepCacheConfig(adaptive="cut"), "cut:0"),
        ("cut:1:0.15:f1", DeepCacheConfig(adaptive="cut", branch=1, threshold=0.15, forecast=1), "cut:1:0.15:f1"),
        ("latent:0:f2", DeepCacheConfig(adaptive="latent", forecast=2), "latent:0:f2"),
        ("interval=2,branch=0,schedule=(0, 3, 7)", DeepCacheConfig(interval=2, schedule=(0, 3, 7)), "2:0:schedule=(0,3,7)"),
        ("interval=2,branch=0,schedule='nonuniform',center=1",
         DeepCacheConfig(interval=2, schedule="nonuniform", center=1), "2:0:nonuniform:center=1"),
        ("3:0:warmup=3,compile_mode=max-autotune", DeepCacheConfig(warmup=3, compile_mode="max-autotune"),
         "3:0:compile_mode=max-autotune:warmup=3"),
        ("2:0:compile_options={'freezing': True}", DeepCacheConfig(interval=2, compile_options={"freezing": True}),
         "2:0:compile_options={'freezing': True}"),
        # A transformer's cut in B's place: the first n and the last m blocks run.
        ("3:F1B0", DeepCacheConfig(interval=3, first_blocks=1, last_blocks=0), "3:F1B0"),
        ("5:F2B1:nonuniform:f1", DeepCacheConfig(interval=5, first_blocks=2, last_blocks=1, schedule="nonuniform",
                                                 forecast=1), "5:F2B1:nonuniform:f1"),
        ("cut:F1B1:0.1", DeepCacheConfig(adaptive="cut", first_blocks=1, last_blocks=1, threshold=0.1), "cut:F1B1:0.1"),
        ("2:F3", DeepCacheConfig(interval=2, first_blocks=3), "2:F3"),
        ("2:B1", DeepCacheConfig(interval=2, last_blocks=1), "2:B1"),
        ("interval=2,first_blocks=2,last_blocks=0", DeepCacheConfig(interval=2, first_blocks=2, last_blocks=0), "2:F2B0"),
    ],
)
def test_a_setting_reads_as_its_config_and_writes_back_canonically(text, config, canonical):
    assert DeepCacheConfig.from_setting(text) == config
    assert config.setting == canonical
    assert DeepCacheConfig.from_setting(canonical) == config


@pytest.mark.parametrize(
    "text, says",
    [
        ("3", "must be N:B[:nonuniform][:fK] (a fixed schedule) or SIGNAL:B[:THRESHOLD][:fK] (adaptive)"),
        ("off", "N:B is INTERVAL:BRANCH"),
        ("sharp:0", "'sharp' is neither an interval nor a signal"),
        ("3:0:cosine", "schedule must be one of"),
        ("cut:0:-1", "threshold must be a number > 0"),
        ("cut:0:nonuniform", "threshold must be a number > 0, got 'nonuniform'"),
        ("3:0:f3", "forecast must be one of (0, 1, 2)"),
        ("0:0", "interval must be"),
        ("3:x", "branch must be an integer, got 'x'"),
        ("3:0:interval=4", "interval given twice"),
        ("3:0:speed=2", "unknown field(s) speed"),
        (3, "a setting is a string"),
        ("3:F0B0", "first_blocks must be an integer >= 1"),
        ("3:F1B0:branch=1", "branch=1 cuts a U-Net, first_blocks/last_blocks a transformer"),
        ("3:FB", "branch must be an integer, got 'FB'"),
    ],
)
def test_a_bad_setting_names_the_valid_forms(text, says):
    with pytest.raises(ValueError) as info:
        DeepCacheConfig.from_setting(text)
    assert says in str(info.value)


@pytest.mark.parametrize(
    "fields, says",
    [
        (dict(first_blocks=0), "first_blocks must be an integer >= 1"),
        (dict(last_blocks=-1), "last_blocks must be an integer >= 0"),
        (dict(first_blocks=1.5), "first_blocks must be an integer >= 1"),
        (dict(first_blocks=True), "first_blocks must be an integer >= 1"),
        (dict(branch=2, last_blocks=1), "give one or the other"),
    ],
)
def test_bad_transformer_cuts_are_refused_on_construction(fields, says):
    with pytest.raises(ValueError, match=says):
        DeepCacheConfig(**fields)


def test_a_transformer_cut_survives_to_dict():
    config = DeepCacheConfig(interval=4, first_blocks=2, last_blocks=1)
    assert DeepCacheConfig.from_dict(config.to_dict()) == config


def test_a_calibrated_config_has_no_setting():
    from dcfx.config import Calibration

    config = DeepCacheConfig(schedule=(0, 2), calibration=Calibration("m", "U", "s", "S", 4, 3.0))
    with pytest.raises(ValueError, match="config.save"):
        config.setting


def test_config_is_hashable_frozen_and_compares_and_prints_its_fields():
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
