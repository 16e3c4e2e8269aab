"""Relevance of lower-layer activations for one target neuron, and VITAL's relevance-weighted
sort matching (Görgün, Schiele, Fischer, arXiv 2503.22399, "relevant information flow").

``layer_relevance`` gives, for a batch of images, a (B, C, P) relevance map per lower layer: how
much each activation contributes to the target's score (a neuron's mean activation, or the
projection on a direction). Relevance starts at the target layer as activation x gradient of the
score, which sums to the score, and flows down by one of the rules of ``--relevance``:

- ``lrp``: Layer-wise Relevance Propagation.
  CNNs: zennit's ``EpsilonPlusFlat`` composite (ZPlus for convolutions, Epsilon for dense layers),
  with batch norms merged into the convolution before them and residual additions turned into
  zennit ``Sum`` modules (Norm rule) for torchvision ResNets and our EfficientNet-Lite blocks.
  Without biases every layer's relevance then sums to the score (conservation).
  CLIP ViTs: conservative propagation (Ali et al. 2022, the rule AttnLRP builds on): attention
  probabilities and the layer norm's scale are held constant and the GELU passes relevance
  through unchanged; the network is then linear in its activations, so gradient x activation is
  an exact decomposition (up to biases).
- ``gradxact``: gradient x activation (for a bias-free ReLU network also conserving, by Euler's
  theorem for positively homogeneous functions).
- ``guided``: activation x positive part of the guided-backprop gradient (every ReLU / GELU passes
  only positive gradients backwards). No conservation.

The weighting follows the VITAL reference code: the relevance map of each image and channel is
min-max normalised over positions into [0, 1] and multiplies the activations that are sort
matched; each channel's loss is weighted by its importance (its peak relevance, min-max normalised
over channels, averaged over the reference images).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vital.optvis.losses import Objective, resample_quantiles, sort_values
from vital.models import channels_positions

RULES = ("lrp_paper", "lrp", "gradxact", "guided", "none")
_EPS = 1e-12

ScoreFn = Callable[[torch.Tensor], torch.Tensor]   # (B, C, P) features -> (B,) scores


# ---------------------------------------------------------------- rules as contexts

def _lrp_composite():
    """zennit's EpsilonPlusFlat with the canonizers our CNNs need."""
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
    return EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm(), ResNetBottleneckCanonizer(),
                                       ResNetBasicBlockCanonizer(), _residual_sum_canonizer()])


def _residual_sum_canonizer():
    """EfficientNet-Lite blocks (``vital.models.efficientnet.MBConv``): the skip addition becomes a
    zennit ``Sum`` so the Norm rule splits relevance between skip and branch in proportion."""
    from zennit.canonizers import AttributeCanonizer
    from zennit.layer import Sum
    from vital.models.efficientnet import MBConv

    def forward(self, x):
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.depthwise(h))
        if not self.residual:
            return h
        return self.canonizer_sum(torch.stack([x, h], dim=-1))  # (B, C, H, W, 2) -> sum over 2

    def attribute_map(name, module):
        if isinstance(module, MBConv) and module.residual:
            return {"forward": forward.__get__(module), "canonizer_sum": Sum()}
        return None
    return AttributeCanonizer(attribute_map)


def _abs_split_rule():
    """The official code's residual rule: at ``out = main + skip`` each side receives
    relevance in proportion |side| / (|main| + |skip|) (``RelevancePropagationBottleneck
    FlowsPureSkip``). As a zennit BasicHook on the canonizers' ``Sum`` module (inputs stacked
    on the last axis): the modified input is |x|, so z = |main| + |skip| and
    R_side = |side| * R / z. Conservative by construction."""
    from zennit.rules import BasicHook, NoMod
    return BasicHook(
        input_modifiers=[lambda input: input.abs()],
        param_modifiers=[NoMod(param_keys=[])],
        output_modifiers=[lambda output: output],
        gradient_mapper=(lambda out_grad, outputs: out_grad / (outputs[0] + _PAPER_EPS)),
        reducer=(lambda inputs, gradients: inputs[0] * gradients[0]),
    )


_PAPER_EPS = 1e-5     # the official code's stabiliser: z + 1e-5


