"""Early exit on ONNX Runtime: run a directory written by ``python -m dynsila.export`` with numpy only.

``OnnxEarlyExitRunner(DIR)`` reads ``manifest.json`` and opens one ONNX Runtime session per stage graph and per exit
graph. A batch goes through stage by stage; after each exit the samples whose confidence reaches that exit's
threshold are finalised and dropped from the stage state (every state tensor is indexed), exactly as
``dynsila.runner.EarlyExitRunner`` does in PyTorch, lazily too: a stage exported in two graphs runs its second (the
finer scales only later exits read) for the samples that go on only, and a sample is charged the lazy MACs of its
exit (``cost_convention``: "lazy"; "paper", the cumulative count, for exports without split stages). Neither the
model code nor the checkpoint is needed: this module imports numpy and onnxruntime, nothing of torch. Confidences
are computed in float64, as the PyTorch criteria (``dynsila.evaluate.CONFIDENCE``) are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:  # inside the dynsila package (which imports torch); a copy of this file alone raises ValueError
    from dynsila.errors import DynsilaError as _DeployError
except ImportError:  # pragma: no cover - exercised by the torch-free test in a subprocess
    _DeployError = ValueError  # type: ignore[misc,assignment]
try:  # the exit policies' rules (numpy alone); without the package only threshold policies run
    from dynsila.policies import rules as _rules
except ImportError:  # pragma: no cover - a copy of this file alone
    _rules = None  # type: ignore[assignment]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dynsila-onnx-1"
DEPLOY_EXTRA = 'pip install -e ".[deploy]"'

Array = np.ndarray
log = logging.getLogger(__name__)


# --- confidence criteria: logits N x C (any float) -> confidence N (float64), higher = more confident ---------


def _softmax(logits: Array) -> Array:
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def max_prob(logits: Array) -> Array:
    return _softmax(logits).max(axis=-1)


def negative_entropy(logits: Array) -> Array:
    z = np.asarray(logits, dtype=np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return (np.exp(log_p) * log_p).sum(axis=-1)


def margin(logits: Array) -> Array:
    p = _softmax(logits)
    if p.shape[-1] < 2:
        return p[..., 0]
    top2 = np.partition(p, p.shape[-1] - 2, axis=-1)[..., -2:]  # the two largest, in ascending order
    return top2[..., 1] - top2[..., 0]


NUMPY_CONFIDENCE: dict[str, Callable[[Array], Array]] = {
    "max_prob": max_prob,
    "entropy": negative_entropy,
    "margin": margin,
}


# --- sessions -------------------------------------------------------------------------------------------------

THREAD_POOLS = ("shared", "session")
OPTIMIZATION_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_UNKNOWN_POOL = -1  # ONNX Runtime's global pools were made outside this module: their size is unknown
_global_pool: list[int | None] = []  # the intra-op size this process's global pools were made with, once set


@dataclass(frozen=True)
class SessionSettings:
    """How the runner's ONNX Runtime sessions are made.

    A staged export is a dozen small graphs run one after another. With a thread pool per session whose idle
    threads spin (ONNX Runtime's default), the pools fight over the cores (MSDNet b7, 2 cores: the staged runner
    2-5 x slower than the same network as one graph). thread_pool "session" (default): a pool of ``threads``
    per session whose threads sleep when idle instead of spinning. "shared": every session of the process runs
    on ONNX Runtime's global pools, whose threads spin; made once per process by the first runner and never
    resized, and once they exist ONNX Runtime refuses sessions with pools of their own (other code using
    onnxruntime in the process included), so a runner asking for another size or for "session" is refused.
    Measured (docs/early_exit.md): on an idle machine "shared" is the fastest, on a busy one its spinning costs
    far more than it saves; "session" stays the default as it holds up under load and leaves the process free.
    optimization: ONNX Runtime's graph optimisation level (``OPTIMIZATION_LEVELS``). cache_dir: keep each
    graph's optimised form there, keyed by the graph's bytes, the level, the machine and the onnxruntime
    version, and load it with optimisation off next time (a faster start; an optimised graph at "all" may hold
    code for this processor only, hence the machine in the key).
    """

    threads: int | None = None
    thread_pool: str = "session"
    optimization: str = "all"
    cache_dir: Path | str | None = None

    def __post_init__(self) -> None:
        if self.thread_pool not in THREAD_POOLS:
            raise _DeployError(f"unknown thread_pool {self.thread_pool!r}; choose one of {', '.join(THREAD_POOLS)}")
        if self.optimization not in OPTIMIZATION_LEVELS:
            levels = ", ".join(OPTIMIZATION_LEVELS)
            raise _DeployError(f"unknown optimization {self.optimization!r}; choose one of {levels}")
        if self.threads is not None and self.threads < 1:
            raise _DeployError(f"threads must be at least 1 (or None for ONNX Runtime's default), not {self.threads}")

    def pool(self, ort: Any) -> str:
        """The pool the sessions use (``thread_pool``), once it is known ONNX Runtime can give it."""
        if self.thread_pool == "shared" and not _global_pool:
            try:
                ort.capi._pybind_state.set_global_thread_pool_sizes(self.threads or 0, 1)
                _global_pool.append(self.threads)
            except Exception:  # made already, elsewhere in the process
                _global_pool.append(_UNKNOWN_POOL)
        if _global_pool and (self.thread_pool == "session" or _global_pool[0] != self.threads):
            size = "an unknown number of" if _global_pool[0] == _UNKNOWN_POOL else _global_pool[0]
            raise _DeployError(
                f"this process already runs ONNX Runtime on shared thread pools of {size} threads, which cannot "
                f"change: pass thread_pool='shared' with threads={_global_pool[0]}, or use another process"
            )
        return self.thread_pool

    def options(self, ort: Any, pool: str, level: str) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[level])
        if pool == "shared":
            options.use_per_session_threads = False
        else:
            options.inter_op_num_threads = 1
            if self.threads is not None:
                options.intra_op_num_threads = self.threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def open(self, ort: Any, path: Path, pool: str) -> Any:
        """A CPU session on the graph at ``path``, through the cache when there is one."""
        providers = ["CPUExecutionProvider"]
        if self.cache_dir is None:
            return ort.InferenceSession(str(path), self.options(ort, pool, self.optimization), providers=providers)
        graph = path.read_bytes()
        key = f"{self.optimization}|{platform.machine()}|{platform.processor()}|{ort.__version__}".encode()
        cached = Path(self.cache_dir) / f"{path.stem}.{hashlib.sha256(key + graph).hexdigest()[:24]}.onnx"
        if cached.is_file():
            return ort.InferenceSession(str(cached), self.options(ort, pool, "disabled"), providers=providers)
        cached.parent.mkdir(parents=True, exist_ok=True)
        options = self.options(ort, pool, self.optimization)
        partial = cached.with_name(f".{cached.name}.{os.getpid()}")
        options.optimized_model_filepath = str(partial)
        options.log_severity_level = 3  # not the warning that an "all" graph is for this machine: the key says so
        session = ort.InferenceSession(graph, options, providers=providers)
        os.replace(partial, cached)  # whole or absent: a reader never sees half a file
        return session


# --- the runner ---------------------------------------------------------------------------------------------


@dataclass
class OnnxEarlyExitResult:
    predictions: Array  # N, int64 class index
    exit_index: Array  # N, int64 0-based exit each sample left at
    macs: Array  # N, float64 multiply-accumulates spent on each sample, earlier exits included (``cost_convention``)
    confidence: Array  # N, float64 the criterion's value at the exit taken
    logits: Array  # N x C, float32 logits of the exit taken


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise _DeployError(f"running ONNX exports needs onnxruntime: {DEPLOY_EXTRA}") from None
    return onnxruntime


def load_manifest_json(directory: Path) -> tuple[Path, Any]:
    """The path of an export folder's manifest and its parsed JSON, unchecked; one line if absent or not JSON."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise _DeployError(f"{directory} holds no {MANIFEST}; export a run first: python -m dynsila.export RUN_DIR")
    try:
        return path, json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise _DeployError(f"{path} is not JSON ({type(e).__name__}); re-export: python -m dynsila.export") from None


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of an export folder, checked before anything in it is used: it may come from anywhere, so
    every graph it names must be a plain file name of a file inside the folder (no path, no ``..``)."""
    path, manifest = load_manifest_json(directory)
    if isinstance(manifest, dict) and manifest.get("format") == "dynsila-onnx-gated-1":
        raise _DeployError(f"{directory} holds a gated network's export; run it with OnnxGatedRunner")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise _DeployError(f"{path} is not a {MANIFEST_FORMAT} manifest; re-export with python -m dynsila.export")
    problem = _manifest_problem(manifest, Path(directory))
    if problem is not None:
        raise _DeployError(f"{path}: {problem}; re-export with python -m dynsila.export")
    return manifest


def _manifest_problem(manifest: dict[str, Any], directory: Path) -> str | None:
    """What makes a manifest unusable (a missing entry, a graph outside the folder or absent), or None."""
    stages, exits = manifest.get("stages"), manifest.get("exits")
    if not isinstance(manifest.get("criterion"), str) or not isinstance(manifest.get("input"), dict):
        return "its criterion or input entry is missing"
    if not isinstance(manifest["input"].get("name"), str):
        return "its input has no name"
    if not (isinstance(stages, list) and stages and isinstance(exits, list) and exits):
        return "it lists no stages or no exits"
    if not all(isinstance(e, dict) for e in stages + exits):
        return "a stage or exit entry is not a mapping"
    graphs = stages + [s["rest"] for s in stages if "rest" in s] + exits
    for entry in graphs:
        problem = _graph_file_problem(entry, directory)
        if problem is not None:
            return problem
    for k, e in enumerate(exits):
        after = e.get("after_stage")
        if not (isinstance(after, int) and 0 <= after < len(stages)) or "threshold" not in e:
            return f"exit {k + 1} has no threshold or no valid after_stage (0..{len(stages) - 1})"
    settings = manifest.get("onnxruntime", {})
    if not isinstance(settings, dict):
        return "its onnxruntime entry is not a mapping"
    problem = cache_dir_problem(settings.get("cache_dir"))
    return None if problem is None else f"its onnxruntime cache_dir {problem}"


def cache_dir_problem(cache: Any) -> str | None:
    """An ORT cache folder is written to: it must lie below the export folder (relative, no ``..``), never
    elsewhere on the machine. None (no cache) is fine."""
    if cache is None:
        return None
    if not isinstance(cache, str) or not cache or Path(cache).is_absolute() or ".." in Path(cache).parts:
        return f"{cache!r} is not a folder inside the export folder"
    return None


def _graph_file_problem(entry: Any, directory: Path) -> str | None:
    """A graph entry's ``file`` must name a ``.onnx`` file directly inside ``directory`` (the export writes bare
    names): anything with a separator, ``..``, or an absolute path is refused before it is opened."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name.endswith(".onnx"):
        return f"graph entry {name!r} does not name a .onnx file"
    if Path(name).name != name or "\\" in name or name in (".onnx", "..onnx"):
        return f"graph file {name!r} is not a plain file name inside the export folder"
    path = directory / name
    if not path.is_file():
        return f"graph file {name} is missing from {directory}"
    if path.is_symlink() and not path.resolve().is_relative_to(directory.resolve()):
        return f"graph file {name} links outside the export folder"
    if not isinstance(entry.get("opset", 0), int):
        return f"graph file {name} has a non-integer opset {entry.get('opset')!r}"
    return None


