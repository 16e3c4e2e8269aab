"""One run of neuron_effects.py: effects of a CLIP ViT's MLP neurons over a probe set, their
principal components and words, optionally the ablation study and segmentation heatmaps.

Two passes over the probe images (each: one forward per batch, then the effects of every
neuron chunk): pass 1 sums each neuron's effects for its mean; pass 2 ranks the images by the
norm of the mean-centred effect and keeps the top k with their vectors for the PCA. The
centring needs the mean before the ranking, and keeping every effect instead would take
images x neurons x E floats (1000 x 3072 x 512 x 4 B = 6.3 GB for one ViT-B layer).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vital.cache import write_json
from vital.cli import signals_deferred
from vital.config import ConfigError, check_cfg, make_run_dir, opt, run_metadata
from vital.effects import decompose as dec
from vital.effects.ablation import AblationCounter, labelled_folder, zeroshot_classifier
from vital.effects.stats import MeanTracker, TopTracker, summarise
from vital.effects.texts import dictionary, sparse_decompose, text_embeddings, text_set
from vital.imaging import grid, save_png, to_pil
from vital.models import load_target
from vital.models.classnames import encode_texts
from vital.refs.images import load_image
from vital.refs.patches import data_files, iter_images

__all__ = ["EffectsCFG", "EffectsResult", "run_effects", "prepare", "LayerRun", "layer_runs",
           "pass_means", "pass_top"]

_TILE = 96          # px of a tile in the contact sheets
_EMBED_SCALE = 100.0  # the official normalisation: effects in units of 1/100 of |embedding|

# The settings a protocol decides, in one place; a flag given explicitly wins (``resolve``).
# official: compute_second_order_neuron_prs.py / compute_sparse_decomposition.py of
# yossigandelsman/second_order_lens (coefficient 100 on the image representation and on the
# text set, `text - mean(axis=0)` then `/ norm(axis=0)`, `--components 32`).
PROTOCOLS = {
    "official": {"normalise": "embedding", "dictionary": "dimensions", "components": 32,
                 "shares": "official"},
    "toolkit": {"normalise": "none", "dictionary": "texts", "components": 16,
                "shares": "exact"},
}


@dataclass
class EffectsCFG:
    """Second-order effects of CLIP neurons (Gandelsman et al., ICLR 2025)."""
    model: str = opt("ViT-B/32", "CLIP ViT: OpenAI name, hf-hub:ORG/REPO or a weights file")
    layer: list[str] = opt(["block.9.mlp"], "MLP layer(s): block.N.mlp or a bare block number")
    neurons: list[int] = opt([], "neurons of the layer to analyse (empty = all)")
    probe_dir: str = opt("references", "probe images (searched recursively)")
    batch_size: int = opt(32, "images per forward pass", low=1)
    neuron_chunk: int = opt(512, "neurons whose effects are materialised at once", low=1)
    top_k: int = opt(100, "images per neuron with the largest centred effect norm (PCA, "
                     "significance threshold)", low=1)
    protocol: str = opt("official", "the defaults of --normalise, --dictionary and "
                        "--components: official (yossigandelsman/second_order_lens) or "
                        "toolkit (ours before); docs/effects.md compares them",
                        choices=list(PROTOCOLS))
    normalise: str | None = opt(None, "effect units: none (embedding units) or embedding (x 100 "
                                "/ |embedding| per image); default from --protocol",
                                choices=["none", "embedding"])
    dictionary: str | None = opt(None, "text dictionary: dimensions (centred, each embedding "
                                 "dimension scaled to norm 100 over the texts) or texts "
                                 "(centred, each text unit length); default from --protocol",
                                 choices=["dimensions", "texts"])
    shares: str | None = opt(None, "layer-norm means and biases: official (every component an "
                             "equal share, as prs_second_order_neurons_hook.py) or exact "
                             "(each contribution centred exactly, biases left out); default "
                             "from --protocol; docs/effects.md measures the gap",
                             choices=["official", "exact"])
    texts: str = opt("words20k", "text set for the decomposition: a file (one text per line), "
                     "words20k or imagenet; empty = no decomposition")
    components: int | None = opt(None, "texts per neuron in the sparse decomposition (OMP); "
                                 "default from --protocol", low=1)
    top_words: int = opt(5, "texts per neuron written into neurons.csv", low=0)
    sheets: int = opt(8, "contact sheets of top images for the N strongest neurons", low=0)
    sheet_images: int = opt(16, "images per contact sheet", low=1)
    ablate: bool = opt(False, "mean-ablate the layer's second-order effects and report "
                       "zero-shot accuracy on --ablate_dir")
    ablate_dir: str = opt("", "labelled folder (class folders named by ImageNet class); "
                          "empty = --probe_dir")
    ablate_keep: list[int] = opt([0, 100], "ablate all neurons (0) or all but the top N by "
                                 "effect norm per image", low=0)
    zeroshot_classes: str = opt("all", "zero-shot classifier over all 1000 ImageNet classes or "
                                "only those present in the folder", choices=["all", "present"])
    heatmap: str = opt("", "text: per-patch contributions of the neurons projected on its "
                       "embedding, as a heatmap over each probe image")
    heatmap_images: int = opt(16, "probe images in the heatmap sheet", low=1)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    resume: str = opt("", "the folder of a run stopped by Ctrl-C or SIGTERM (it holds "
                      "checkpoint.json): finish it with the same settings")
    out_dir: str = opt("out_effects", "folder for runs")
    run_name: str = opt("", "run folder name (empty = from model, layers and probe folder)")
    progress: bool = opt(True, "progress bars")


@dataclass
class EffectsResult:
    run_dir: Path | None = None
    summaries: dict = field(default_factory=dict)   # layer -> [NeuronSummary]
    words: dict = field(default_factory=dict)       # layer -> [Decomposition] or None
    accuracy: dict = field(default_factory=dict)    # layer -> {"none": .., "all": ..}
    images: int = 0
    files: list = field(default_factory=list)       # the probe images read, in index order
    texts: list | None = None                       # the text set of the decomposition
    target: object = None                           # the TargetModel
    visuals: list = field(default_factory=list)     # paths written by --visualise
    stopped: str | None = None


@dataclass
class LayerRun:
    """The state of one layer through both passes."""
    maps: dec.EffectMaps
    means: MeanTracker
    first_means: MeanTracker
    top: TopTracker | None = None
    mean: torch.Tensor | None = None               # (N, E) mean second-order effect
    first_mean: torch.Tensor | None = None         # (N, E) mean first-order effect
    first_norm_total: torch.Tensor | None = None   # (N,) sum of centred first-order norms
    heat: list = field(default_factory=list)       # (image index, (T,) contributions)


# ---------------------------------------------------------------- checks

def _check(cfg: EffectsCFG) -> None:
    check_cfg(cfg)   # the declared ranges (parse_cfg checks them too; this is for Python callers)
    if not cfg.layer:
        raise ConfigError("give at least one --layer (e.g. block.9.mlp)")


def prepare(cfg: EffectsCFG):
    """Model, layers, neurons, probe files and texts, all checked before any heavy work."""
    _check(cfg)
    target = load_target(cfg.model, device=cfg.device)
    visual = dec.clip_vit(target)
    blocks = visual.transformer.resblocks
    layers = sorted({dec.parse_layer(name, len(blocks)) for name in cfg.layer})
    neurons = dec.check_neurons(cfg.neurons, blocks[layers[0]].mlp.c_fc.out_features)
    files = data_files(cfg.probe_dir)
    texts = text_set(cfg.texts) if cfg.texts else None
    return target, layers, neurons, files, texts


# ---------------------------------------------------------------- streaming

def _batches(target, files, layers, cfg, desc, start: int = 0, offset: int = 0):
    """(files consumed so far, offset, files read, Records, per-image scale (B,)) per image
    batch, from file ``start`` on (a resumed pass); ``offset`` numbers the images read."""
    total = math.ceil(len(files) / cfg.batch_size)
    for begin in tqdm(range(start, len(files), cfg.batch_size), total=total,
                      initial=start // cfg.batch_size, desc=desc, disable=not cfg.progress,
                      leave=False):
        chunk = files[begin:begin + cfg.batch_size]
        # own chunks (not iter_images' groups of readable images): a resumed pass restarts at
        # a file position, whatever was unreadable before it
        groups = list(iter_images(chunk, target.input_size, batch=len(chunk)))
        if not groups:
            continue
        images, used = groups[0]
        rec = dec.record(target, images.to(target.device), layers)
        scale = torch.ones(len(used), device=rec.embedding.device)
        if cfg.normalise == "embedding":
            scale = _EMBED_SCALE / rec.embedding.norm(dim=-1)
        yield begin + len(chunk), offset, used, rec, scale
        offset += len(used)


def _common(target, rec, run: "LayerRun"):
    """Each image's share of the means and biases under the official convention, else None."""
    return None if run.maps.centred else dec.shares(dec.clip_vit(target), rec, run.maps)


