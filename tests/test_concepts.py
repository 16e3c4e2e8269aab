"""Concept banks: patches, NMF, non-negativity, Sobol ranking, register tokens, the bank on
disk, the direction objective, and concept_neurons_fvis.py + faceted_fvis.py end to end."""
import json

import pytest
import torch
import torch.nn as nn

from helpers import TINY_CNN, assert_png_equals, assert_png_shows, run_script
from vital.concepts import extract as C
from vital.concepts import sobol
from vital.concepts.bank import BankError, ConceptBank, bank_paths, load_bank, save_bank
from vital.models import load_target
from vital.modes import runner
from vital.modes.concepts import ConceptCFG, run_concepts
from vital.refs.images import load_images


@pytest.fixture
def no_opinion(monkeypatch):
    """The CLIP opinion embeds 49k vocabulary words; test_class_clip covers it."""
    monkeypatch.setattr(runner, "make_opinion", lambda *a, **k: None)


def _cfg(tmp_path, ref_folder, **kw):
    base = dict(model=TINY_CNN, target="3", ref_dir=str(ref_folder),
                size=32, steps_multires=[3, 3], save_steps=3, out_dir=str(tmp_path / "out"),
                run_name="c", progress=False, device="cpu", n_concepts=3, sobol_designs=4,
                rank_images=2, top_patches=4)
    base.update(kw)
    return ConceptCFG(**base)


# ---------------------------------------------------------------- patches and NMF

def _patches(target, files, settings) -> torch.Tensor:
    """The patches (M, 3, size, size) a bank is extracted from."""
    return C.extract_bank(target, files, settings)[1]


def test_patch_boxes_cut_the_same_patches_again(tiny_cnn_target, ref_folder):
    settings = C.ExtractSettings(layer="stage2", size=16, patch_frac=0.5, patch_stride=0.5)
    files = sorted(ref_folder.iterdir())
    bank, patches = C.extract_bank(tiny_cnn_target, files, settings)
    boxes, used, canvas = bank.tensors["boxes"], bank.meta["files"], bank.meta["canvas"]
    assert canvas == 32 and used == [str(f) for f in files] and len(boxes) == 4 * 9   # 3 x 3 each
    assert set(boxes[:, 1].tolist()) == {0, 8, 16} and set(boxes[:, 3].tolist()) == {16}
    images, _ = load_images(used, canvas)
    torch.testing.assert_close(C.crop_boxes(images, boxes), patches)
    i, t, l, s = boxes[13].tolist()
    torch.testing.assert_close(patches[13], images[i, :, t:t + s, l:l + s])


def test_nmf_reconstruction_error_falls_as_components_grow(tiny_cnn_target, ref_folder):
    settings = C.ExtractSettings(layer="stage1", size=32, patch_frac=0.5, patch_stride=0.25)
    patches = _patches(tiny_cnn_target, sorted(ref_folder.iterdir()), settings)
    view = C.layer_view(tiny_cnn_target, "stage1")
    acts = C.layer_activations(tiny_cnn_target, view, patches, C.RegisterRule())
    x = C.pooled(acts, "relu")
    errors = [C.factorise(x, k, max_iter=2000)[2]["relative_error"] for k in (1, 2, 4, 8, 16)]
    assert all(b <= a + 1e-4 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]
    u, w, _ = C.factorise(x, 4)
    assert (u >= 0).all() and (w >= 0).all() and u.shape == (len(x), 4)
    refit = C.coefficients(x, w, max_iter=2000)       # fixed W gives back (nearly) the same U
    torch.testing.assert_close(refit @ w, u @ w, atol=0.02 * float(x.max()), rtol=0)
    with pytest.raises(ValueError, match="cannot find"):
        C.factorise(x, 17)


def test_split_nonneg_is_lossless_and_auto_picks_relu_only_for_nonneg_data():
    x = torch.randn(2, 5, 7)
    a = C.to_nonneg(x, "split")
    assert a.shape == (2, 10, 7) and (a >= 0).all()
    torch.testing.assert_close(C.from_nonneg(a, "split"), x)
    assert C.resolve_nonneg("auto", 0.0) == "relu" and C.resolve_nonneg("auto", -1e-3) == "split"
    with pytest.raises(ValueError, match="valid"):
        C.resolve_nonneg("abs", 0.0)


# ---------------------------------------------------------------- Sobol

def test_sobol_design_replicates_a_with_one_column_from_b():
    n, d = 8, 3
    rows = sobol.design(d, n)
    a, b, c = rows[:n], rows[n:2 * n], rows[2 * n:].reshape(d, n, d)
    for i in range(d):
        other = [j for j in range(d) if j != i]
        torch.testing.assert_close(c[i][:, i], b[:, i])
        torch.testing.assert_close(c[i][:, other], a[:, other])
    with pytest.raises(ValueError, match="power of two"):
        sobol.design(3, 6)