def checked_images(x: Any, image: dict[str, Any]) -> Array:
    """``x`` as the graphs' float32 ``N x C x H x W`` input, or one line naming what is wrong with it: integer
    pixels (not yet normalised), channels last, another image size, an empty batch. ``image``: the manifest's
    ``input`` entry (its ``shape`` is C x H x W)."""
    x = np.asarray(x)
    want = tuple(int(d) for d in image.get("shape", ()))
    for check in INPUT_CHECKS:
        problem = check(x, want)
        if problem is not None:
            raise _DeployError(problem)
    return np.ascontiguousarray(x, dtype=np.float32)


def _dtype_problem(x: Array, want: tuple[int, ...]) -> str | None:
    if x.dtype.kind in "biu":
        return (f"the images are {x.dtype} pixels, but the graphs take normalised float32: convert with "
                "x = (pixels / 255 - mean) / std per channel (the manifest's input.mean and input.std)")  # fmt: skip
    if x.dtype.kind != "f":
        return f"the images are {x.dtype}, not numbers; pass float32 N x C x H x W arrays"
    return None


def _rank_problem(x: Array, want: tuple[int, ...]) -> str | None:
    if x.ndim != 4:
        return f"the images have shape {x.shape}; pass a batch N x C x H x W (one image: x[None])"
    if x.shape[0] == 0:
        return "the batch is empty (0 images); pass at least one image"
    return None


