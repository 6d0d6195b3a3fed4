"""Run: `DeepCacheUNet`, the drop-in U-Net that picks the full or the shallow graph per step.

Per call: normalise the arguments (`capture.CallBinder`), decide where the call falls in the
current generation, look up (or build, once per module state and input signature) the
captured, split, fused and compiled graphs, and run one of them. Full steps copy the deep
feature into buffers the runtime owns, so the shallow graph always reads the same storage:
that is what makes a captured CUDA graph pair replayable.

Steps and slots. A step is normally one call. Calls that evaluate the same sample at the same
timestep (classifier-free guidance as separate uncond and cond calls) form one step: they
share the step's full/shallow decision, and the k-th call of a step keeps its own cache (slot
k), as a batched guidance call keeps one per batch element. "The same" is decided without
reading the device: the same sample tensor and the same timestep tensor (same objects, not
modified in place since), or an equal Python/numpy number as the timestep; automatic mode,
which reads the timestep anyway, also accepts an equal sample at an equal timestep value. A
call that repeats an earlier call of its step exactly (same tensors, same other arguments)
starts the next step: re-running a step, e.g. to capture one CUDA graph per step. Schedulers
that repeat a timestep (Heun, KDPM2, PNDM) pass a new sample, so each of their calls is a step.

Generation boundaries, i.e. where step 0 is:
- planned (`dcfx.enable(pipe)`): the pipeline's scheduler starts a generation at each
  `set_timesteps`; nothing is read from the device per step;
- explicit (`begin(num_steps)`): steps are counted, nothing is read from the device;
- automatic (neither): the timestep's value is read on the host (a device-to-host sync per
  step when it is a CUDA tensor). A step starts a new generation when its timestep is larger
  than the previous step's, or equal to it right after a repeat (schedulers repeat a
  timestep at most once in a row). A repeat of step 0's timestep at step 1 is ambiguous (a
  PNDM/Heun img2img start, or a new one-step generation): that step runs full, which is right
  either way, and counts as step 1.
A call runs the full graph instead of the shallow one when its slot has no cache of the same
module state and signature from the same generation, so a cache is never used across
generations, input signatures or calls of a step.

State. Captures and graphs are kept per module state (parameters, their dtypes and devices,
module attributes): moving the U-Net away and back reuses them and their cache buffers. They
are dropped when parameters are replaced (the old graphs hold the old weights), and beyond
`_MAX_STATES` states, least recently used first. Generations and cache buffers are per
thread, so threads may share one `DeepCacheUNet`; tracing holds `compile.TRACING` alone.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import numbers
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn

from . import compile as _compile
from .capture import Call, CallBinder, capture, describe_signature
from .compile import TRACING, Compiler, LazyGraph
from .config import DeepCacheConfig
from .inspection import DeepCacheGraphs
from .passes import deepcache_graphs, pass_options
from .passes.split import CACHED_OUTPUTS
from .schedule import StepSchedule

# Captures and split graphs depend only on the U-Net, its state, the call signature and the
# branch, so wrappers of the same U-Net (e.g. one per branch while choosing one) share them.
_SHARED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()

_HISTORY_LENGTH = 16
# Calls of one step that get a cache of their own; further ones run full (bounds memory when
# one sample is evaluated under many conditionings).
_MAX_SLOTS = 32
# Module states whose graphs and cache buffers are kept (dtype/device moves, FreeU on/off, ...).
_MAX_STATES = 8


@dataclass
class _Cache:
    """One slot's buffers: the full graph's cached outputs, and the generation that wrote them."""

    buffers: list[torch.Tensor]
    generation: int


class _Fixed:
    """A graph that runs as given (an AOT-compiled one): never captured nor compiled again."""

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name
        self.compile_seconds = None

    def __call__(self, compiler: Compiler | None, *args: torch.Tensor) -> tuple:
        with TRACING.shared():
            return tuple(self.fn(*args))


@dataclass(eq=False)
class _Entry:
    """One input signature in one module state: graphs, and cache buffers per thread and slot."""

    out_spec: pytree.TreeSpec
    full: LazyGraph | _Fixed
    shallow: LazyGraph | _Fixed
    # The full graph's last `num_cached` outputs (the feature, then e.g. its statistics),
    # copied into a slot's buffers on full steps and passed in order to the shallow graph.
    num_cached: int = 1
    branch: int = 0
    cuda: bool = False  # the signature pins the device: NVTX ranges or not, decided once
    caches: weakref.WeakKeyDictionary[threading.Thread, list[_Cache | None]] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def __post_init__(self) -> None:
        # Profiler (and NVTX) range names: which graph ran, at which branch.
        self.full_range = f"dcfx.full[b{self.branch}]"
        self.shallow_range = f"dcfx.shallow[b{self.branch}]"

    @property
    def cache(self) -> list[torch.Tensor] | None:
        """The calling thread's buffers of slot 0 (None before its first full step)."""
        slots = self.caches.get(threading.current_thread())
        return slots[0].buffers if slots and slots[0] is not None else None