class _MaxPoolAsAverage:
    """The official code's max-pool rule (``RelevancePropagationMaxPool2d``, mode "avg"): the
    forward keeps the max pool, but relevance is redistributed as through a 2 x 2 average
    pool of stride 2, R_in = a * d/da [avgpool(a) + eps] . R_out / (avgpool(a) + eps), i.e.
    each input gets a share of its window's relevance in proportion to its value. (A rule
    that backpropagates through the max pool itself would send the whole window's relevance
    to its maximum.) ``ceil_mode`` keeps the average pool's output the size of the max
    pool's (3 x 3, stride 2, padding 1 in a ResNet stem) for odd inputs too."""

    @staticmethod
    def make():
        from zennit.core import BasicHook

        class Hook(BasicHook):
            def backward(self, module, grad_input, grad_output):
                a = self.stored_tensors["input"][0].clone().requires_grad_()
                with torch.enable_grad():
                    z = F.avg_pool2d(a, 2, stride=2, ceil_mode=True) + _PAPER_EPS
                if z.shape != grad_output[0].shape:
                    raise ValueError(f"the official max-pool rule (a 2 x 2 average pool) "
                                     f"gives {tuple(z.shape)} where the max pool gave "
                                     f"{tuple(grad_output[0].shape)}; use --relevance lrp")
                (g,) = torch.autograd.grad(z, a, grad_outputs=grad_output[0] / z)
                return (a * g,)

            def copy(self):
                return Hook()
        return Hook()


def _paper_composite():
    """The official VITAL LRP (``inner_fvis/utils/lrp.py``, ``lrp_layers.py``): z+ on
    convolutions and linear layers (positive weights, bias zeroed, z + 1e-5), batch norms and
    activations pass relevance through unchanged, average pooling splits it in proportion to
    the inputs, a max pool as if it were a 2 x 2 average pool (``_MaxPoolAsAverage``, as the
    official code), residual additions split it by |main| / (|main| + |skip|). Difference, for
    architectures the official code does not cover: zennit's z+ also gives negative inputs a
    share through the negative weights (alpha=1, beta=0), which for post-ReLU inputs (every
    ResNet convolution) is the official rule."""
    from zennit.composites import LayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import Norm, Pass, ZPlus
    from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
    zplus = ZPlus(stabilizer=_PAPER_EPS, zero_params=["bias"])
    pools = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
    passing = (nn.BatchNorm2d, nn.BatchNorm1d, nn.Dropout, nn.Identity) + _activation_types()
    layer_map = [(nn.Conv2d, zplus), (nn.Linear, zplus), (passing, Pass()),
                 (pools, Norm(stabilizer=_PAPER_EPS)), (nn.MaxPool2d, _MaxPoolAsAverage.make()),
                 (Sum, _abs_split_rule())]
    return LayerMapComposite(layer_map=layer_map, canonizers=[
        ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer(), _residual_sum_canonizer()])


def _activation_types() -> tuple[type, ...]:
    from clip_custom.layers import QuickGELU
    return (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, QuickGELU)


