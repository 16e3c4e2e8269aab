"""The desktop GUI's logic without Tk: the modes it offers, form fields -> the mode's CFG (the
same dataclass the scripts parse), model facts for completion, bundled reference folders, and
the worker thread that runs a mode's run function with its own ``Callbacks``.

Nothing here touches a widget: the worker talks to the window only through a queue of tuples,
which the window drains with ``after`` (Tk is not thread-safe).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:   # annotations only: PIL loads with the window
    from PIL import Image

# One lock for all torch work the GUI starts. A model being loaded for completion draws from
# torch's global random generator (the module's initial weights); a run holds the lock so that
# nothing else can draw from it meanwhile, and a GUI run equals a script run with its settings.
TORCH_LOCK = threading.Lock()

BUNDLED_ROOT = "references"        # scripts/build_references.py --out references
MODEL_CHOICES = ("efficientnet-lite0", "efficientnet-lite1", "ViT-B/32", "ViT-B/16", "RN50",
                 "torchvision:resnet50", "torchvision:resnet18?weights=none")
_MESSAGE_CHARS = 600               # longer messages (e.g. every valid layer) are cut
_POSITION_LAYOUTS = ("BCHW", "BND")
_MAX_STEPS = 100_000


class FormError(ValueError):
    """A form field that cannot be used; the message is one plain sentence."""


@dataclass(frozen=True)
class Key:
    """One of a mode's key settings shown in the window (a CFG field and its label)."""
    field: str
    label: str


@dataclass(frozen=True)
class Mode:
    key: str                       # "class", "inner", "arithmetic", "concept"
    title: str                     # shown on the radio button
    cfg_cls: type                  # the CFG dataclass the script parses
    run_fn: Callable               # run_fn(cfg, argv, callbacks) -> (run_dir, result)
    script: str                    # the script that accepts the saved JSON (--json_cfg)
    ref_field: str | None          # the CFG field of the reference folder, if any
    keys: tuple[Key, ...]          # the one or two key settings


def modes() -> dict[str, Mode]:
    """The GUI's modes (imported here, not at import time: they bring torch)."""
    from vital.modes.arithmetic import ArithmeticCFG, run_arithmetic
    from vital.modes.class_mode import ClassCFG, run_class
    from vital.modes.concepts import ConceptCFG, run_concepts
    from vital.modes.inner import InnerCFG, run_inner
    return {m.key: m for m in (
        Mode("class", "class", ClassCFG, run_class, "class_neurons_fvis.py", "ref_dir",
             (Key("class_weight", "class weight"), Key("tv_weight", "TV weight"))),
        Mode("inner", "inner neuron", InnerCFG, run_inner, "inner_neurons_fvis.py", "data_dir",
             (Key("neuron_weight", "neuron weight"), Key("feat_weight", "feature weight"))),
        Mode("arithmetic", "arithmetic", ArithmeticCFG, run_arithmetic,
             "class_neurons_fvis_arithmetic.py", None,
             (Key("sub_alpha", "alpha (sub)"), Key("add_beta", "beta (add)"))),
        Mode("concept", "concept", ConceptCFG, run_concepts, "concept_neurons_fvis.py",
             "ref_dir", (Key("direction_weight", "direction weight"),
                         Key("n_concepts", "concepts"))),
    )}


def default_of(cfg_cls, name: str):
    field = {f.name: f for f in dataclasses.fields(cfg_cls)}[name]
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


# ---------------------------------------------------------------- bundled reference folders

def bundled_choices(mode_key: str, root: str | Path = BUNDLED_ROOT) -> list[str]:
    """Reference folders offered for a mode: one per bundled photo (and, for inner neurons and
    concepts, the whole set, a folder of class folders)."""
    from vital.refs.bundled import PHOTOS
    folders = [str(Path(root) / photo.folder) for photo in PHOTOS]
    return ([str(root)] + folders) if mode_key in ("inner", "concept") else folders


def is_bundled(path: str | Path, root: str | Path = BUNDLED_ROOT) -> bool:
    """Is ``path`` a bundled folder (or a file in one), whether built yet or not?"""
    wanted = {Path(p).resolve() for p in bundled_choices("inner", root)}
    path = Path(path).expanduser().resolve()
    return path in wanted or path.parent in wanted