def test_jansen_matches_the_analytic_indices_of_a_linear_model():
    # f = sum a_i x_i, x_i ~ U[0, 1] independent: ST_i = a_i^2 / sum a_j^2
    coef = torch.tensor([3.0, 1.0, 0.0, 2.0])
    n = 1024
    rows = sobol.design(4, n)
    st = sobol.jansen_total(rows @ coef, n, 4)
    torch.testing.assert_close(st, coef ** 2 / (coef ** 2).sum(), atol=0.02, rtol=0)
    # an interaction: f = x0 * x1 -> ST_0 = ST_1 = (1/3 * 1/12 + 1/144) / Var, Var = 7/144
    f = rows[:, 0] * rows[:, 1]
    st = sobol.jansen_total(f, n, 4)
    expected = (1 / 12 * 1 / 3) / (7 / 144)          # E[Var(f | x1)] / Var f = 4/7
    torch.testing.assert_close(st[:2], torch.full((2,), expected), atol=0.03, rtol=0)
    assert st[2:].abs().max() < 1e-6


class _ChannelZeroHead(nn.Module):
    """conv -> ReLU (``feat``, 4 channels) -> mean -> logit 0 reads channel 0 only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.class_names = ["a", "b"]
        self.feat = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[0, 0] = 1.0

    def forward(self, x):
        return self.fc(self.feat(x).mean((2, 3)))


@pytest.mark.parametrize("method", ["sobol", "gradient"])
def test_only_concepts_the_output_reads_are_important(method):
    target = load_target(_ChannelZeroHead(), input_size=16)
    bank = ConceptBank({"directions": torch.eye(4)}, {"layer": "feat", "nonneg": "relu"})
    images = torch.rand(2, 3, 16, 16)
    C.rank_concepts(target, bank, images, lambda out, ref: out[:, 0],
                    C.RankSettings(method, designs=16), C.RegisterRule())
    imp = bank.tensors["importance"]
    assert imp[0] > 1e-4 and imp[1:].abs().max() < 1e-6, imp
    assert bank.order()[0] == 0


@pytest.mark.parametrize("layer", ["block.0", "embed"])
def test_gradient_ranking_of_channel_concepts_is_gradient_times_activation(tiny_clip_file, layer):
    """With every channel of the split space its own concept (directions = identity), the
    gradient ranking of a concept is |gradient x activation| of its channel summed over the
    patch tokens, computed here by hooking the layer: checks the (B, C, P) <-> layout plumbing
    of the edited forward (it must rebuild the layer exactly at scale 1) and that the class token
    is left alone."""
    target = load_target(str(tiny_clip_file))
    view = C.layer_view(target, layer)
    assert view.skip == 1 and view.stream == layer
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with target.hooks([layer]) as feats:
        out = target(image.clone().requires_grad_(True))
        (grad,) = torch.autograd.grad(out[0, 0], feats[layer])        # (1, 1+N, D)
        acts = feats[layer][0, 1:].detach()                            # patch tokens (N, D)
    g = grad[0, 1:]
    expected = torch.cat([(acts.clamp_min(0) * g).sum(0), (-(-acts).clamp_min(0) * g).sum(0)])
    assert expected.abs().max() > 1e-3                                 # the layer reaches out[0]
    bank = ConceptBank({"directions": torch.eye(2 * acts.shape[1])},
                       {"layer": layer, "nonneg": "split"})
    C.rank_concepts(target, bank, image, lambda out, ref: out[:, 0], C.RankSettings("gradient"),
                    C.RegisterRule())
    torch.testing.assert_close(bank.tensors["importance"], expected.abs(), rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- registers

def test_high_norm_tokens_flags_planted_tokens():
    stream = torch.randn(2, 10, 8)
    stream[0, 3] *= 50
    stream[1, 7] *= 50
    rel = C.high_norm_tokens(stream, C.RegisterRule(threshold=4.0, relative=True))
    assert rel.nonzero().tolist() == [[0, 3], [1, 7]]
    absolute = C.high_norm_tokens(stream, C.RegisterRule(threshold=1e9, relative=False))
    assert not absolute.any()


# ---------------------------------------------------------------- bank on disk

def _bank():
    tensors = {"directions": torch.rand(3, 5), "coefficients": torch.rand(7, 3),
               "boxes": torch.randint(0, 9, (7, 4)), "top_patches": torch.randint(0, 7, (3, 2)),
               "importance": torch.tensor([0.1, 0.5, 0.2])}
    return ConceptBank(tensors, {"layer": "stage2", "weight_hash": "abc", "files": ["x.png"]})


def test_bank_round_trips_and_corruption_is_detected(tmp_path):
    bank = _bank()
    (tmp_path / "run").mkdir()
    path = save_bank(bank, tmp_path / "run")             # a folder is accepted too
    assert path == tmp_path / "run" / "concept_bank.safetensors"
    back = load_bank(path.with_suffix(".json"))
    assert back.tensors.keys() == bank.tensors.keys()
    for k, v in bank.tensors.items():
        assert torch.equal(back.tensors[k], v), k
    assert back.meta["layer"] == "stage2" and back.order() == [1, 2, 0]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF                                        # flip a bit in the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(BankError, match="corrupt"):
        load_bank(path)
    path.unlink()
    with pytest.raises(BankError, match="does not exist"):
        load_bank(tmp_path / "run")
    save_bank(bank, tmp_path / "run")
    _, meta = bank_paths(tmp_path / "run")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": "other"}))
    with pytest.raises(BankError, match="not a concept bank"):
        load_bank(tmp_path / "run")


# ---------------------------------------------------------------- objective

def test_direction_objective_lowers_its_loss(tiny_cnn_target):
    direction = torch.rand(1, 32)
    obj = C.direction_objective("stage2", direction, "relu")
    image = torch.rand(1, 3, 32, 32).requires_grad_(True)
    opt = torch.optim.Adam([image], lr=0.05)

    def loss():
        with tiny_cnn_target.hooks(["stage2"]) as feats:
            tiny_cnn_target(image.clamp(0, 1))
            return obj({"features": {"stage2": feats["stage2"].flatten(2)}})
    first = loss().item()
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < first - 0.01


class _Passthrough(nn.Module):
    """Its layer ``feat`` is its input: a target whose activations the test chooses."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()

    def forward(self, x):
        return self.feat(x).mean((2, 3))


