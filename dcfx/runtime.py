"""Run: `DeepCacheUNet`, the drop-in U-Net that picks the full or the shallow graph per step.

Per call: normalise the arguments (`capture.CallBinder`), decide where the call falls in the
current generation, look up (or build, once per input signature) the captured, split, fused
and compiled graphs, and run one of them. Full steps copy the deep feature into a buffer the
runtime owns (one per signature), so the shallow graph always reads the same storage: that is
what makes a captured CUDA graph pair replayable.

Generation boundaries, i.e. where step 0 is:
- planned (`dcfx.enable(pipe)`): the pipeline's scheduler starts a generation at each
  `set_timesteps`; nothing is read from the device per step;
- explicit (`begin(num_steps)`): calls are counted, nothing is read from the device;
- automatic (neither): the timestep's value is read on the host (a device-to-host sync per
  call when it is a CUDA tensor). A call starts a new generation when its timestep is larger
  than the previous call's, or equal to it right after a repeat (schedulers repeat a
  timestep at most once in a row). A repeat of step 0's timestep at step 1 is ambiguous (a
  PNDM/Heun img2img start, or a new one-step generation): that call runs full, which is right
  either way, and counts as step 1.
A shallow step runs the full graph instead when no cache of the same signature from the same
generation exists, so a cache is never used across generations or input signatures.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import nn

from .capture import Call, CallBinder, Capture, capture
from .compile import LazyGraph
from .config import DeepCacheConfig
from .passes import deepcache_graphs, pass_options
from .passes.split import CACHED_OUTPUTS
from .schedule import StepSchedule

# Captures and split graphs depend only on the U-Net, the call signature and the branch, so
# wrappers of the same U-Net (e.g. one per branch while choosing one) share them.
_SHARED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()

_HISTORY_LENGTH = 16


@dataclass
class _Entry:
    """Everything for one input signature: graphs and the cache buffer."""

    capture: Capture
    full: LazyGraph
    shallow: LazyGraph
    # The full graph's last `num_cached` outputs (the feature, then e.g. its statistics),
    # copied into these buffers on full steps and passed in order to the shallow graph.
    num_cached: int = 1
    cache: list[torch.Tensor] | None = None
    cache_generation: int = -1


@dataclass
class _Generation:
    index: int = 0
    step: int = 0  # calls made so far in this generation
    num_steps: int | None = None  # explicit mode: its length (None: until the next begin)
    explicit: bool = False
    planned: bool = False  # started by a pipeline's scheduler (dcfx.enable)
    checked: bool = False  # the U-Net's fingerprint was checked in this generation
    last_t: float | None = None
    last_was_repeat: bool = False
    log: list[str] = field(default_factory=list)


class DeepCacheUNet(nn.Module):
    """A U-Net that runs DeepCache; build it with `dcfx.optimize`.

    Call it exactly like the wrapped U-Net (same arguments, same return type). Attributes it
    does not define (`config`, `dtype`, `device`, `conv_in`, ...) are the wrapped U-Net's. The wrapped U-Net is `self.unet`; it is not modified and stays usable.
    """

    def __init__(self, unet: nn.Module, config: DeepCacheConfig):
        super().__init__()
        self.unet = unet
        self._dc_config = config
        self._schedule = StepSchedule(config)
        self._binder = CallBinder(unet)
        self._entries: dict[tuple, _Entry] = {}
        self._fingerprint: tuple | None = None
        self._gen = _Generation(index=0)
        self._history: collections.deque[str] = collections.deque(maxlen=_HISTORY_LENGTH)
        self._plan_valid: Callable[[], bool] = lambda: False

    # -- public -------------------------------------------------------------------------

    @property
    def deepcache_config(self) -> DeepCacheConfig:
        """The `DeepCacheConfig` this module runs with (`.config` is the U-Net's)."""
        return self._dc_config

    def begin(self, num_steps: int | None = None) -> None:
        """Start a new generation now: the next call is step 0 and is full.

        With `num_steps`, that many calls form the generation (the non-uniform schedule needs
        it); the call after them starts a new generation again. Without, the generation lasts
        until the next `begin`. Either way no timestep is read on the host: this is the
        sync-free path, and the one to use while capturing CUDA graphs.
        """
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be None or an integer >= 1, got {num_steps!r}")
        if num_steps is None and self._schedule.needs_num_steps:
            raise ValueError("schedule='nonuniform' needs begin(num_steps), the generation's number of U-Net calls")
        self._start_generation(explicit=True, num_steps=num_steps)

    def is_full_step(self, step: int, num_steps: int | None = None) -> bool:
        """Whether step `step` of a generation runs the full graph under this schedule."""
        return self._schedule.is_full(step, num_steps)

    def full_steps(self, num_steps: int) -> tuple[int, ...]:
        """The full steps of a generation of `num_steps` calls (e.g. to replay CUDA graphs)."""
        return self._schedule.full_steps(num_steps)

    @property
    def history(self) -> tuple[str, ...]:
        """The last generations' steps as strings, 'F' full and 'S' shallow, oldest first."""
        current = "".join(self._gen.log)
        return tuple(self._history) + ((current,) if current else ())

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds spent in the first (compiling) call of each compiled graph, by name."""
        out = {}
        for i, entry in enumerate(self._entries.values()):
            for graph in (entry.full, entry.shallow):
                if graph.compile_seconds is not None:
                    out[f"{graph.name}[{i}]"] = graph.compile_seconds
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = self._binder.bind(args, kwargs)
        force_full = self._advance(call)
        gen = self._gen
        if not gen.checked:
            self._check_fingerprint()
            gen.checked = True
        entry = self._entry(call)
        full = force_full or entry.cache_generation != gen.index or self._schedule.is_full(gen.step, gen.num_steps)
        if full:
            outputs = entry.full(*call.tensors)
            outputs, cached = outputs[: -entry.num_cached], outputs[-entry.num_cached :]
            # Same storage every time, so a captured shallow step reads these buffers. Detached:
            # a cache must not keep a full step's autograd graph alive.
            with torch.no_grad():
                if entry.cache is None:
                    # Normal tensors even under inference_mode, so later calls outside it
                    # may still write them.
                    with torch.inference_mode(False):
                        entry.cache = [torch.empty_like(t) for t in cached]
                for buffer, t in zip(entry.cache, cached):
                    buffer.copy_(t)
            entry.cache_generation = gen.index
        else:
            outputs = entry.shallow(*call.tensors, *entry.cache)
        gen.step += 1
        gen.log.append("F" if full else "S")
        result = pytree.tree_unflatten(list(outputs), entry.capture.out_spec)
        if not call.return_dict and hasattr(result, "to_tuple"):
            result = result.to_tuple()
        return result

    def extra_repr(self) -> str:
        c = self._dc_config
        return f"interval={c.interval}, branch={c.branch}, schedule={c.schedule!r}, compile={c.compile}"

    # -- generations --------------------------------------------------------------------

    def _start_generation(self, explicit: bool, num_steps: int | None = None, planned: bool = False) -> None:
        if self._gen.log:
            self._history.append("".join(self._gen.log))
        self._gen = _Generation(index=self._gen.index + 1, num_steps=num_steps, explicit=explicit, planned=planned)

    def _plan(self, num_steps: int, valid: Callable[[], bool]) -> None:
        """Start a generation of `num_steps` calls announced by a scheduler (`dcfx.enable`).

        It ends at the next plan, after `num_steps` calls, or when `valid()` turns false (the
        pipeline's scheduler or U-Net was replaced); then automatic boundaries take over. A
        plan made before the generation's first call only corrects the step count.
        """
        self._plan_valid = valid
        if self._awaits_planned_start():
            self._gen.num_steps = num_steps
        else:
            self._start_generation(explicit=True, num_steps=num_steps, planned=True)

    def _awaits_planned_start(self) -> bool:
        """A scheduler planned a generation whose first call has not come yet."""
        return self._gen.planned and self._gen.step == 0

    def _advance(self, call: Call) -> bool:
        """Move to this call's place in the generations; True if it must run full anyway."""
        gen = self._gen
        if gen.explicit:
            within = gen.num_steps is None or gen.step < gen.num_steps
            if within and (not gen.planned or self._plan_valid()):
                return False
            # The explicit generation is over, or its planner is gone: read timesteps again.
            self._start_generation(explicit=False)
            gen = self._gen
        t = self._host_timestep(call)
        force_full = False
        if gen.step == 0:
            new = False  # already at step 0 (first call, or the explicit generation ended)
        elif t > gen.last_t:
            new = True
        elif t == gen.last_t and gen.last_was_repeat:
            new = True
        elif t == gen.last_t and gen.step == 1:
            # A scheduler's repeat (PNDM/Heun/KDPM2 img2img can start on one) or a new
            # one-step generation at the same timestep: running it full is right for both.
            new, force_full = False, True
        else:
            new = False
        if new:
            self._start_generation(explicit=False)
            gen = self._gen
        gen.last_was_repeat = gen.step > 0 and t == gen.last_t
        gen.last_t = t
        self._require_num_steps_known()
        return force_full

    def _require_num_steps_known(self) -> None:
        if self._schedule.needs_num_steps and self._gen.num_steps is None:
            raise RuntimeError(
                "schedule='nonuniform' needs the number of steps of each generation: use "
                "dcfx.enable(pipe, ...) with a pipeline, or call unet.begin(num_steps) before "
                "each generation; or choose schedule='uniform' or an explicit list"
            )

    @staticmethod
    def _host_timestep(call: Call) -> float:
        t = call.timestep
        if isinstance(t, torch.Tensor):
            if t.numel() == 0:
                raise ValueError("timestep is an empty tensor")
            # The device-to-host sync of the automatic path; begin()/enable() avoid it.
            return float(t.reshape(-1)[0].item())
        if t is None:
            raise ValueError("DeepCacheUNet needs the timestep argument to find generation boundaries")
        return float(t)

    # -- graphs -------------------------------------------------------------------------

    def _entry(self, call: Call) -> _Entry:
        entry = self._entries.get(call.key)
        if entry is None:
            entry = self._entries[call.key] = self._build(call)
        return entry

    def _build(self, call: Call) -> _Entry:
        # Shared by all wrappers of this U-Net: the capture per signature, the split (and
        # fused) graphs per signature and branch. Compiled callables stay per wrapper.
        shared = _SHARED.setdefault(self.unet, {})
        key = (self._fingerprint, call.key, None)
        cap = shared.get(key)
        if cap is None:
            cap = shared[key] = capture(self.unet, call)
        options = pass_options(self._dc_config)
        graphs_key = (self._fingerprint, call.key, options)
        graphs = shared.get(graphs_key)
        if graphs is None:
            graphs = shared[graphs_key] = deepcache_graphs(cap.graph_module, *options)
        full, shallow = graphs
        return _Entry(
            cap, LazyGraph(full, self._dc_config, "full"), LazyGraph(shallow, self._dc_config, "shallow"),
            num_cached=full.meta.get(CACHED_OUTPUTS, 1),
        )

    def _check_fingerprint(self, state: bool = True) -> None:
        # A U-Net whose parameters were moved, cast, replaced or added (.to(), LoRA layers),
        # or, checked once per generation, whose module state changed (FreeU factors,
        # attention processors, adapter flags) since the graphs were captured is recaptured.
        params = _param_fingerprint(self.unet)
        if state or self._fingerprint is None:
            digest = _state_digest(self.unet)
        else:
            digest = self._fingerprint[1]
        fp = (params, digest)
        if fp != self._fingerprint:
            self._entries.clear()
            stale = _SHARED.get(self.unet)
            if stale:
                for k in [k for k in stale if k[0] != fp]:
                    del stale[k]
            self._fingerprint = fp

    def _apply(self, fn, recurse=True):
        # .to(), .half(), ...: graphs bake in dtypes and devices, so a real change recaptures;
        # a no-op move (CPU offload hooks call .to() before every forward) keeps everything.
        result = super()._apply(fn, recurse)
        if self._fingerprint is not None:
            self._check_fingerprint(state=False)
        return result

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "unet" not in modules or name.startswith("_dc"):
                raise
            return getattr(modules["unet"], name)


def _param_fingerprint(module: nn.Module) -> tuple:
    # Not data pointers: graphs read the parameters through the same Parameter objects, so
    # weights moved away and back (CPU offload) need no new capture; a device change does.
    return (module.training,) + tuple(
        (name, id(t), t.dtype, t.device, tuple(t.shape))
        for name, t in (*module.named_parameters(), *module.named_buffers())
    )


_SCALARS = (bool, int, float, str, type(None))
# nn.Module bookkeeping that the parameter fingerprint or nothing at all depends on.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _state_digest(module: nn.Module) -> tuple:
    """The non-tensor state of every submodule a capture may have baked in."""
    out = []
    for name, m in module.named_modules():
        for key, value in m.__dict__.items():
            if key in _MODULE_INTERNALS:
                continue
            if isinstance(value, _SCALARS):
                out.append((name, key, value))
            elif isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value):
                out.append((name, key, tuple(value)))
            elif isinstance(value, dict) and all(isinstance(v, _SCALARS) for v in value.values()):
                out.append((name, key, tuple(sorted(value.items(), key=repr))))
            elif not isinstance(value, (torch.Tensor, nn.Module, dict, list, tuple)):
                out.append((name, key, id(value)))  # e.g. an attention processor object
    return tuple(out)
