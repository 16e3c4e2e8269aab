"""The installed commands (``[project.scripts]`` in pyproject.toml): one entry point per script.

``pip install vital-toolkit`` puts ``vital-class``, ``vital-inner`` ... on the PATH; each is the
function of the same name here, and the root scripts of a checkout (``class_neurons_fvis.py``
...) call the same functions, so both spellings run the same code:

=================  ====================================  ==========================================
command            root script                           what it runs
=================  ====================================  ==========================================
vital-class        class_neurons_fvis.py                 ``modes.class_batch.run_class_or_batch``
vital-inner        inner_neurons_fvis.py                 ``modes.inner.run_inner``
vital-arithmetic   class_neurons_fvis_arithmetic.py      ``modes.arithmetic.run_arithmetic``
vital-concepts     concept_neurons_fvis.py               ``modes.concepts.run_concepts``
vital-facets       faceted_fvis.py                       ``modes.facets.run_facets``
vital-eval         evaluate_fvis.py                      ``eval.harness.run_eval``
vital-describe     describe_neurons.py                   ``modes.label_visuals.run_describe``
vital-effects      neuron_effects.py                     ``modes.effect_visuals.run_neuron_effects``
vital-atlas        atlas.py                              ``atlas.build.run_atlas``
vital-layers       query_model_layers.py                 ``models.layer_table.main``
vital-gui          vital_gui.py                          ``app.gui.main``
vital-references   scripts/build_references.py           ``refs.bundled.build_reference_folders``
=================  ====================================  ==========================================

Every one takes ``argv`` (None: the process's own arguments) and returns the exit status of
``vital.cli.main``. The modes are imported inside each function, so this module is cheap to
import and ``--help`` loads only the command's own mode.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from vital.cli import main

__all__ = ["COMMANDS", "Command", "by_script", "vital_class", "vital_inner", "vital_arithmetic",
           "vital_concepts", "vital_facets", "vital_eval", "vital_describe", "vital_effects",
           "vital_layers", "vital_gui", "vital_references", "vital_atlas"]


@dataclass(frozen=True)
class Command:
    """One command: its installed name, its root script, its CFG and run function (as
    ``module:name``) and the first line of its ``--help``."""
    name: str
    script: str
    cfg: str
    run: str
    about: str

    def load(self):
        """(CFG class, run function), imported now."""
        return _load(self.cfg), _load(self.run)

    def __call__(self, argv: list[str] | None = None) -> int:
        cfg_cls, run_fn = self.load()
        return main(cfg_cls, run_fn, argv, description=self.about)


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


_ABOUT = "Precedence: defaults < --recipe < --json_cfg < command line."

COMMANDS = {c.name: c for c in [
    Command("vital-class", "class_neurons_fvis.py", "vital.modes.class_batch:ClassBatchCFG",
            "vital.modes.class_batch:run_class_or_batch",
            f"Class neuron visualisation (VITAL). {_ABOUT}"),
    Command("vital-inner", "inner_neurons_fvis.py", "vital.modes.inner:InnerCFG",
            "vital.modes.inner:run_inner", f"Inner neuron visualisation (VITAL). {_ABOUT}"),
    Command("vital-arithmetic", "class_neurons_fvis_arithmetic.py",
            "vital.modes.arithmetic:ArithmeticCFG", "vital.modes.arithmetic:run_arithmetic",
            f"Embedding arithmetic steering (VITAL). {_ABOUT}"),
    Command("vital-concepts", "concept_neurons_fvis.py", "vital.modes.concepts:ConceptCFG",
            "vital.modes.concepts:run_concepts", f"Concept visualisation (CRAFT + VITAL). {_ABOUT}"),
    Command("vital-facets", "faceted_fvis.py", "vital.modes.facets:FacetCFG",
            "vital.modes.facets:run_facets", f"Facet visualisation (CRAFT + VITAL). {_ABOUT}"),
    Command("vital-eval", "evaluate_fvis.py", "vital.eval.sweep:EvalCFG",
            "vital.eval.harness:run_eval",
            "Evaluation sweeps of visualisation methods: models x targets x methods x seeds, "
            "scored, resumable, sharded, reported. Precedence: defaults < --json_cfg SWEEP.json "
            "< command line."),
    Command("vital-describe", "describe_neurons.py", "vital.modes.label_visuals:DescribeCFG",
            "vital.modes.label_visuals:run_describe",
            f"Neuron labels and linear explanations. {_ABOUT}"),
    Command("vital-effects", "neuron_effects.py", "vital.modes.effect_visuals:NeuronEffectsCFG",
            "vital.modes.effect_visuals:run_neuron_effects",
            f"Second-order effects of CLIP neurons. {_ABOUT}"),
    Command("vital-atlas", "atlas.py", "vital.atlas.build:AtlasCFG", "vital.atlas.build:run_atlas",
            f"A layer atlas: labels, pictures and top probe images of every unit as an offline "
            f"site. {_ABOUT}"),
]}


def by_script(script: str) -> Command:
    """The command a root script runs (``"class_neurons_fvis.py"`` -> ``vital-class``)."""
    for command in COMMANDS.values():
        if command.script == script:
            return command
    raise KeyError(f"no command runs {script!r}; scripts: "
                   f"{', '.join(c.script for c in COMMANDS.values())}")


def vital_class(argv: list[str] | None = None) -> int:
    return COMMANDS["vital-class"](argv)


def vital_inner(argv: list[str] | None = None) -> int:
    return COMMANDS["vital-inner"](argv)


def vital_arithmetic(argv: list[str] | None = None) -> int:
    return COMMANDS["vital-arithmetic"](argv)


def vital_concepts(argv: list[str] | None = None) -> int:
    return COMMANDS["vital-concepts"](argv)


def vital_facets(argv: list[str] | None = None) -> int:
    return COMMANDS["vital-facets"](argv)


def vital_eval(argv: list[str] | None = None) -> int:
    return COMMANDS["vital-eval"](argv)


def vital_describe(argv: list[str] | None = None) -> int:
    return COMMANDS["vital-describe"](argv)


def vital_effects(argv: list[str] | None = None) -> int:
    return COMMANDS["vital-effects"](argv)


def vital_atlas(argv: list[str] | None = None) -> int:
    return COMMANDS["vital-atlas"](argv)


def vital_layers(argv: list[str] | None = None) -> int:
    """A model's layer map (its own parser: no run folder)."""
    from vital.models.layer_table import main as layers_main
    return layers_main(argv)


def vital_gui(argv: list[str] | None = None) -> int:
    """The desktop window."""
    from vital.app.gui import main as gui_main
    return gui_main(argv)


def vital_references(argv: list[str] | None = None) -> int:
    """Reference folders (class folders of views) from photos that ship inside installed
    packages."""
    import argparse
    from vital.refs.bundled import PHOTOS, build_reference_folders
    parser = argparse.ArgumentParser(
        prog="vital-references", description="Reference folders for the offline examples: "
        "views (crops, flips) of real photos that ship inside installed packages.")
    parser.add_argument("--out", default="references", help="parent folder of the class folders")
    parser.add_argument("--views", type=int, default=12, help="views (crops, flips) per photo")
    parser.add_argument("--size", type=int, default=256, help="side of each view in px")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops")
    args = parser.parse_args(argv)
    if args.views < 1 or args.size < 16:
        parser.error("--views must be >= 1 and --size >= 16")
    made = build_reference_folders(args.out, n_views=args.views, size=args.size, seed=args.seed)
    for photo in PHOTOS:
        print(f"{made[photo.folder]}  (ImageNet class {photo.class_index}, "
              f"from {photo.package}/{photo.relpath})")
    return 0
