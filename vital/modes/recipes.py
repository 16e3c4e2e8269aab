"""Recipes: named sets of defaults for class and inner mode (``--recipe``). Precedence:
defaults < recipe < ``--json_cfg`` < command line; the resolved settings and the recipe's name
are recorded in ``config.json``.

``paper`` is the official VITAL code (Görgün, Schiele, Fischer; ``class_fvis`` and
``inner_fvis``): pixels in the model's normalised space clipped to the valid range after every
step (``pixel_norm``), Adam lr 1.0 with betas (0.5, 0.9), 100 linear warm-up steps and a cosine
decay to 0 over 2000 steps at full size, roll jitter of 30 px and no flips or scales, the
official layers and weights per architecture (``--layers paper``, vital.models.paper), the
official TV / L2 forms (sums of norms on the normalised input) with weight 0 for class neurons
and 3e-7 for inner neurons, references preprocessed as Resize 256 + CenterCrop 224, no class or
neuron term (the loss is relevance-weighted sort matching + TV + L2 only), and for inner neurons
the official LRP rule (``lrp_paper``) on plain min-max maps, references = the whole images
that the top-50 patches come from (``--ref_kind images``; the paper text's top-k patches are
``--ref_kind patches``). The paper's ViT-L weights (TV = L2 = 0.003 for ViT-L/16, 0.0003 for
ViT-L/32) are not set by the recipe: give them with ``--tv_weight`` / ``--l2_weight``.

``toolkit`` is the fork-derived recipe this toolkit used before (Laplacian pyramid + tanh at
lr 0.05, 80 + 160 steps over two resolutions (measured on held-out photos, docs/budget.md;
200 + 400 before), jitter 8, scales and flips, a class or neuron
term, gradient x activation relevance lifted to [0.5, 1]); for classes the pyramid's level k is
scaled by 1.5^k (``--pyramid_gain``, measured on held-out photos).
"""
from __future__ import annotations

_PAPER_OPTIMISATION = {
    "param": "pixel_norm", "lr": 1.0, "adam_betas": [0.5, 0.9], "warmup": 100, "lr_final": 0.0,
    "steps": 2000, "jitter": 30, "scales": [1.0], "flip": False, "noise": 0.0,
    "prior_form": "paper", "layers": ["paper"], "layer_weights": [], "ref_crop": 0.875,
}

PAPER_CLASS = {**_PAPER_OPTIMISATION, "tv_weight": 0.0, "l2_weight": 0.0, "class_weight": 0.0,
               "relevance": "none", "num_ref": 50, "attn_steering": False}

PAPER_INNER = {**_PAPER_OPTIMISATION, "tv_weight": 3e-7, "l2_weight": 3e-7,
               "neuron_weight": 0.0, "relevance": "lrp_paper", "relevance_floor": 0.0,
               "relevance_every": 1, "num_ref": 50, "ref_kind": "images", "ref_rank": "patch",
               "patch_size": 64,
               "stride": 32, "match_own_layer": False}

TOOLKIT_CLASS = {
    "param": "laplacian", "lr": 0.05, "adam_betas": [0.5, 0.99], "warmup": 20, "lr_final": 0.05,
    # issue 27: 80 + 160 steps scored best on held-out photos (docs/budget.md); 200 + 400 before
    "steps": 0, "steps_multires": [80, 160], "jitter": 8, "scales": [0.95, 1.0, 1.05],
    "flip": True, "prior_form": "mean", "tv_weight": 0.05, "l2_weight": 0.0, "layers": [],
    "layer_weights": [], "ref_crop": 1.0, "class_weight": 0.1, "relevance": "none",
    "attn_steering": True,
    # coarse pyramid levels 1.5^k: held-out KID 0.0028 vs 0.0061 at gain 1 (docs/recipes.md)
    "pyramid_gain": 1.5,
}

TOOLKIT_INNER = {**{k: v for k, v in TOOLKIT_CLASS.items()
                    if k not in ("class_weight", "attn_steering")},
                 # issue 22: the unit's own layer matched too and no relevance weighting: the
                 # closed loop and held-out photos (docs/inner.md); gradxact before
                 "neuron_weight": 0.2, "relevance": "none", "match_own_layer": True,
                 # issue 22: whole images ranked by the unit's score on them, the neuron term
                 # at 0.2 (their scores are ~5x below their best patches'): docs/inner.md
                 "ref_rank": "image",
                 "relevance_floor": 0.5,
                 "ref_kind": "images", "pyramid_gain": 1.0,   # issue 22: images (docs/inner.md)
                 # issue 22: 240 steps, within noise of 600 on held-out photos (docs/inner.md)
                 "steps_multires": [80, 160]}

CLASS_RECIPES = {"toolkit": TOOLKIT_CLASS, "paper": PAPER_CLASS}
INNER_RECIPES = {"toolkit": TOOLKIT_INNER, "paper": PAPER_INNER}