@dataclass
class _Step:
    """The current step: what its first call passed, and each of its calls' arguments."""

    index: int
    full: bool  # the step's decision (a slot without a cache runs full anyway)
    timestep: Any  # as passed
    timestep_version: int | None
    sample: Any
    sample_version: int | None
    calls: list[tuple] = field(default_factory=list)  # per call: `_arguments` of it


@dataclass
class _Generation:
    index: int = 0
    steps: int = 0  # steps started so far in this generation
    step: _Step | None = None
    num_steps: int | None = None  # explicit mode: its length in steps (None: until the next begin)
    explicit: bool = False
    planned: bool = False  # started by a pipeline's scheduler (dcfx.enable)
    checked: bool = False  # the U-Net's fingerprint was checked in this generation
    last_t: float | None = None  # automatic mode: the current step's timestep value
    last_was_repeat: bool = False
    log: list[str] = field(default_factory=list)


def _no_plan() -> bool:
    return False


@dataclass
class _ThreadState:
    """One thread's generations (each thread runs its own)."""

    gen: _Generation = field(default_factory=_Generation)
    history: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=_HISTORY_LENGTH))
    plan_valid: Callable[[], bool] = _no_plan


class DeepCacheUNet(nn.Module):
    """A U-Net that runs DeepCache; build it with `dcfx.optimize`.

    Call it exactly like the wrapped U-Net (same arguments, same return type). Attributes it
    does not define (`config`, `dtype`, `device`, `conv_in`, ...) are the wrapped U-Net's. The
    wrapped U-Net is `self.unet`; it is not modified and stays usable. Generations (`begin`,
    `history`) and caches are per thread. Pickles (and `copy.deepcopy`, `torch.save`) as its
    U-Net and config: graphs are rebuilt at the first call, generations start afresh.

    Compiling: `compile=True` in the config, `fast.compile(...)`, `torch.compile(fast, ...)`, or
    a U-Net compiled before `optimize` all compile the full and the shallow graph with those
    torch.compile settings (whole graphs, static shapes, once per input signature); the
    per-step bookkeeping stays in Python, outside any compiled region.
    """

    # torch.compile of this module (or of a model around it) must not trace the per-step host
    # logic: that would graph-break at every call and recompile per step and per signature.
    # Instead the call runs here, and the graphs are compiled with the wrapper's settings.
    __call__ = torch.compiler.disable(nn.Module.__call__)

    def __init__(self, unet: nn.Module, config: DeepCacheConfig, compiler: Compiler | None = None):
        super().__init__()
        self.unet = unet
        self._dc_config = config
        self._compiler = compiler if compiler is not None else _compile.from_config(config)
        self._outer: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
        self._preloaded: tuple[tuple, str, _Entry] | None = None
        self._schedule = StepSchedule(config)
        self._binder = CallBinder(unet)
        self._sample_name = next(iter(inspect.signature(unet.forward).parameters), None)
        # fingerprint -> {signature key -> _Entry}, least recently used first.
        self._states: collections.OrderedDict[tuple, dict[tuple, _Entry]] = collections.OrderedDict()
        self._fingerprint: tuple | None = None
        self._threads: weakref.WeakKeyDictionary[threading.Thread, _ThreadState] = weakref.WeakKeyDictionary()
        # A loaded AOT package's stand-in U-Net (dcfx.package) brings its compiled graphs, also
        # when re-wrapped (`dcfx.enable(pipe)`, `dcfx.optimize(loaded, ...)`).
        preload = getattr(unet, "_dcfx_preload", None)
        if preload is not None:
            preload(self)

    def __reduce_ex__(self, protocol: int) -> tuple:
        # Graphs, caches and generations are derived state, rebuilt lazily after loading.
        if self._preloaded is not None:
            raise TypeError("a DeepCacheUNet loaded from an AOT package cannot be pickled; load the package again")
        return (type(self), (self.unet, self._dc_config))

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile the full and the shallow graph with these torch.compile settings.

        Takes torch.compile's keyword arguments (`mode=`, `options=`, `backend=`,
        `disable=`); the graphs are always compiled whole (`fullgraph=True`) with static
        shapes, once per input signature, at their first call. Replaces the config's compile
        settings; `torch.compile(fast, ...)` does the same for calls made through it.
        """
        compiler = _compile.from_arguments(args, kwargs, f"{type(self).__name__}.compile()")
        self._compiler = compiler
        if compiler is None or isinstance(compiler.backend, str) and compiler.backend == "inductor":
            self._dc_config = dataclasses.replace(
                self._dc_config,
                compile=compiler is not None,
                compile_mode=compiler.mode if compiler else None,
                compile_options=(compiler.options or {}) if compiler else {},
            )

    # -- public -------------------------------------------------------------------------

    @property
    def given(self) -> nn.Module:
        """The module `dcfx.optimize` was given: `self.unet`, or the torch.compile'd module
        around it (what `dcfx.disable` restores)."""
        return self.__dict__.get("_dc_given", self.unet)

    @property
    def deepcache_config(self) -> DeepCacheConfig:
        """The `DeepCacheConfig` this module runs with (`.config` is the U-Net's)."""
        return self._dc_config

    def begin(self, num_steps: int | None = None) -> None:
        """Start a new generation in the calling thread: its next call is step 0 and is full.

        With `num_steps`, that many steps form the generation (the non-uniform schedule needs
        it); the step after them starts a new generation again. Without, the generation lasts
        until the next `begin`. Either way no timestep is read on the host: this is the
        sync-free path, and the one to use while capturing CUDA graphs.
        """
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be None or an integer >= 1, got {num_steps!r}")
        if num_steps is None and self._schedule.needs_num_steps:
            raise ValueError("schedule='nonuniform' needs begin(num_steps), the generation's number of steps")
        self._start_generation(self._thread(), explicit=True, num_steps=num_steps)

    def is_full_step(self, step: int, num_steps: int | None = None) -> bool:
        """Whether step `step` of a generation runs the full graph under this schedule."""
        return self._schedule.is_full(step, num_steps)

    def full_steps(self, num_steps: int) -> tuple[int, ...]:
        """The full steps of a generation of `num_steps` steps (e.g. to replay CUDA graphs)."""
        return self._schedule.full_steps(num_steps)

    @property
    def history(self) -> tuple[str, ...]:
        """The calling thread's last generations, one 'F' (a full graph ran) or 'S' per step."""
        me = self._thread()
        current = "".join(me.gen.log)
        return tuple(me.history) + ((current,) if current else ())

    def graphs(self, *args: Any, **kwargs: Any) -> DeepCacheGraphs:
        """The full and the shallow graph this module runs for a call with these arguments.

        Call it like the U-Net. It captures (once per input signature, shared with the
        runtime) but runs nothing and leaves generations alone. `.cut` describes where the
        U-Net is cut and what a shallow step runs.
        """
        call = self._binder.bind(args, kwargs)
        self._check_fingerprint()
        entry = self._entry(call)
        if not isinstance(entry.full, LazyGraph):
            raise TypeError("this DeepCacheUNet runs AOT-compiled graphs (a loaded package): it has no FX graphs")
        return DeepCacheGraphs(
            full=entry.full.graph,
            shallow=entry.shallow.graph,
            inputs=call.tensors,
            num_cached=entry.num_cached,
            branch=entry.branch,
            out_spec=entry.out_spec,
            key=call.key,
            signature=describe_signature(call.key),
        )

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds spent in the first (compiling) call of each compiled graph, by name."""
        out = {}
        entries = [e for entries in list(self._states.values()) for e in entries.values()]
        for i, entry in enumerate(entries):
            for graph in (entry.full, entry.shallow):
                if graph.compile_seconds is not None:
                    out[f"{graph.name}[{i}]"] = graph.compile_seconds
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = self._binder.bind(args, kwargs)
        thread = threading.current_thread()
        me = self._thread(thread)
        step, slot = self._advance(me, call, args, kwargs)
        gen = me.gen
        if not gen.checked:
            self._check_fingerprint()
            gen.checked = True
        entry = self._entry(call)
        found, compiler = _compile.outer(self._outer)
        if not found:
            compiler = self._compiler
        slots = entry.caches.get(thread)
        if slots is None:
            slots = entry.caches[thread] = []
        cache = slots[slot] if slot < len(slots) else None
        full = step.full or cache is None or cache.generation != gen.index
        if full:
            with _range(entry.full_range, entry.cuda):
                outputs = entry.full(compiler, *call.tensors)
                outputs, cached = outputs[: -entry.num_cached], outputs[-entry.num_cached :]
                if slot < _MAX_SLOTS:
                    with _range("dcfx.cache_copy", entry.cuda):
                        cache = self._store(slots, slot, cache, cached, gen.index)
        else:
            with _range(entry.shallow_range, entry.cuda):
                outputs = entry.shallow(compiler, *call.tensors, *cache.buffers)
        if slot == 0 or not gen.log:
            # (The step's first call may have failed before logging: capture of a bad call.)
            gen.log.append("F" if full else "S")
        elif full:
            gen.log[-1] = "F"
        result = pytree.tree_unflatten(list(outputs), entry.out_spec)
        if not call.return_dict and hasattr(result, "to_tuple"):
            result = result.to_tuple()
        return result

    @staticmethod
    def _store(slots: list[_Cache | None], slot: int, cache: _Cache | None, cached: tuple, generation: int) -> _Cache:
        # Same storage every time, so a captured shallow step reads these buffers.
        # Detached: a cache must not keep a full step's autograd graph alive.
        with torch.no_grad():
            if cache is None:
                # Normal tensors even under inference_mode, so later calls outside it may
                # still write them.
                with torch.inference_mode(False):
                    cache = _Cache([torch.empty_like(t) for t in cached], generation)
                slots.extend([None] * (slot + 1 - len(slots)))
                slots[slot] = cache
            for buffer, t in zip(cache.buffers, cached):
                buffer.copy_(t)
        cache.generation = generation
        return cache

    def extra_repr(self) -> str:
        c = self._dc_config
        return f"interval={c.interval}, branch={c.branch}, schedule={c.schedule!r}, compile={c.compile}"

    # -- generations --------------------------------------------------------------------

    def _thread(self, thread: threading.Thread | None = None) -> _ThreadState:
        thread = thread or threading.current_thread()
        me = self._threads.get(thread)
        if me is None:
            me = self._threads[thread] = _ThreadState()
        return me

    def _start_generation(self, me: _ThreadState, explicit: bool, num_steps: int | None = None, planned: bool = False) -> None:
        if me.gen.log:
            me.history.append("".join(me.gen.log))
        me.gen = _Generation(index=me.gen.index + 1, num_steps=num_steps, explicit=explicit, planned=planned)

    def _plan(self, num_steps: int, valid: Callable[[], bool]) -> None:
        """Start a generation of `num_steps` steps announced by a scheduler (`dcfx.enable`).

        It ends at the next plan, after `num_steps` steps, or when `valid()` turns false (the
        pipeline's scheduler or U-Net was replaced); then automatic boundaries take over. A
        plan made before the generation's first call only corrects the step count. Like all
        generation state, it belongs to the calling thread (the one running the pipeline).
        """
        me = self._thread()
        me.plan_valid = valid
        if self._awaits_planned_start():
            me.gen.num_steps = num_steps
        else:
            self._start_generation(me, explicit=True, num_steps=num_steps, planned=True)

    def _awaits_planned_start(self) -> bool:
        """A scheduler planned a generation (in this thread) whose first call has not come yet."""
        gen = self._thread().gen
        return gen.planned and gen.step is None

    def _advance(self, me: _ThreadState, call: Call, args: tuple, kwargs: dict) -> tuple[_Step, int]:
        """Place this call: its step (new, or the current one) and its slot in that step."""
        gen = me.gen
        sample = args[0] if args else kwargs.get(self._sample_name)
        arguments = _arguments(call, args, kwargs, sample)
        slot = _slot_in(gen.step, call.timestep, sample, arguments)
        if gen.explicit:
            within = slot is not None or gen.num_steps is None or gen.steps < gen.num_steps
            if within and (not gen.planned or me.plan_valid()):
                if slot is not None:
                    gen.step.calls.append(arguments)
                    return gen.step, slot
                return self._new_step(gen, call.timestep, sample, arguments, force_full=False), 0
            # The explicit generation is over, or its planner is gone: read timesteps again.
            self._start_generation(me, explicit=False)
            gen, slot = me.gen, None
        if slot is not None:
            gen.step.calls.append(arguments)
            return gen.step, slot
        t = self._host_timestep(call)
        if gen.step is not None and t == gen.last_t and _equal_sample(gen.step.sample, sample):
            # The same sample at the same timestep value, under other conditioning.
            slot = _next_slot(gen.step, arguments)
            if slot is not None:
                gen.step.calls.append(arguments)
                return gen.step, slot
        force_full = False
        if gen.step is None:
            new = False  # no step yet (first call, or the explicit generation ended)
        elif t > gen.last_t:
            new = True
        elif t == gen.last_t and gen.last_was_repeat:
            new = True
        elif t == gen.last_t and gen.steps == 1:
            # A scheduler's repeat (PNDM/Heun/KDPM2 img2img can start on one) or a new
            # one-step generation at the same timestep: running it full is right for both.
            new, force_full = False, True
        else:
            new = False
        if new:
            self._start_generation(me, explicit=False)
            gen = me.gen
        gen.last_was_repeat = gen.step is not None and t == gen.last_t
        gen.last_t = t
        self._require_num_steps_known(gen)
        return self._new_step(gen, call.timestep, sample, arguments, force_full), 0

    def _new_step(self, gen: _Generation, timestep: Any, sample: Any, arguments: tuple, force_full: bool) -> _Step:
        full = force_full or self._schedule.is_full(gen.steps, gen.num_steps)
        gen.step = _Step(gen.steps, full, timestep, _version(timestep), sample, _version(sample), [arguments])
        gen.steps += 1
        return gen.step

    def _require_num_steps_known(self, gen: _Generation) -> None:
        if self._schedule.needs_num_steps and gen.num_steps is None:
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

    @property
    def _entries(self) -> dict[tuple, _Entry]:
        """The current module state's entries, by signature key."""
        return self._states.get(self._fingerprint, {})

    def _entry(self, call: Call) -> _Entry:
        if self._preloaded is not None:
            key, signature, entry = self._preloaded
            if call.key != key:
                raise ValueError(
                    f"this DeepCacheUNet runs an AOT package built for one input signature: "
                    f"{signature}; this call has {describe_signature(call.key)}"
                )
            return entry
        fp = self._fingerprint
        entries = self._states.get(fp)
        entry = entries.get(call.key) if entries is not None else None
        if entry is not None:
            return entry
        with TRACING.exclusive():  # one trace at a time, and no graph running meanwhile
            entries = self._states.get(fp)
            if entries is None:
                entries = self._states[fp] = {}
                while len(self._states) > _MAX_STATES:
                    self._drop_state(next(iter(self._states)))
            entry = entries.get(call.key)
            if entry is None:
                entry = entries[call.key] = self._build(call, fp)
        return entry

    def _build(self, call: Call, fp: tuple) -> _Entry:
        # Shared by all wrappers of this U-Net: the capture per state and signature, the split
        # (and fused) graphs per state, signature and branch. Compiled callables stay per wrapper.
        shared = _SHARED.setdefault(self.unet, {})
        key = (fp, call.key, None)
        cap = shared.get(key)
        if cap is None:
            cap = shared[key] = capture(self.unet, call)
        options = pass_options(self._dc_config)
        graphs_key = (fp, call.key, options)
        graphs = shared.get(graphs_key)
        if graphs is None:
            graphs = shared[graphs_key] = deepcache_graphs(cap.graph_module, *options)
        full, shallow = graphs
        return _Entry(
            cap.out_spec, LazyGraph(full, "full"), LazyGraph(shallow, "shallow"),
            num_cached=full.meta.get(CACHED_OUTPUTS, 1), branch=self._dc_config.branch, cuda=_on_cuda(call),
        )

    def _preload(self, graphs: Any, full: Callable, shallow: Callable) -> None:
        """Run `full`/`shallow` (AOT-compiled graphs) for calls with `graphs.key`, and refuse
        every other signature. `graphs` has `key`, `signature`, `out_spec`, `num_cached` (a
        `DeepCacheGraphs` or a package's record of one)."""
        entry = _Entry(
            graphs.out_spec, _Fixed(full, "full"), _Fixed(shallow, "shallow"),
            num_cached=graphs.num_cached, branch=self._dc_config.branch,
            cuda=any(leaf[0] == "T" and torch.device(leaf[3]).type == "cuda" for leaf in graphs.key[1]),
        )
        self._preloaded = (graphs.key, graphs.signature, entry)

    def _drop_state(self, fp: tuple) -> None:
        self._states.pop(fp, None)
        shared = _SHARED.get(self.unet)
        if shared:
            for k in [k for k in shared if k[0] == fp]:
                del shared[k]

    def _check_fingerprint(self, state: bool = True) -> None:
        # The U-Net's parameters (which tensors, their dtypes and devices) and, checked once per
        # generation, its module state (FreeU factors, attention processors, adapter flags)
        # select the graphs. A state seen before (moved away and back) gets its graphs and
        # buffers back; parameters replaced or added (LoRA layers) drop all other states.
        identity, layout = _param_fingerprint(self.unet)
        if state or self._fingerprint is None:
            digest = _state_digest(self.unet)
        else:
            digest = self._fingerprint[2]
        fp = (identity, layout, digest)
        if fp == self._fingerprint:
            return
        if self._fingerprint is not None and identity != self._fingerprint[0]:
            with TRACING.exclusive():
                for old in [k for k in self._states if k[0] != identity]:
                    self._drop_state(old)
                shared = _SHARED.get(self.unet)
                if shared:
                    for k in [k for k in shared if k[0][0] != identity]:
                        del shared[k]
        elif fp in self._states:
            self._states.move_to_end(fp)
        self._fingerprint = fp

    def _apply(self, fn, recurse=True):
        # .to(), .half(), ...: graphs bake in dtypes and devices, so a real change switches to
        # that state's graphs (captured at its first call); a no-op move (CPU offload hooks
        # call .to() before every forward) keeps everything.
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


def _on_cuda(call: Call) -> bool:
    return any(t.is_cuda for t in call.tensors)


def _range(name: str, cuda: bool) -> contextlib.AbstractContextManager:
    """A profiler range (only while a profiler runs) and, on CUDA, an NVTX range, so traces and
    Nsight timelines say which graph each step ran. Otherwise nothing (a shared no-op)."""
    if not cuda and not torch.autograd._profiler_enabled():
        return _NO_RANGE
    return _ranges(name, cuda)


_NO_RANGE = contextlib.nullcontext()


@contextlib.contextmanager
def _ranges(name: str, cuda: bool) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if torch.autograd._profiler_enabled():
            stack.enter_context(torch.profiler.record_function(name))
        if cuda:
            stack.enter_context(torch.cuda.nvtx.range(name))
        yield


# -- steps ----------------------------------------------------------------------------------


def _version(x: Any) -> int | None:
    """A tensor's in-place modification counter (host metadata: no device read)."""
    if not isinstance(x, torch.Tensor):
        return None
    try:
        return x._version
    except RuntimeError:  # inference tensors have none: only their identity counts
        return None


def _same(x: Any, obj: Any, version: int | None) -> bool:
    """`x` is `obj`, unmodified since `version` was read (for tensors), or an equal number."""
    if isinstance(x, torch.Tensor):
        return x is obj and _version(x) == version
    if isinstance(x, numbers.Number) and not isinstance(x, bool) and isinstance(obj, numbers.Number):
        return x == obj
    return False


def _arguments(call: Call, args: tuple, kwargs: dict, sample: Any) -> tuple:
    """What tells a call from an exact repeat: its signature and its tensors other than the
    sample, held weakly (a tensor freed since cannot be passed again)."""
    tensors: list[torch.Tensor] = []
    _collect_tensors((args, kwargs), tensors)
    return call.key, tuple((weakref.ref(x), _version(x)) for x in tensors if x is not sample)


def _collect_tensors(obj: Any, out: list[torch.Tensor]) -> None:
    # Not torch's pytree: this runs per call, and U-Net arguments nest only in dicts and tuples.
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _collect_tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _collect_tensors(x, out)


def _same_arguments(a: tuple, b: tuple) -> bool:
    (key_a, tensors_a), (key_b, tensors_b) = a, b
    if len(tensors_a) != len(tensors_b) or key_a != key_b:
        return False
    return all(ra() is rb() and ra() is not None and va == vb for (ra, va), (rb, vb) in zip(tensors_a, tensors_b))


def _slot_in(step: _Step | None, timestep: Any, sample: Any, arguments: tuple) -> int | None:
    """This call's slot if it joins `step` (the same sample and timestep objects, and not an
    exact repeat of one of the step's calls), else None."""
    if step is None:
        return None
    if not (_same(sample, step.sample, step.sample_version) and _same(timestep, step.timestep, step.timestep_version)):
        return None
    return _next_slot(step, arguments)


def _next_slot(step: _Step, arguments: tuple) -> int | None:
    """The slot of a call evaluating `step`'s sample at its timestep; None for an exact repeat
    of one of the step's calls (a re-run of the step: the next step)."""
    if any(_same_arguments(arguments, earlier) for earlier in step.calls):
        return None
    return len(step.calls)


def _equal_sample(a: Any, b: Any) -> bool:
    """Equal values (automatic mode only: a device read)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return a is b or bool(torch.equal(a, b))


# -- module state ---------------------------------------------------------------------------


def _param_fingerprint(module: nn.Module) -> tuple[tuple, tuple]:
    """(which tensors, their layout): parameters and buffers by name and identity, and the
    training flag, dtypes, devices and shapes.

    Not data pointers: graphs read the parameters through the same Parameter objects, so
    weights moved away and back (CPU offload) reuse that state's graphs.
    """
    tensors = (*module.named_parameters(), *module.named_buffers())
    identity = tuple((name, id(t)) for name, t in tensors)
    layout = (module.training,) + tuple((t.dtype, t.device, tuple(t.shape)) for _, t in tensors)
    return identity, layout


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