def _layout_problem(x: Array, want: tuple[int, ...]) -> str | None:
    if len(want) == 3 and x.shape[1:] != want and x.shape[3] == want[0] and x.shape[1:3] == want[1:]:
        return f"the images are channels last {x.shape} (N x H x W x C); pass N x C x H x W: x.transpose(0, 3, 1, 2)"
    return None


def _size_problem(x: Array, want: tuple[int, ...]) -> str | None:
    if len(want) == 3 and x.shape[1:] != want:
        shown = " x ".join(map(str, want))
        return f"the images have shape {x.shape}, but the export takes N x {shown}; resize them to that size"
    return None


INPUT_CHECKS = (_dtype_problem, _rank_problem, _layout_problem, _size_problem)


def _thresholds(values: list[Any]) -> list[float]:
    """Thresholds as floats: numbers or infinities (the manifest writes them as "inf" / "-inf"), never NaN."""
    try:
        chosen = [float(t) for t in values]
    except (TypeError, ValueError):
        raise _DeployError(f"thresholds {values!r} are not all numbers; pass one number per exit") from None
    if any(t != t for t in chosen):
        raise _DeployError("a threshold is NaN; pass one number (or +-inf) per exit")
    return chosen


class _Graph:
    """One ONNX Runtime session and the tensor names it reads and writes."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]

    def __call__(self, state: dict[str, Array]) -> dict[str, Array]:
        results = self.session.run(self.outputs, {name: state[name] for name in self.inputs})
        return dict(zip(self.outputs, results, strict=True))


@dataclass
class _Stage:
    """One stage of the exported network. A stage written whole is one graph; a stage written in two (lazy
    evaluation) is the exits' path (``graph``, whose outputs split into ``exit_outputs`` and
    ``pending_outputs``) and ``rest``, run only for the samples that go on. ``exits``: the exits after it."""

    graph: _Graph
    rest: _Graph | None
    exit_outputs: list[str] | None
    pending_outputs: list[str] | None
    exits: list[int]

    def run(self, state: dict[str, Array]) -> tuple[dict[str, Array], dict[str, Array]]:
        """(what the exits read, what goes on): the same dict for a whole stage."""
        out = self.graph(state)
        if self.exit_outputs is None or self.pending_outputs is None:
            return out, out
        return {n: out[n] for n in self.exit_outputs}, {n: out[n] for n in self.pending_outputs}

    def complete(self, pending: dict[str, Array]) -> dict[str, Array]:
        return pending if self.rest is None else self.rest(pending)


class OnnxEarlyExitRunner:
    """Stage-by-stage inference on ONNX Runtime (CPU) with batch compaction.

    directory: what ``python -m dynsila.export`` wrote (``manifest.json`` and the ``.onnx`` graphs).
    thresholds: one per exit on the criterion's scale (default: the manifest's, fitted on the run's validation
    split; the last is ignored, every remaining sample exits there). criterion: default the manifest's; another
    one needs its own thresholds. threads: ONNX Runtime intra-op threads (None: its default, one per core).
    thread_pool, optimization, cache_dir: how the sessions are made (``SessionSettings``); None: the manifest's
    ``onnxruntime`` entry (``python -m dynsila.export --ort-*``), else the defaults, measured fastest
    (benchmarks/results/onnx_speed.md); a relative cache_dir is inside ``directory``.
    policy: a fitted exit policy's spec (default: the manifest's ``policy``); a quota spec runs as thresholds,
    any other exit by exit by its rule (``dynsila.policies.rules``), its per-sample state compacted with the
    batch, exactly as ``EarlyExitRunner`` does.
    """

    def __init__(
        self,
        directory: Path | str,
        thresholds: Sequence[float] | None = None,
        criterion: str | None = None,
        threads: int | None = None,
        thread_pool: str | None = None,
        optimization: str | None = None,
        cache_dir: Path | str | None = None,
        policy: dict[str, Any] | None = None,
    ) -> None:
        ort = _import_onnxruntime()
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        spec = policy if policy is not None else self.manifest.get("policy")
        self.rule = _policy_rule(spec)
        if thresholds is None and isinstance(spec, dict) and "thresholds" in spec:  # a spec's own thresholds
            thresholds, criterion = list(spec["thresholds"]), criterion or spec.get("criterion", "max_prob")
        criterion = criterion or self.manifest["criterion"]
        if criterion not in NUMPY_CONFIDENCE:
            raise _DeployError(f"unknown criterion {criterion!r}; choose one of {sorted(NUMPY_CONFIDENCE)}")
        if criterion != self.manifest["criterion"] and thresholds is None:
            raise _DeployError(f"the manifest's thresholds are for {self.manifest['criterion']}; pass thresholds")
        exits = self.manifest["exits"]
        # float(): the manifest writes infinities as "inf" / "-inf" (strict JSON has none)
        chosen = _thresholds([e["threshold"] for e in exits] if thresholds is None else list(thresholds))
        if len(chosen) != len(exits):
            raise _DeployError(f"{len(chosen)} thresholds for an export with {len(exits)} exits")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise _DeployError(f"threads={threads!r}: give a whole number >= 1, or None for ONNX Runtime's default")
        self.thresholds = np.asarray(chosen, dtype=np.float64)
        self.confidence = NUMPY_CONFIDENCE[criterion]
        stage_entries = self.manifest["stages"]
        lazy = any("rest" in st for st in stage_entries) and all("macs_lazy" in e for e in exits)
        self.cost_convention = "lazy" if lazy else "paper"  # what ``macs`` in the results counts
        self.costs = np.asarray([e["macs_lazy" if lazy else "macs_cumulative"] for e in exits], dtype=np.float64)
        self.exit_after = [int(e["after_stage"]) for e in exits]
        chosen_ort = self.manifest.get("onnxruntime", {})
        cache = cache_dir if cache_dir is not None else chosen_ort.get("cache_dir")
        self.sessions = SessionSettings(
            threads,
            thread_pool or chosen_ort.get("thread_pool", SessionSettings.thread_pool),
            optimization or chosen_ort.get("optimization", SessionSettings.optimization),
            None if cache is None else self.directory / cache,
        )
        self.thread_pool = self.sessions.pool(ort)

        def open_graph(entry: dict[str, Any]) -> _Graph:
            try:  # a plain name of a file inside, checked by read_manifest
                return _Graph(self.sessions.open(ort, self.directory / entry["file"], self.thread_pool))
            except Exception as e:  # onnxruntime's own exception types: an unsupported opset, a damaged graph
                detail = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
                raise _DeployError(
                    f"onnxruntime {ort.__version__} cannot load {entry['file']} ({detail}); re-export the run with "
                    "python -m dynsila.export, or install an onnxruntime that supports its opset"
                ) from None

        self.stages = [
            _Stage(
                graph=open_graph(entry),
                rest=open_graph(entry["rest"]) if "rest" in entry else None,
                exit_outputs=entry.get("exit_outputs"),
                pending_outputs=entry.get("pending_outputs"),
                exits=[k for k, after in enumerate(self.exit_after) if after == i],
            )
            for i, entry in enumerate(stage_entries)
        ]
        self.exits = [open_graph(e) for e in exits]
        self.input_name = self.manifest["input"]["name"]

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def __call__(self, x: Array) -> OnnxEarlyExitResult:
        """One batch ``N x C x H x W`` (normalised as the manifest's ``input`` says): after each exit the samples
        that leave are dropped and the rest go on. Lowest latency; later stages run on ever smaller batches."""
        x = checked_images(x, self.manifest["input"])
        finished = _Finished()
        group: _Group | None = _Group({self.input_name: x}, np.arange(x.shape[0]), self._start(x.shape[0]))
        for stage in self.stages:
            if group is None:
                break
            group = self._advance(stage, group, finished)
        return finished.result(x.shape[0], self.costs)

    def run_stream(self, batches: Iterable[Array], group_size: int | None = None) -> OnnxEarlyExitResult:
        """Many batches: the samples that go on past an exit wait until ``group_size`` of them (default: the
        first batch's size) are ready for the next stage, so every stage runs on full-size groups. Same
        decisions as ``__call__``; results in input order."""
        pending: list[list[_Group]] = [[] for _ in self.stages]  # groups waiting to enter each stage
        finished = _Finished()
        seen = 0
        for x in batches:
            group_size = group_size or x.shape[0]
            x = checked_images(x, self.manifest["input"])
            state = {self.input_name: x}
            pending[0].append(_Group(state, np.arange(seen, seen + x.shape[0]), self._start(x.shape[0])))
            seen += x.shape[0]
            self._drain(pending, finished, group_size)
        self._drain(pending, finished, 1)
        return finished.result(seen, self.costs)

    def all_exit_logits(self, x: Array) -> Array:
        """Every exit's logits for every sample, ``N x K x C`` (no early exit: the anytime outputs)."""
        state = {self.input_name: checked_images(x, self.manifest["input"])}
        logits: list[Array] = []
        for stage in self.stages:
            exit_state, state = stage.run(state)
            for k in stage.exits:
                logits.append(self._exit_logits(k, exit_state))
            state = stage.complete(state)
        return np.stack(logits, axis=1)

    def _start(self, n: int) -> dict[str, Array]:
        return {} if self.rule is None else self.rule.start(n)

    def _decide(self, k: int, logits: Array, memo: dict[str, Array]) -> tuple[Array, Array, Array, dict[str, Array]]:
        """Confidence, prediction and who leaves at exit ``k``, and the policy's new state."""
        if self.rule is None:
            conf = self.confidence(logits)
            last = k == self.num_exits - 1
            leaving = np.ones(len(conf), dtype=bool) if last else conf >= self.thresholds[k]
            return conf, logits.argmax(axis=1), leaving, memo
        step = self.rule.score(k, logits, memo)
        return step.score, step.prediction, self.rule.leave(k, step.score), step.state

    def _exit_logits(self, k: int, state: dict[str, Array]) -> Array:
        (logits,) = self.exits[k](state).values()
        return logits

    def _drain(self, pending: list[list[_Group]], finished: _Finished, group_size: int) -> None:
        for stage_index, waiting in enumerate(pending):
            if not waiting or sum(len(g) for g in waiting) < group_size:
                continue
            group = _Group.concatenate(waiting)
            waiting.clear()
            survivors = self._advance(self.stages[stage_index], group, finished)
            if survivors is not None:
                pending[stage_index + 1].append(survivors)

    def _advance(self, stage: _Stage, group: _Group, finished: _Finished) -> _Group | None:
        """Run one stage and the exits after it on ``group``; record who leaves; return the rest (or None)."""
        exit_state, state = stage.run(group.state)
        positions, memo = group.positions, group.memo
        exits = stage.exits
        for n, k in enumerate(exits):
            logits = self._exit_logits(k, exit_state)
            conf, prediction, leaving, memo = self._decide(k, logits, memo)
            finished.add(positions[leaving], logits[leaving], k, conf[leaving], prediction[leaving])
            if leaving.all():
                return None
            if leaving.any():
                staying = ~leaving
                positions = positions[staying]
                whole = exit_state is state
                state = {name: t[staying] for name, t in state.items()}
                memo = {name: t[staying] for name, t in memo.items()}
                if whole:
                    exit_state = state
                elif n < len(exits) - 1:  # another exit after this stage reads the exit path
                    exit_state = {name: t[staying] for name, t in exit_state.items()}
        return _Group(stage.complete(state), positions, memo)


def _policy_rule(spec: Any) -> Any:
    """The rule of a policy spec, or None for thresholds (no spec, or a quota spec); one line for one that cannot
    run here."""
    if spec is None or (isinstance(spec, dict) and spec.get("rule") == "quotas"):
        return None
    name = spec.get("policy") if isinstance(spec, dict) else spec
    if _rules is None:
        raise _DeployError(f"exit policy {name!r} needs dynsila.policies (pip install dynsila) or a quota export")
    try:
        return _rules.make_rule(spec)
    except ValueError as e:
        raise _DeployError(str(e)) from None


@dataclass
class _Group:
    """Samples travelling together: their stage state (tensor name -> array) and input positions."""

    state: dict[str, Array]
    positions: Array
    memo: dict[str, Array]  # the exit policy's per-sample state (empty for thresholds)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @staticmethod
    def concatenate(groups: list[_Group]) -> _Group:
        if len(groups) == 1:
            return groups[0]
        state = {name: np.concatenate([g.state[name] for g in groups]) for name in groups[0].state}
        memo = {name: np.concatenate([g.memo[name] for g in groups]) for name in groups[0].memo}
        return _Group(state, np.concatenate([g.positions for g in groups]), memo)


class _Finished:
    """Decisions collected as samples leave, assembled in input order at the end."""

    def __init__(self) -> None:
        self.chunks: list[tuple[Array, Array, int, Array, Array]] = []

    def add(self, positions: Array, logits: Array, exit_k: int, confidence: Array, prediction: Array) -> None:
        if positions.size:
            self.chunks.append((positions, logits, exit_k, confidence, prediction))

    def result(self, n: int, costs: Array) -> OnnxEarlyExitResult:
        num_classes = self.chunks[0][1].shape[1] if self.chunks else 0
        logits = np.empty((n, num_classes), dtype=np.float32)
        exit_index = np.empty(n, dtype=np.int64)
        confidence = np.empty(n, dtype=np.float64)
        predictions = np.empty(n, dtype=np.int64)
        for positions, chunk_logits, k, conf, chunk_predictions in self.chunks:
            logits[positions] = chunk_logits
            exit_index[positions] = k
            confidence[positions] = conf
            predictions[positions] = chunk_predictions
        return OnnxEarlyExitResult(predictions, exit_index, costs[exit_index], confidence, logits)