@pytest.mark.parametrize("pool", ["mean", "positions"])
def test_direction_objective_and_cosines_match_a_loop_reference(pool):
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 5)                       # (B, C, P), signed: split gives C' = 6
    dirs = torch.rand(2, 6)
    a = C.to_nonneg(feats, "split")
    ref = torch.zeros(2, 2)                            # ref[b, k]: image b, direction k
    for b in range(2):
        for k in range(2):
            if pool == "mean":
                ref[b, k] = torch.cosine_similarity(a[b].mean(-1), dirs[k], dim=0)
            else:
                ref[b, k] = sum(torch.cosine_similarity(a[b, :, q], dirs[k], dim=0)
                                for q in range(5)) / 5
    target = load_target(_Passthrough(), input_size=4, mean=(0.0,) * 3, std=(1.0,) * 3)
    images = feats.view(2, 3, 1, 5)                    # the layer sees (B, C, 1, P) as it is
    cosines = C.direction_cosines(target, C.layer_view(target, "feat"), images, dirs, "split",
                                  pool)
    torch.testing.assert_close(cosines, ref)
    obj = C.direction_objective("x", dirs, "split", pool=pool)
    torch.testing.assert_close(obj({"features": {"x": feats}}), 1 - ref.diag().mean())
    for b in range(2):                                 # every pair: one image, one direction
        for k in range(2):
            one = C.direction_objective("x", dirs[k], "split", pool=pool)
            torch.testing.assert_close(one({"features": {"x": feats[b:b + 1]}}), 1 - ref[b, k])


# ---------------------------------------------------------------- end to end

def test_concept_run_writes_bank_grid_and_run_folder(tmp_path, ref_folder):
    run_dir, result = run_concepts(_cfg(tmp_path, ref_folder))
    assert result.steps_done == 6 and result.image.shape[0] == 3   # one image per concept
    for name in ("config.json", "metrics.json", "concept_bank.safetensors", "concept_bank.json"):
        assert (run_dir / name).is_file(), name
    assert_png_equals(run_dir / "final.png", result.image[0])
    assert_png_shows(run_dir / "concepts_grid.png")
    bank = load_bank(run_dir)
    assert bank.meta["layer"] == "stage2" and bank.meta["nonneg"] == "relu"
    assert bank.meta["ranking"]["method"] == "sobol" and bank.meta["registers"]["excluded"] == 0
    assert bank.directions.shape == (3, 32) and bank.tensors["top_patches"].shape == (3, 4)
    top = bank.tensors["top_patches"]
    coeff = bank.tensors["coefficients"]
    for k in range(3):                                # top patches really are the strongest
        assert coeff[top[k], k].min() >= coeff[:, k].sort(descending=True).values[3] - 1e-6
    terms = json.loads((run_dir / "metrics.json").read_text())["steps"][0]["terms"]
    assert "direction:stage2" in terms and any(t.startswith("sort:") for t in terms)
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["concepts"]["shown"] == bank.order()
    match = json.loads((run_dir / "concepts_match.json").read_text())
    assert match["concepts"] == bank.order() and len(match["cosine"]) == 3
    view = C.layer_view(load_target(TINY_CNN), "stage2")
    direct = C.direction_cosines(load_target(TINY_CNN), view, result.image,
                                 bank.directions[bank.order()], "relu")
    torch.testing.assert_close(torch.tensor(match["cosine"]), direct)