def _chunks(n: int, size: int):
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


@dataclass
class Progress:
    """Where a run is: pass 1 (means) or 2 (top k), files consumed in it, and the images read
    in pass 1 (indices into the probe files), which pass 2 goes over."""
    stage: int = 1
    consumed: int = 0
    read: list = field(default_factory=list)


def pass_means(target, files, runs: dict[int, LayerRun], cfg,
               progress: Progress | None = None) -> list[Path]:
    """Pass 1: every neuron's mean first- and second-order effect; returns the images read.
    Each batch is added whole (Ctrl-C / SIGTERM wait for its end), so ``progress`` always
    describes sums that a resumed run can continue."""
    progress = progress or Progress()
    index = {Path(f): i for i, f in enumerate(files)}
    for consumed, _, used, rec, scale in _batches(target, files, list(runs), cfg,
                                                  "effects: means", progress.consumed):
        with signals_deferred():
            for run in runs.values():
                coef, common = dec.coefficients(rec, run.maps), _common(target, rec, run)
                for part in _chunks(len(run.maps.neurons), cfg.neuron_chunk):
                    run.means.update(part, dec.second_order(coef, run.maps, part, common)
                                     * scale[:, None, None])
                    run.first_means.update(part, dec.first_order(rec, run.maps, part)
                                           * scale[:, None, None])
                run.means.step(len(used))
                run.first_means.step(len(used))
            progress.read += [index[Path(f)] for f in used]
            progress.consumed = consumed
    if not progress.read:
        raise ConfigError(f"none of the {len(files)} probe images could be read")
    progress.stage, progress.consumed = 2, 0
    return [files[i] for i in progress.read]