def ensure_bundled(paths: list[str], root: str | Path = BUNDLED_ROOT) -> bool:
    """Build the bundled folders (photos that ship in installed packages, no download) when a
    path names one of them and it is missing; returns True if they were built."""
    from vital.refs.bundled import build_reference_folders
    missing = [p for p in paths if p and not Path(p).expanduser().exists() and is_bundled(p, root)]
    if missing:
        build_reference_folders(root)
    return bool(missing)


# ---------------------------------------------------------------- form -> CFG

def _number(text, kind, label: str, low=None, high=None):
    try:
        value = kind(str(text).strip())
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise FormError(f"{label} must be {what}, not {str(text)!r}.") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise FormError(f"{label} must be between {low} and {high}, not {value}.")
    return value


def schedule_fields(steps: int) -> dict:
    """GUI steps -> CFG fields: a third at half size, the rest at full size, as the default
    schedule (200, 400) does; fewer than 3 steps run at full size only."""
    if steps < 3:
        return {"steps": steps, "steps_multires": [steps]}
    return {"steps": 0, "steps_multires": [steps // 3, steps - steps // 3]}


def _folder(form: dict, label: str) -> str:
    folder = str(form.get("ref_dir", "")).strip()
    if not folder:
        raise FormError(f"Pick a {label}.")
    path = Path(folder).expanduser()
    if path.is_file() or (not path.exists() and not is_bundled(path)):
        raise FormError(f"The {label} {folder} does not exist or is not a folder. Pick a folder "
                        f"of images, or one of the bundled sets ({BUNDLED_ROOT}/espresso, ...).")
    return str(path)


def _targets(mode: Mode, form: dict) -> dict:
    """The mode's target fields from the form."""
    if mode.key in ("class", "concept"):
        target = str(form.get("target", "")).strip()
        if not target and mode.key == "class":
            raise FormError("Type a class name (or index) to visualise.")
        extra = {"layer_block": str(form.get("layer", "")).strip()} if mode.key == "concept" else {}
        return {"target": target, **extra}
    if mode.key == "inner":
        layer = str(form.get("layer", "")).strip()
        if not layer:
            raise FormError("Pick a layer for the neuron.")
        return {"layer": layer, "neuron": _number(form.get("neuron", ""), int, "Neuron", 0)}
    base = str(form.get("base", "")).strip()
    if not base:
        raise FormError("Give a base image (a file) or a word.")
    return {"base": base, "add": _split(form.get("add", "")), "sub": _split(form.get("sub", ""))}


def _split(text) -> list[str]:
    """Comma-separated words or image files."""
    return [part.strip() for part in str(text).split(",") if part.strip()]


def build_cfg(mode: Mode, form: dict, out_dir: str = ""):
    """The mode's CFG from the form's strings; FormError names a field that cannot be used.
    Every field the form does not show keeps the CFG's default (as a script without flags)."""
    model = str(form.get("model", "")).strip()
    if not model:
        raise FormError("Pick a model.")
    steps = _number(form.get("steps", ""), int, "Steps", 1, _MAX_STEPS)
    size = _number(form.get("size", ""), int, "Size", 0, 4096)
    if 0 < size < 16:
        raise FormError(f"Size must be 0 (the model's input size) or 16..4096 px, not {size}.")
    values = {"model": model, "size": size, **schedule_fields(steps),
              "save_steps": max(1, steps // 10), **_targets(mode, form)}
    if mode.ref_field:
        values[mode.ref_field] = _folder(form, "reference folder")
    for key in mode.keys:
        kind = type(default_of(mode.cfg_cls, key.field))
        values[key.field] = _number(form.get(key.field, ""), kind, key.label[:1].upper()
                                    + key.label[1:])
    if out_dir:
        values["out_dir"] = str(out_dir)
    return mode.cfg_cls(**values)


def cfg_paths(mode: Mode, cfg) -> list[str]:
    """The folders and files a run reads (to build bundled folders that are missing)."""
    paths = [getattr(cfg, mode.ref_field)] if mode.ref_field else []
    if mode.key == "arithmetic":
        paths += [p for p in [cfg.base, *cfg.add, *cfg.sub] if "/" in p or "\\" in p]
    return paths


# ---------------------------------------------------------------- model facts for the form

@dataclass
class ModelInfo:
    spec: str
    classes: list[str]          # for completion (CLIP: the ImageNet names; also free prompts)
    layers: list               # LayerInfo of layers with positions (neurons can be cropped)
    all_layers: list[str]
    input_size: int
    kind: str

    def describe(self) -> str:
        classes = f"{len(self.classes)} classes" if self.classes else "no class names"
        return f"{self.kind}, {self.input_size} px, {classes}, {len(self.all_layers)} layers"


def model_info(spec: str) -> ModelInfo:
    """Load ``spec`` on the CPU and collect what the form completes from."""
    from vital.models import load_target
    with TORCH_LOCK:
        target = load_target(spec, device="cpu")
        infos = target.layers()
    classes = list(target.class_names or [])
    if not classes and getattr(target, "clip", None) is not None:
        from vital.models.classnames import clip_classnames
        classes = clip_classnames()
    return ModelInfo(spec, classes, [i for i in infos if i.layout in _POSITION_LAYOUTS],
                     [i.name for i in infos], target.input_size, target.kind)


def complete(text: str, names: list[str], limit: int = 40) -> list[str]:
    """Names that start with ``text`` (case-insensitive), then names that contain it."""
    low = text.strip().lower()
    starts = [n for n in names if n.lower().startswith(low)]
    inside = [n for n in names if low in n.lower() and not n.lower().startswith(low)]
    return (starts + inside)[:limit]


# ---------------------------------------------------------------- errors as sentences

def plain_error(err: BaseException) -> str:
    """One line for the window: the message of a known error, else its type and message
    (the traceback then goes to the terminal, not to the window)."""
    from vital.cli import known_errors
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, known_errors() + (RuntimeError, OSError, ImportError)):
        traceback.print_exception(err)
        text = f"Unexpected error ({type(err).__name__}): {text}. Details are in the terminal."
    if len(text) > _MESSAGE_CHARS:
        text = text[:_MESSAGE_CHARS].rstrip() + " ..."
    return text


# ---------------------------------------------------------------- background work

def start_thread(fn: Callable, *args) -> threading.Thread:
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


def load_info_into(spec: str, out: queue.Queue) -> None:
    """Thread body: ("model_info", spec, ModelInfo or None, error sentence or None)."""
    try:
        out.put(("model_info", spec, model_info(spec), None))
    except Exception as err:       # any failure becomes a sentence in the window
        out.put(("model_info", spec, None, f"The model {spec!r} cannot be loaded: "
                 f"{plain_error(err)}"))


def preview(image) -> "Image.Image":
    """(B, 3, H, W) in [0, 1] -> one PIL image (a row of the batch when B > 1)."""
    from vital.imaging import grid, to_pil
    if image.shape[0] == 1:
        return to_pil(image[0])
    return grid([to_pil(im) for im in image])


class RunWorker:
    """Runs one mode's run function in a thread; reports through ``out`` (a queue):

    ("progress", step, total, loss, PIL image) every few steps, ("opinion", text) at each save
    step and at the end, ("phase", text) before the run, then ("done", run_dir, status, steps)
    or ("error", sentence).
    """

    def __init__(self, mode: Mode, cfg, out: queue.Queue, progress_every: int = 5):
        self.mode, self.cfg, self.out = mode, cfg, out
        self.progress_every = progress_every
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> "RunWorker":
        self.thread = start_thread(self._body)
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _progress(self, step, total, loss, image) -> None:
        self.out.put(("progress", step, total, float(loss), preview(image)))

    def _record(self, step, record) -> None:
        if record.get("opinion_text"):
            self.out.put(("opinion", record["opinion_text"]))

    def _body(self) -> None:
        from vital.modes.runner import Callbacks
        callbacks = Callbacks(on_progress=self._progress, on_record=self._record,
                              should_stop=self.stop_event.is_set,
                              progress_every=self.progress_every)
        try:
            with TORCH_LOCK:
                if ensure_bundled(cfg_paths(self.mode, self.cfg)):
                    self.out.put(("phase", f"built the bundled reference folders in "
                                           f"{BUNDLED_ROOT}/"))
                self.out.put(("phase", "loading the model and the references ..."))
                run_dir, result = self.mode.run_fn(self.cfg, ["vital_gui.py"], callbacks)
            if isinstance(run_dir, list):       # inner --auto: one folder per neuron
                run_dir = run_dir[-1]
            self.out.put(("done", str(run_dir), result.stopped or "finished",
                          getattr(result, "steps_done", 0)))
        except Exception as err:   # the window shows a sentence and stays usable
            self.out.put(("error", plain_error(err)))