def _guided_composite():
    """Guided backprop: every activation passes only positive gradients backwards."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import ReLUGuidedBackprop
    return LayerMapComposite(layer_map=[(_activation_types(), ReLUGuidedBackprop())])


def _frozen_scale_layer_norm(module, inputs, output):
    """LayerNorm with its scale 1/std held constant: linear in the input."""
    x = inputs[0].float()
    centred = x - x.mean(-1, keepdim=True)
    scale = (centred.pow(2).mean(-1, keepdim=True) + module.eps).rsqrt().detach()
    out = centred * scale
    if module.weight is not None:
        out = out * module.weight.float() + module.bias.float()
    return out.to(output.dtype)


def _identity_rule(module, inputs, output):
    """An elementwise activation as x * (f(x) / x) with the ratio constant: relevance passes
    through unchanged (AttnLRP's identity rule); where x == 0 the ratio is f'(0) ~ 0.5."""
    x = inputs[0]
    ratio = torch.where(x.abs() > 1e-6, output / torch.where(x.abs() > 1e-6, x, 1.0),
                        torch.full_like(x, 0.5))
    return x * ratio.detach()


@contextlib.contextmanager
def _conservative_vit(module: nn.Module):
    """Forward hooks that make a ViT linear in its activations (see the module docstring)."""
    handles = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.LayerNorm):
            handles.append(sub.register_forward_hook(_frozen_scale_layer_norm))
        elif name.endswith("mlp.gelu"):
            handles.append(sub.register_forward_hook(_identity_rule))
        elif name.endswith("attn.probs"):
            handles.append(sub.register_forward_hook(lambda m, i, out: out.detach()))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def uses_zennit_lrp(target, rule: str) -> bool:
    return rule in ("lrp", "lrp_paper") and target.kind != "clip-vit"


@contextlib.contextmanager
def rule_context(target, rule: str):
    """Enter before ``target.hooks`` so the hooks see the rule's outputs."""
    if rule not in RULES or rule == "none":
        raise ValueError(f"unknown relevance rule {rule!r}; valid: {', '.join(RULES[:-1])}")
    if rule == "gradxact":
        yield
    elif rule in ("lrp", "lrp_paper") and target.kind == "clip-vit":
        with _conservative_vit(target.module):
            yield
    elif rule == "lrp_paper":
        # the official rule passes relevance through batch norms unchanged: a batch norm folded
        # into its convolution (a render's TargetModel.batchnorm_folded) would change z+
        unfolded = getattr(target, "batchnorm_unfolded", contextlib.nullcontext)
        with unfolded(), _paper_composite().context(target.module):
            yield
    else:
        composite = {"lrp": _lrp_composite, "guided": _guided_composite}[rule]()
        with composite.context(target.module):
            yield


# ---------------------------------------------------------------- relevance

class _Stop(Exception):
    """Raised once the last layer a pass needs has been computed."""


def forward_until(target, x: torch.Tensor, layer: str) -> None:
    """Run ``target`` on ``x`` only as far as ``layer`` (hooks registered before still fire)."""
    def stop(output):
        raise _Stop
    try:
        with target.replaced(layer, stop):
            target(x)
    except _Stop:
        pass


def _chunk_relevance(target, x, layers, target_layer, score_fn, rule, layouts):
    """(relevance, features) per layer, both (B, C, P), for one chunk of images."""
    x = x.detach().to(target.device).requires_grad_(True)   # the graph starts at the image
    names = list(dict.fromkeys(list(layers) + [target_layer]))
    with rule_context(target, rule), target.hooks(names) as feats:
        forward_until(target, x, target_layer)
        top = feats[target_layer]
        score = score_fn(channels_positions(top, layouts[target_layer]))   # (B,)
        (grad_top,) = torch.autograd.grad(score.sum(), top, retain_graph=True)
        start = top * grad_top if uses_zennit_lrp(target, rule) else grad_top
        lows = [feats[name] for name in layers]
        grads = torch.autograd.grad(top, lows, grad_outputs=start.detach(), allow_unused=True)
    rel, out_feats = {}, {}
    for name, act, grad in zip(layers, lows, grads):
        grad = torch.zeros_like(act) if grad is None else grad
        if rule == "guided":
            grad = grad.clamp_min(0)
        value = grad if uses_zennit_lrp(target, rule) else act * grad
        rel[name] = channels_positions(value.detach(), layouts[name]).float()
        out_feats[name] = channels_positions(act.detach(), layouts[name]).float()
    return rel, out_feats


def relevance_and_features(target, images: torch.Tensor, layers: list[str], target_layer: str,
                           score_fn: ScoreFn, rule: str = "gradxact",
                           batch_size: int = 8) -> tuple[dict, dict]:
    """Relevance of the target's score for every activation of ``layers`` and the activations
    themselves: two dicts ``{layer: (B, C, P)}`` in float32 on the model's device."""
    if not layers:
        return {}, {}
    layouts = {info.name: info.layout for info in target.layers()}
    parts = [_chunk_relevance(target, chunk, layers, target_layer, score_fn, rule, layouts)
             for chunk in images.split(batch_size)]
    rel = {k: torch.cat([p[0][k] for p in parts]) for k in layers}
    feats = {k: torch.cat([p[1][k] for p in parts]) for k in layers}
    return rel, feats


def layer_relevance(target, images, layers, target_layer, score_fn, rule="gradxact",
                    batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{layer: (B, C, P)}`` relevance of each activation for the target's score."""
    return relevance_and_features(target, images, layers, target_layer, score_fn, rule,
                                  batch_size)[0]


# ---------------------------------------------------------------- VITAL weighting

def spatial_weights(rel: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """(B, C, P) relevance -> (B, C, P) in [floor, 1]: min-max over positions per image and
    channel, then ``floor + (1 - floor) * w``. A floor > 0 keeps every activation in the
    matching (with less weight where it is irrelevant); at 0 activations at positions without
    relevance are multiplied by ~0 and left unconstrained."""
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"relevance floor must be in [0, 1), got {floor}")
    low = rel.amin(-1, keepdim=True)
    high = rel.amax(-1, keepdim=True)
    w = (rel - low) / (high - low).clamp_min(_EPS)
    return w if floor == 0.0 else floor + (1.0 - floor) * w


def channel_importance(rel: torch.Tensor) -> torch.Tensor:
    """(B, C, P) relevance -> (C,) in [0, 1]: each channel's peak relevance, min-max normalised
    over channels per image, averaged over the images."""
    peak = rel.amax(-1)                                     # (B, C)
    low, high = peak.amin(1, keepdim=True), peak.amax(1, keepdim=True)
    return ((peak - low) / (high - low).clamp_min(_EPS)).mean(0)


def weighted_sort_matching(x: torch.Tensor, ref_sorted: torch.Tensor,
                           channel_weights: torch.Tensor) -> torch.Tensor:
    """Sort matching with a weight per channel, as the official code: the mean over channels of
    w_c L_c (sum_c w_c L_c / C, not / sum_c w_c), where L_c is the mean over B and P of
    (sort(x)_c - ref_c)^2. The official code multiplies each channel's squared errors by its
    importance and takes the mean over images, channels and positions, so a layer whose
    channels are mostly unimportant weighs less in the sum over layers; dividing by sum_c w_c
    instead would rescale each layer's term by C / sum_c w_c and upset the official layer
    weights and priors. Unit weights give ``losses.sort_matching``."""
    if x.dim() != 3 or ref_sorted.shape[0] != x.shape[1] or channel_weights.shape != (x.shape[1],):
        raise ValueError(f"need x (B, C, P), ref (C, Q) and weights (C,), got {tuple(x.shape)}, "
                         f"{tuple(ref_sorted.shape)} and {tuple(channel_weights.shape)}")
    ref = resample_quantiles(ref_sorted.detach().to(x), x.shape[-1])      # (C, P)
    per_channel = (sort_values(x) - ref).pow(2).mean(dim=(0, 2))           # (C,)
    w = channel_weights.detach().to(x)
    return (w * per_channel).mean()


@torch.no_grad()
def _accumulate(rel: dict, feats: dict, sums: dict, imp: dict, floor: float = 0.0) -> None:
    for name, r in rel.items():
        weighted = sort_values(spatial_weights(r, floor) * feats[name]).sum(0)      # (C, P)
        sums[name] = weighted if name not in sums else sums[name] + weighted
        i = channel_importance(r) * r.shape[0]
        imp[name] = i if name not in imp else imp[name] + i


def weighted_references(target, images: torch.Tensor, layers: list[str], target_layer: str,
                        score_fn: ScoreFn, rule: str, batch_size: int = 8,
                        floor: float = 0.0) -> tuple[dict, dict]:
    """Reference side of relevance-weighted sort matching, for images (N, 3, S, S):
    ``({layer: (C, P)} sorted relevance-weighted features averaged over the images,
    {layer: (C,)} channel importance)``."""
    sums, imp = {}, {}
    for chunk in images.split(batch_size):
        rel, feats = relevance_and_features(target, chunk, layers, target_layer, score_fn, rule,
                                            batch_size)
        _accumulate(rel, feats, sums, imp, floor)
    n = images.shape[0]
    return {k: v / n for k, v in sums.items()}, {k: v / n for k, v in imp.items()}


def _resize_positions(maps: torch.Tensor, positions: int, lead: int) -> torch.Tensor | None:
    """(B, C, P) maps over ``lead`` tokens + a square grid -> ``positions`` positions (bilinear on
    the grid); None when either grid is not square."""
    old, new = math.isqrt(maps.shape[-1] - lead), math.isqrt(positions - lead)
    if old * old != maps.shape[-1] - lead or new * new != positions - lead or old == 0:
        return None
    grid = maps[..., lead:].unflatten(-1, (old, old))                  # (B, C, g, g)
    grid = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False)
    return torch.cat([maps[..., :lead], grid.flatten(2)], -1)          # (B, C, lead + g'^2)


class SyntheticMaps:
    """Relevance maps of the image being optimised, ``{layer: (B, C, P)}`` in [0, 1], computed on
    ``ctx["input"]`` and shared by every layer's term. With ``every`` > 1 they are recomputed
    every ``every`` steps only and resized (bilinear) in between when the input size changed
    (scale jitter, a new stage): faster, but maps from one augmentation (roll, flip) then weight
    the activations of another."""

    def __init__(self, target, layers, target_layer, score_fn, rule, every: int = 1,
                 floor: float = 0.0):
        self.args = (layers, target_layer, score_fn, rule)
        self.floor = floor
        self.target, self.every = target, max(1, int(every))
        self.lead = 1 if target.kind == "clip-vit" else 0      # a ViT's class token
        self.step, self.maps = None, None
        self.group: MapsGroup | None = None     # set when the run is one element of a batch

    def _compute(self, ctx) -> None:
        layers, target_layer, score_fn, rule = self.args
        x = ctx["input"]
        rel = layer_relevance(self.target, x, layers, target_layer, score_fn, rule,
                              batch_size=x.shape[0])
        self.maps = {k: spatial_weights(v, self.floor).to(x.device) for k, v in rel.items()}
        self.step = ctx.get("step", 0)

    def _fitted(self, ctx) -> dict | None:
        out = {}
        for name, maps in self.maps.items():
            positions = ctx["features"][name].shape[-1]
            out[name] = maps if maps.shape[-1] == positions else \
                _resize_positions(maps, positions, self.lead)
            if out[name] is None or out[name].shape[0] != ctx["features"][name].shape[0]:
                return None
        return out

    def __call__(self, ctx) -> dict[str, torch.Tensor]:
        if self.group is not None and "batch" in ctx:    # element b of a batched run
            b = ctx["element"]
            return {k: v[b:b + 1] for k, v in self.group.maps(ctx["batch"]).items()}
        step = ctx.get("step", 0)
        if self.maps is None or not 0 <= step - self.step < self.every:
            self._compute(ctx)
        fitted = self._fitted(ctx)
        if fitted is None:
            self._compute(ctx)
            fitted = self.maps
        return fitted


class MapsGroup:
    """The relevance maps of a batch of runs (``vital.modes.batch``), computed in one forward +
    backward of the whole batch: element b's maps come from its own run's score (the scores
    are summed before the backward pass, and the elements of a batch do not interact in an
    evaluation-mode model, so each gets the gradient of its own score alone)."""

    def __init__(self, members: list[SyntheticMaps]):
        first = members[0]
        layers, target_layer, _, rule = first.args
        fns = [m.args[2] for m in members]

        def score(feats):       # (B, C, P) -> (B,): element b scored by run b's target
            return torch.cat([fn(feats[b:b + 1]) for b, fn in enumerate(fns)])
        self.shared = SyntheticMaps(first.target, layers, target_layer, score, rule,
                                    first.every, floor=first.floor)

    @classmethod
    def join(cls, members: list) -> "MapsGroup | None":
        """Group the runs' maps when every run has them with the same layers, rule, floor and
        refresh interval; otherwise each element keeps computing its own (same result,
        one forward + backward per element)."""
        if len(members) < 2 or any(m is None for m in members):
            return None
        key = lambda m: (id(m.target), tuple(m.args[0]), m.args[1], m.args[3], m.floor,
                         m.every)
        if len({key(m) for m in members}) != 1:
            return None
        group = cls(members)
        for m in members:
            m.group = group
        return group

    def maps(self, ctx) -> dict[str, torch.Tensor]:
        """{layer: (B, C, P)} maps of the whole batch for this step (computed once a step)."""
        return self.shared(ctx)


def relevance_sort_matching(refs_by_size: dict[int, dict[str, torch.Tensor]],
                            importance_by_size: dict[int, dict[str, torch.Tensor]],
                            weights: dict[str, float], maps: SyntheticMaps) -> Objective:
    """Terms ``sort:<layer>``: the synthetic image's relevance-weighted activations sort matched
    against the references' of the current stage size, each channel weighted by importance."""
    def term(layer):
        def fn(ctx):
            x = maps(ctx)[layer] * ctx["features"][layer]
            size = ctx["size"]
            return weighted_sort_matching(x, refs_by_size[size][layer],
                                          importance_by_size[size][layer])
        return weights[layer] * Objective(fn, f"sort:{layer}")
    return sum(term(layer) for layer in weights)