def _start_top(runs: dict[int, LayerRun], cfg) -> None:
    for run in runs.values():
        n = len(run.maps.neurons)
        run.top = TopTracker(n, cfg.top_k, run.maps.first.shape[1])
        run.first_norm_total = torch.zeros(n)
        run.mean, run.first_mean = run.means.mean(), run.first_means.mean()


def pass_top(target, files, runs: dict[int, LayerRun], cfg, direction,
             progress: Progress | None = None) -> None:
    """Pass 2: centred norms, the top k with their vectors, mean first-order norms, and the
    per-token projections on ``direction`` (E,) for the heatmap (None: no heatmap). A batch
    is added whole, as in pass 1."""
    progress = progress or Progress(stage=2)
    if progress.consumed == 0:
        _start_top(runs, cfg)
    done = sum(len(part) for part in next(iter(runs.values())).top.norm_parts)
    for consumed, offset, used, rec, scale in _batches(target, files, list(runs), cfg,
                                                       "effects: top k", progress.consumed,
                                                       done):
        with signals_deferred():
            for run in runs.values():
                coef, common = dec.coefficients(rec, run.maps), _common(target, rec, run)
                run.top.start_batch(len(used), len(run.maps.neurons))
                for part in _chunks(len(run.maps.neurons), cfg.neuron_chunk):
                    second = dec.second_order(coef, run.maps, part, common) \
                        * scale[:, None, None]
                    run.top.update(part, second - run.mean[part].to(second), offset)
                    first = dec.first_order(rec, run.maps, part) * scale[:, None, None]
                    centred = first - run.first_mean[part].to(first)
                    run.first_norm_total[part] += centred.norm(dim=-1).sum(0).cpu()
                run.top.end_batch()
                if direction is not None and offset < cfg.heatmap_images:
                    heat = dec.token_projection(rec, run.maps, direction) * scale[:, None]
                    for i in range(min(len(used), cfg.heatmap_images - offset)):
                        run.heat.append((offset + i, heat[i].cpu()))
            progress.consumed = consumed
    progress.stage = 3