def test_extract_only_writes_the_bank_and_stops(tmp_path, ref_folder):
    run_dir, result = run_concepts(_cfg(tmp_path, ref_folder, extract_only=True, rank="gradient",
                                        target=""))
    assert result.stopped is None and not (run_dir / "final.png").exists()
    assert_png_shows(run_dir / "concepts_patches.png")
    bank = load_bank(run_dir)
    assert bank.meta["ranking"]["method"] == "gradient"
    assert bank.meta["target"] == "each image's top class"


def test_tiny_vit_excludes_register_tokens_and_reports_the_count(tmp_path, ref_folder,
                                                                 tiny_clip_file, no_opinion):
    # independent count first: residual-stream norms of the patch tokens on the same patches
    target = load_target(str(tiny_clip_file))
    settings = C.ExtractSettings(layer="block.0", size=32)
    patches = _patches(target, sorted(ref_folder.iterdir()), settings)
    with torch.no_grad(), target.hooks(["block.0"]) as feats:
        target(patches)
        norms = feats["block.0"][:, 1:].norm(dim=-1)       # (M, N) without the class token
    limit = float(norms.flatten().quantile(0.9))
    expected = int((norms > limit).sum())
    cfg = _cfg(tmp_path, ref_folder, model=str(tiny_clip_file), target="a photo of a cat",
               exclude_registers=True, register_threshold=limit, register_relative=False, show=2)
    run_dir, result = run_concepts(cfg)
    assert result.image.shape[0] == 2
    assert_png_shows(run_dir / "concepts_grid.png")
    bank = load_bank(run_dir)
    reg = bank.meta["registers"]
    assert bank.meta["layer"] == "block.0" and bank.meta["nonneg"] == "split"
    assert reg["high_norm"] == reg["excluded"] == expected > 0
    assert reg["tokens"] == norms.numel()
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["concepts"]["registers"]["excluded"] == expected
    assert bank.tensors["importance"].abs().max() > 0      # block.0 reaches the output


@pytest.mark.slow   # the fast suite: the tiny CNN and tiny ViT runs above
def test_embedded_model_at_64px(tmp_path, ref_folder):
    cfg = _cfg(tmp_path, ref_folder, model="efficientnet-lite0", target="espresso", size=64,
               layer_block="blocks.15", rank_images=1, sobol_designs=4, n_concepts=2,
               patch_frac=0.75)
    run_dir, result = run_concepts(cfg)
    bank = load_bank(run_dir)
    assert result.steps_done == 6 and bank.meta["nonneg"] == "split"   # a linear bottleneck
    assert bank.directions.shape == (2, 640) and bank.meta["target"] == "espresso"


def test_concept_then_facet_scripts_end_to_end(tmp_path, ref_folder):
    """concept_neurons_fvis.py, then faceted_fvis.py on the bank it wrote, each in a fresh
    interpreter as a user runs them."""
    common = ["--model", TINY_CNN, "--size", "32", "--no-progress", "--device", "cpu"]
    run_script("concept_neurons_fvis.py", *common, "--target", "3", "--ref_dir", ref_folder,
               "--n_concepts", "2", "--sobol_designs", "4", "--rank_images", "1",
               "--top_patches", "4", "--steps", "2", "--out_dir", tmp_path / "c", "--run_name",
               "bank", cwd=tmp_path)
    bank_dir = tmp_path / "c" / "bank"
    bank = load_bank(bank_dir)
    assert bank.directions.shape == (2, 32) and bank.meta["n_concepts"] == 2
    assert_png_shows(bank_dir / "final.png", (32, 32))
    run_script("faceted_fvis.py", *common, "--bank", bank_dir, "--n_facets", "2",
               "--facet_patches", "4", "--steps", "2", "--out_dir", tmp_path / "f",
               "--run_name", "facets", cwd=tmp_path)
    facets = json.loads((tmp_path / "f" / "facets" / "facets.json").read_text())
    assert facets["concept"] == bank.order()[0]
    assert_png_shows(tmp_path / "f" / "facets" / "final.png", (32, 32))
    assert_png_shows(tmp_path / "f" / "facets" / "facets_grid.png")