# ---------------------------------------------------------------- checkpoints

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
_NOT_SETTINGS = ("resume", "progress", "device", "out_dir", "run_name")


def _settings(cfg: EffectsCFG) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_SETTINGS}


def save_checkpoint(run_dir: Path, cfg: EffectsCFG, files: list[Path],
                    runs: dict[int, LayerRun], progress: Progress) -> None:
    """The sums of a stopped run (safetensors) and where it stopped (JSON, written last)."""
    tensors = {}
    for layer, run in runs.items():
        tensors[f"{layer}.means"] = run.means.total
        tensors[f"{layer}.first_means"] = run.first_means.total
        if progress.stage == 2 and run.top is not None:
            tensors[f"{layer}.top_values"] = run.top.values
            tensors[f"{layer}.top_index"] = run.top.index
            tensors[f"{layer}.top_vectors"] = run.top.vectors
            tensors[f"{layer}.norms"] = run.top.norms()
            tensors[f"{layer}.first_norm_total"] = run.first_norm_total
            if run.heat:
                tensors[f"{layer}.heat"] = torch.stack([h for _, h in run.heat])
                tensors[f"{layer}.heat_index"] = torch.tensor([i for i, _ in run.heat])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(run_dir / CHECKPOINT))
    counts = {str(layer): run.means.count for layer, run in runs.items()}
    write_json(run_dir / CHECKPOINT_JSON, {
        "stage": progress.stage, "consumed": progress.consumed, "read": progress.read,
        "counts": counts, "files": [str(f) for f in files], "settings": _settings(cfg)})


def _load_checkpoint(cfg: EffectsCFG, files: list[Path], runs: dict[int, LayerRun]
                     ) -> tuple[Path, Progress]:
    run_dir = Path(cfg.resume)
    try:
        state = json.loads((run_dir / CHECKPOINT_JSON).read_text())
        tensors = load_file(str(run_dir / CHECKPOINT))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as err:
        raise ConfigError(f"--resume {run_dir}: no readable checkpoint there (a run stopped by "
                          f"Ctrl-C or SIGTERM leaves checkpoint.json and "
                          f"checkpoint.safetensors): {err}") from None
    diff = sorted(k for k in set(state["settings"]) | set(_settings(cfg))
                  if state["settings"].get(k) != _settings(cfg).get(k))
    if diff:
        raise ConfigError(f"--resume {run_dir}: the run was started with other settings "
                          f"({', '.join(diff)}); resume it with the same ones")
    if state["files"] != [str(f) for f in files]:
        raise ConfigError(f"--resume {run_dir}: the probe folder changed since the run "
                          f"started; resume with the same images or start a new run")
    for layer, run in runs.items():
        run.means.total = tensors[f"{layer}.means"]
        run.first_means.total = tensors[f"{layer}.first_means"]
        run.means.count = run.first_means.count = state["counts"][str(layer)]
        if state["stage"] == 2 and state["consumed"] > 0:
            _start_top({layer: run}, cfg)
            run.top.values = tensors[f"{layer}.top_values"]
            run.top.index = tensors[f"{layer}.top_index"]
            run.top.vectors = tensors[f"{layer}.top_vectors"]
            run.top.norm_parts = [tensors[f"{layer}.norms"]]
            run.first_norm_total = tensors[f"{layer}.first_norm_total"]
            if f"{layer}.heat" in tensors:
                run.heat = list(zip(tensors[f"{layer}.heat_index"].tolist(),
                                    tensors[f"{layer}.heat"]))
    return run_dir, Progress(state["stage"], state["consumed"], state["read"])


def _sheet(files, indices, labels, path: Path, size: int) -> None:
    tiles = [to_pil(load_image(files[i], size)).resize((_TILE, _TILE), Image.BICUBIC)
             for i in indices]
    save_png(grid(tiles, labels, cols=math.ceil(math.sqrt(len(tiles)))), path)


def _overlay(image: torch.Tensor, heat: torch.Tensor) -> Image.Image:
    """Patch contributions (T,) incl. the class token as a jet overlay on the image."""
    from matplotlib import colormaps
    side = math.isqrt(heat.numel() - 1)
    patches = heat[1:].view(1, 1, side, side)                    # class token left out
    lo, hi = patches.min(), patches.max()
    patches = (patches - lo) / (hi - lo).clamp_min(1e-12)
    up = F.interpolate(patches, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    colour = torch.from_numpy(colormaps["jet"](up.numpy())[..., :3]).permute(2, 0, 1).float()
    return to_pil(0.5 * image + 0.5 * colour).resize((_TILE, _TILE), Image.BICUBIC)


def _write_heatmaps(run_dir, files, layer, run: LayerRun, size, text) -> Path:
    tiles = [_overlay(load_image(files[i], size), heat) for i, heat in run.heat]
    labels = [f"{float(heat[1:].sum()):.3g}" for _, heat in run.heat]
    path = run_dir / f"heatmap_block{layer}.png"
    save_png(grid(tiles, labels, cols=math.ceil(math.sqrt(len(tiles)))), path)
    write_json(run_dir / f"heatmap_block{layer}.json", {
        "text": text, "images": [str(files[i]) for i, _ in run.heat],
        "patch_sums": [float(h[1:].sum()) for _, h in run.heat],
        "class_token": [float(h[0]) for _, h in run.heat]})
    return path


def _word_list(decomp, texts, n) -> str:
    if decomp is None:
        return ""
    return "; ".join(f"{texts[i]} ({c:+.3f})" for i, c in decomp.terms[:n])


def _write_tables(run_dir, result: EffectsResult, runs, texts, files, cfg) -> None:
    rows, tensors, words_json = [], {}, {}
    for layer, summaries in result.summaries.items():
        run, decomps = runs[layer], result.words.get(layer)
        first_norm = (run.first_norm_total / max(1, len(files))).tolist()
        for j, s in enumerate(summaries):
            d = decomps[j] if decomps else None
            rows.append({"layer": layer, "neuron": s.neuron,
                         "explained_variance": f"{s.explained:.4f}",
                         "significant_fraction": f"{s.significant:.4f}",
                         "top_norm_mean": f"{s.top_norm_mean:.4g}",
                         "top_share": f"{s.top_share:.4f}", "norm_median": f"{s.norm_median:.4g}",
                         "norm_p99": f"{s.norm_p99:.4g}", "norm_max": f"{s.norm_max:.4g}",
                         "first_order_norm_mean": f"{first_norm[j]:.4g}",
                         "reconstruction_cosine": "" if d is None else f"{d.cosine:.4f}",
                         "top_words": _word_list(d, texts, cfg.top_words)})
            if d is not None:
                words_json[f"{layer}.{s.neuron}"] = {
                    "cosine": d.cosine, "terms": [[texts[i], c] for i, c in d.terms]}
        prefix = f"block{layer}."
        tensors[prefix + "neurons"] = run.maps.neurons
        tensors[prefix + "components"] = torch.stack([s.component for s in summaries])
        tensors[prefix + "explained"] = torch.tensor([s.explained for s in summaries])
        tensors[prefix + "mean_second"] = run.mean
        tensors[prefix + "mean_first"] = run.first_mean
        tensors[prefix + "top_norms"], tensors[prefix + "top_images"] = run.top.ranked()
    with open(run_dir / "neurons.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              str(run_dir / "components.safetensors"))
    write_json(run_dir / "words.json", words_json)
    write_json(run_dir / "images.json", [str(p) for p in files])


def _write_sheets(run_dir, result, files, texts, cfg, size) -> None:
    for layer, summaries in result.summaries.items():
        strongest = sorted(summaries, key=lambda s: -s.top_norm_mean)[:cfg.sheets]
        decomps = result.words.get(layer)
        index = {s.neuron: j for j, s in enumerate(summaries)}
        for s in strongest:
            shown = s.top_images[:cfg.sheet_images]
            _sheet(files, shown, [f"{v:.3g}" for v in s.top_norms],
                   run_dir / "sheets" / f"block{layer}_neuron{s.neuron}.png", size)
            if decomps:
                d = decomps[index[s.neuron]]
                (run_dir / "sheets" / f"block{layer}_neuron{s.neuron}.txt").write_text(
                    _word_list(d, texts, cfg.components).replace("; ", "\n") + "\n")


# ---------------------------------------------------------------- ablation

def _ablate(target, runs, cfg, result: EffectsResult, labelled) -> None:
    files, labels, present = labelled
    classes = present if cfg.zeroshot_classes == "present" else list(range(1000))
    classifier = zeroshot_classifier(target, classes, progress=cfg.progress).to(target.device)
    label_of = dict(zip(files, labels))
    counters = {layer: AblationCounter(classifier.cpu(), classes, cfg.ablate_keep)
                for layer in runs}
    for _, _, used, rec, scale in _batches(target, files, list(runs), cfg, "ablation"):
        truth = torch.tensor([label_of[p] for p in used])
        emb = rec.embedding * scale[:, None]
        for layer, run in runs.items():
            ablated = _ablated_embeddings(rec, run, emb, scale, cfg,
                                          _common(target, rec, run))
            counters[layer].update(emb.cpu(), truth, {k: v.cpu() for k, v in ablated.items()})
    result.accuracy = {layer: {**c.accuracy(), "images": c.total, "classes": len(classes)}
                       for layer, c in counters.items()}


def _ablated_embeddings(rec, run, emb, scale, cfg, common=None) -> dict[int, torch.Tensor]:
    """emb - sum over ablated neurons of (effect - mean), for each --ablate_keep N."""
    coef = dec.coefficients(rec, run.maps)
    n = len(run.maps.neurons)
    parts = _chunks(n, cfg.neuron_chunk)
    norms, every = emb.new_zeros(len(emb), n), torch.zeros_like(emb)

    def centred(part):
        second = dec.second_order(coef, run.maps, part, common) * scale[:, None, None]
        return second - run.mean[part].to(second)

    for part in parts:
        c = centred(part)
        norms[:, part] = c.norm(dim=-1)
        every += c.sum(1)
    out = {}
    for keep in cfg.ablate_keep:
        if keep == 0:
            out[keep] = emb - every
            continue
        top = norms.topk(min(keep, n), dim=1).indices
        kept = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, top, True)   # (B, N)
        spared = torch.zeros_like(emb)
        for part in parts:
            spared += (centred(part) * kept[:, part, None]).sum(1)
        out[keep] = emb - every + spared
    return out


# ---------------------------------------------------------------- the run

def _run_name(cfg, layers) -> str:
    model = Path(cfg.model).stem if Path(cfg.model).suffix else cfg.model.replace("/", "-")
    return cfg.run_name or f"{model}_block{'-'.join(map(str, layers))}_{Path(cfg.probe_dir).name}"


def layer_runs(target, layers, neurons, cfg) -> dict[int, LayerRun]:
    """The image-independent maps of every layer, with empty trackers."""
    runs = {}
    for layer in layers:
        maps = dec.effect_maps(target.module, layer, neurons.to(target.device), cfg.neuron_chunk,
                               centre=cfg.shares != "official")
        runs[layer] = LayerRun(maps, MeanTracker(len(neurons), maps.first.shape[1]),
                               MeanTracker(len(neurons), maps.first.shape[1]))
        if not maps.blocks:
            print(f"note: block {layer} is the last block; no later attention head reads it, "
                  "so its second-order effects are zero", file=sys.stderr)
    return runs


def resolve(cfg: EffectsCFG) -> EffectsCFG:
    """``cfg`` with every protocol-decided setting concrete: the protocol's value unless the
    flag was given (not None)."""
    if cfg.protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {cfg.protocol!r}; valid: {', '.join(PROTOCOLS)}")
    values = {k: v for k, v in PROTOCOLS[cfg.protocol].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **values)


def run_effects(cfg: EffectsCFG, argv=None):
    """neuron_effects.py: returns (run folder, EffectsResult)."""
    cfg = resolve(cfg)
    target, layers, neurons, files, texts = prepare(cfg)
    labelled = labelled_folder(cfg.ablate_dir or cfg.probe_dir) if cfg.ablate else None
    direction = None
    if cfg.heatmap:
        direction = encode_texts(target.clip, [cfg.heatmap], target.device)[0].to(target.device)
    runs = layer_runs(target, layers, neurons, cfg)
    if cfg.resume:
        run_dir, progress = _load_checkpoint(cfg, files, runs)
        print(f"resuming {run_dir} at pass {progress.stage}, file {progress.consumed}")
    else:
        run_dir, progress = make_run_dir(cfg.out_dir, _run_name(cfg, layers)), Progress()
        write_json(run_dir / "config.json", run_metadata(
            cfg, argv, model=str(target.spec), weight_hash=target.weight_hash, layers=layers,
            probe_images=len(files)))
    probe = files
    try:
        if progress.stage == 1:
            files = pass_means(target, probe, runs, cfg, progress)
        else:
            files = [probe[i] for i in progress.read]
        pass_top(target, files, runs, cfg, direction, progress)
    except KeyboardInterrupt as err:   # Ctrl-C, or SIGTERM (vital.cli.Terminated)
        save_checkpoint(run_dir, cfg, probe, runs, progress)
        stopped = getattr(err, "stopped_as", "interrupted")
        print(f"{stopped}: the sums so far are saved in {run_dir / CHECKPOINT}; finish the "
              f"run with the same command and --resume {run_dir}", file=sys.stderr)
        return run_dir, EffectsResult(run_dir=run_dir, stopped=stopped)
    for name in (CHECKPOINT, CHECKPOINT_JSON):
        (run_dir / name).unlink(missing_ok=True)
    result = EffectsResult(run_dir=run_dir, images=len(files), files=files, texts=texts,
                           target=target)
    atoms = None
    if texts is not None:
        atoms = dictionary(text_embeddings(target, texts, progress=cfg.progress),
                           cfg.dictionary)
    for layer, run in runs.items():
        result.summaries[layer] = summarise(run.maps.neurons.cpu(), run.top)
        if atoms is not None:
            comps = torch.stack([s.component for s in result.summaries[layer]])
            result.words[layer] = sparse_decompose(comps, atoms, cfg.components)
        if run.heat:
            _write_heatmaps(run_dir, files, layer, run, target.input_size, cfg.heatmap)
    _write_tables(run_dir, result, runs, texts, files, cfg)
    _write_sheets(run_dir, result, files, texts, cfg, target.input_size)
    if cfg.ablate:
        _ablate(target, runs, cfg, result, labelled)
        write_json(run_dir / "ablation.json", result.accuracy)
        for layer, acc in result.accuracy.items():
            said = ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items()
                             if k not in ("images", "classes"))
            print(f"block {layer} zero-shot accuracy ({acc['images']} images): {said}")
    print(f"wrote {run_dir}")
    return run_dir, result
