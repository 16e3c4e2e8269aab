"""Second-order effects of CLIP neurons (vital.effects, neuron_effects.py).

The fast computation is checked against a slow, obviously correct reference: plain loops over
heads and tokens that re-run the later blocks with the layer norms' stds and the attention
probabilities frozen at their forward values, the later MLPs bypassed, and only the neuron's
output in the residual stream."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_images
from vital.config import ConfigError
from vital.effects import decompose as dec

ROOT = Path(__file__).resolve().parent.parent


def save_clip(path: Path, width: int = 128, layers: int = 3, patch: int = 8, image: int = 32,
              embed: int = 32, seed: int = 0, scale: float = 0.05) -> Path:
    """A random CLIP ViT with the real vocabulary (tiny text tower), OpenAI layout."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=image)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = CLIP(embed, vision, text, quick_gelu=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            if scale:
                p.add_(scale * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def clip3(tmp_path_factory):
    """3 blocks, 2 heads of 64: the layer-0 neurons pass two later blocks."""
    from vital.models import load_target
    return load_target(str(save_clip(tmp_path_factory.mktemp("clip3") / "clip3.safetensors")))


@pytest.fixture(scope="module")
def clip2(tiny_clip_file):
    from vital.models import load_target
    return load_target(str(tiny_clip_file))


def images(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the slow reference

def forward_state(target, x01):
    """Every block's input stream, ln_1 input, full attention probs, MLP outputs, ln_post input."""
    visual = target.module
    state = {"block_in": {}, "probs": {}, "mlp_out": {}, "acts": {}}
    handles = []
    for i, block in enumerate(visual.transformer.resblocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, i=i: state["block_in"].__setitem__(i, a[0].double())))
        handles.append(block.attn.probs.register_forward_hook(
            lambda m, a, o, i=i: state["probs"].__setitem__(i, o.double())))
        handles.append(block.mlp.register_forward_hook(
            lambda m, a, o, i=i: state["mlp_out"].__setitem__(i, o.double())))
        handles.append(block.mlp.gelu.register_forward_hook(
            lambda m, a, o, i=i: state["acts"].__setitem__(i, o.double())))
    handles.append(visual.ln_post.register_forward_pre_hook(
        lambda m, a: state.__setitem__("post_in", a[0].double())))
    with torch.no_grad():
        state["embedding"] = target.output(x01).double()
    for h in handles:
        h.remove()
    return state


def std_of(x, eps):
    return (x.var(-1, unbiased=False) + eps).sqrt()


def frozen_ln(ln, z, std, bias):
    """Layer norm with its std frozen: (z - mean z) / std * g (+ b)."""
    out = (z - z.mean(-1, keepdim=True)) / std[..., None] * ln.weight.double()
    return out + ln.bias.double() if bias else out


def frozen_attention_cls(block, y, probs, bias):
    """Class-token output of the attention with frozen probabilities, head by head, token by
    token. y (T, D) is the ln_1 output, probs (H, T, T)."""
    attn = block.attn
    width, heads = y.shape[1], attn.heads
    dh = width // heads
    wv = attn.in_proj_weight.double()[2 * width:]
    bv = attn.in_proj_bias.double()[2 * width:]
    wo, bo = attn.out_proj.weight.double(), attn.out_proj.bias.double()
    out = bo.clone() if bias else torch.zeros(width, dtype=torch.float64)
    for h in range(heads):
        rows = slice(h * dh, (h + 1) * dh)
        mixed = torch.zeros(dh, dtype=torch.float64)
        for t in range(y.shape[0]):
            v = wv[rows] @ y[t] + (bv[rows] if bias else 0)
            mixed += probs[h, 0, t] * v
        out += wo[:, rows] @ mixed
    return out


def readout(visual, cls, post_std, bias):
    z = frozen_ln(visual.ln_post, cls, post_std, bias)
    return z @ visual.proj.double()


def reference_effects(target, state, b, layer, n):
    """(first, second) of neuron n of block ``layer`` for image b, by the re-run."""
    visual = target.module
    blocks = visual.transformer.resblocks
    w = blocks[layer].mlp.c_proj.weight.double()[:, n]
    r = state["acts"][layer][b, :, n][:, None] * w[None, :]                    # (T, D)
    post_std = std_of(state["post_in"][b], visual.ln_post.eps)
    first = readout(visual, r[0], post_std, bias=False)
    to_cls = torch.zeros_like(r[0])
    for L in range(layer + 1, len(blocks)):
        std = std_of(state["block_in"][L][b], blocks[L].ln_1.eps)
        y = frozen_ln(blocks[L].ln_1, r, std, bias=False)          # only the neuron's output
        to_cls += frozen_attention_cls(blocks[L], y, state["probs"][L][b], bias=False)
    second = readout(visual, to_cls, post_std, bias=False)
    return first, second


def frozen_rerun(target, state, b, layer, stream, constants):
    """The embedding of ``stream`` (T, D), written after block ``layer``, through the frozen
    later blocks (all tokens, so head -> head paths too); with ``constants`` the biases and
    the later MLP outputs of the forward pass are added."""
    visual = target.module
    blocks = visual.transformer.resblocks
    x = stream.clone()
    for L in range(layer + 1, len(blocks)):
        std = std_of(state["block_in"][L][b], blocks[L].ln_1.eps)
        y = frozen_ln(blocks[L].ln_1, x, std, bias=constants)
        attn = blocks[L].attn
        width = x.shape[1]
        v = y @ attn.in_proj_weight.double()[2 * width:].t()
        if constants:
            v = v + attn.in_proj_bias.double()[2 * width:]
        heads = attn.heads
        vh = v.view(-1, heads, width // heads).transpose(0, 1)               # (H, T, dh)
        mixed = (state["probs"][L][b] @ vh).transpose(0, 1).reshape(-1, width)
        x = x + mixed @ attn.out_proj.weight.double().t()
        if constants:
            x = x + attn.out_proj.bias.double() + state["mlp_out"][L][b]
    post_std = std_of(state["post_in"][b], visual.ln_post.eps)
    return readout(visual, x[0], post_std, bias=constants)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fast_effects(target, x01, layer, neurons=()):
    visual = target.module
    width = visual.transformer.resblocks[layer].mlp.c_fc.out_features
    maps = dec.effect_maps(visual, layer, dec.check_neurons(list(neurons), width), chunk=7)
    rec = dec.record(target, x01, [layer])
    coef = dec.coefficients(rec, maps)
    every = slice(None)
    return (dec.first_order(rec, maps, every), dec.second_order(coef, maps, every), rec, maps)


# ---------------------------------------------------------------- equivalence

@pytest.mark.parametrize("layer", [0, 1])
def test_fast_effects_equal_the_frozen_rerun(clip3, layer):
    x = images(2, clip3.input_size)
    neurons = [0, 5, 77, 300, 511]
    first, second, _, _ = fast_effects(clip3, x, layer, neurons)
    state = forward_state(clip3, x)
    for b in range(2):
        for j, n in enumerate(neurons):
            ref_first, ref_second = reference_effects(clip3, state, b, layer, n)
            assert rel(first[b, j].double(), ref_first) < 1e-5
            assert rel(second[b, j].double(), ref_second) < 1e-5


def test_last_block_has_only_a_direct_effect(clip3):
    x = images(1, clip3.input_size)
    first, second, _, maps = fast_effects(clip3, x, 2, [3])
    assert maps.blocks == [] and second.abs().max() == 0
    ref_first, _ = reference_effects(clip3, forward_state(clip3, x), 0, 2, 3)
    assert rel(first[0, 0].double(), ref_first) < 1e-5


def test_components_sum_to_the_embedding(clip2):
    """Two blocks, layer 0: no head -> head path exists, so the embedding is exactly the sum
    of every neuron's first- and second-order effects, the re-run of the rest of the stream
    after block 0 (earlier blocks, c_proj bias), and the constants (biases, later MLPs)."""
    x = images(3, clip2.input_size, seed=1)
    first, second, rec, maps = fast_effects(clip2, x, 0)
    state = forward_state(clip2, x)
    w = clip2.module.transformer.resblocks[0].mlp.c_proj.weight.double()      # (D, 4D)
    for b in range(3):
        neurons_out = state["acts"][0][b] @ w.t()                             # (T, D)
        after = state["block_in"][1][b]
        rest = frozen_rerun(clip2, state, b, 0, after - neurons_out, constants=True)
        total = first[b].double().sum(0) + second[b].double().sum(0) + rest
        assert rel(total, state["embedding"][b]) < 1e-5
        # and the frozen re-run of the whole stream is the real forward (the freezing is exact)
        assert rel(frozen_rerun(clip2, state, b, 0, after, True), state["embedding"][b]) < 1e-5


def test_higher_order_terms_complete_the_sum_with_more_blocks(clip3):
    """Three blocks, layer 0: the neurons' head -> head paths are the remaining terms."""
    x = images(1, clip3.input_size, seed=2)
    first, second, rec, maps = fast_effects(clip3, x, 0)
    state = forward_state(clip3, x)
    w = clip3.module.transformer.resblocks[0].mlp.c_proj.weight.double()
    neurons_out = state["acts"][0][0] @ w.t()
    all_paths = frozen_rerun(clip3, state, 0, 0, neurons_out, constants=False)
    higher = all_paths - first[0].double().sum(0) - second[0].double().sum(0)
    rest = frozen_rerun(clip3, state, 0, 0, state["block_in"][1][0] - neurons_out, True)
    total = first[0].double().sum(0) + second[0].double().sum(0) + higher + rest
    assert rel(total, state["embedding"][0]) < 1e-5
    assert 0 < higher.norm() < second.double().sum(1).norm()   # small, not zero


def test_token_projection_sums_to_the_projected_effect(clip3):
    x = images(2, clip3.input_size)
    first, second, rec, maps = fast_effects(clip3, x, 1)
    direction = F.normalize(torch.randn(second.shape[-1]), dim=0)
    per_token = dec.token_projection(rec, maps, direction)                    # (B, T)
    assert per_token.shape == (2, 1 + (clip3.input_size // 8) ** 2)
    torch.testing.assert_close(per_token.sum(1), second.sum(1) @ direction, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.slow
def test_fast_effects_equal_the_rerun_on_vit_b32(tmp_path):
    from vital.models import load_target
    target = load_target(str(save_clip(tmp_path / "b32.safetensors", width=768, layers=12,
                                       patch=32, image=224, embed=512, scale=0)))
    x = images(1, 224)
    neurons = [0, 1234, 3071]
    first, second, _, _ = fast_effects(target, x, 9, neurons)
    state = forward_state(target, x)
    for j, n in enumerate(neurons):
        ref_first, ref_second = reference_effects(target, state, 0, 9, n)
        assert rel(first[0, j].double(), ref_first) < 1e-5
        assert rel(second[0, j].double(), ref_second) < 1e-5


# ---------------------------------------------------------------- bad input (library level)

def test_bad_layers_and_neurons():
    with pytest.raises(ConfigError, match="no MLP neurons"):
        dec.parse_layer("block.1.attn", 3)
    with pytest.raises(ConfigError, match="blocks 0..2"):
        dec.parse_layer("block.7.mlp", 3)
    assert dec.parse_layer("block.2.mlp", 3) == dec.parse_layer("2", 3) == 2
    with pytest.raises(ConfigError, match="out of range"):
        dec.check_neurons([4, 512], 512)


def test_a_cnn_is_refused(tiny_cnn_target):
    with pytest.raises(ConfigError, match="need a CLIP ViT"):
        dec.clip_vit(tiny_cnn_target)


# ---------------------------------------------------------------- statistics and PCA

def test_top_tracker_keeps_the_k_largest_over_batches():
    from vital.effects.stats import TopTracker, first_component, summarise
    gen = torch.Generator().manual_seed(0)
    effects = torch.randn(10, 3, 4, generator=gen)                           # (images, N, E)
    top = TopTracker(3, 4, 4)
    for start in range(0, 10, 3):
        chunk = effects[start:start + 3]
        top.start_batch(len(chunk), 3)
        top.update(slice(0, 2), chunk[:, :2], start)
        top.update(slice(2, 3), chunk[:, 2:], start)
        top.end_batch()
    norms = effects.norm(dim=-1)
    torch.testing.assert_close(top.norms(), norms)
    values, index = top.ranked()
    for n in range(3):
        want = norms[:, n].topk(4).indices
        assert index[n].tolist() == want.tolist()
        slots = [top.index[n].tolist().index(i) for i in want.tolist()]
        torch.testing.assert_close(top.vectors[n, slots], effects[want, n])
    summaries = summarise(torch.tensor([7, 8, 9]), top)
    for n, s in enumerate(summaries):
        component, explained = first_component(effects[index[n], n])
        torch.testing.assert_close(s.component, component, rtol=1e-5, atol=1e-6)
        assert abs(s.explained - explained) < 1e-6 and s.neuron == 7 + n
        assert abs(s.significant - 0.4) < 1e-6 and s.top_images == index[n].tolist()


def test_top_tracker_with_fewer_images_than_k():
    from vital.effects.stats import TopTracker, summarise
    effects = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(1))
    top = TopTracker(2, 10, 5)
    top.start_batch(3, 2)
    top.update(slice(0, 2), effects, 0)
    top.end_batch()
    s = summarise(torch.tensor([0, 1]), top)
    assert sorted(s[0].top_images) == [0, 1, 2] and s[0].significant == 1.0


def test_first_component_is_signed_toward_most_images():
    from vital.effects.stats import first_component
    gen = torch.Generator().manual_seed(0)
    direction = F.normalize(torch.randn(8, generator=gen), dim=0)
    scores = torch.tensor([3.0, 2.5, 2.0, 1.5, -1.0])
    vectors = scores[:, None] * direction + 0.01 * torch.randn(5, 8, generator=gen)
    component, explained = first_component(vectors)
    assert float(component @ direction) > 0.999 and explained > 0.99
    component, _ = first_component(-vectors)     # most now project negatively on direction
    assert float(component @ direction) < -0.999


# ---------------------------------------------------------------- texts

def test_omp_recovers_a_component_built_from_known_texts():
    from vital.effects.texts import dictionary, sparse_decompose
    gen = torch.Generator().manual_seed(0)
    atoms = dictionary(F.normalize(torch.randn(300, 64, generator=gen), dim=-1))
    truth = {17: 0.8, 123: -0.5, 250: 0.3}
    component = F.normalize(sum(c * atoms[i] for i, c in truth.items()), dim=0)
    (found,) = sparse_decompose(component[None], atoms, k=3)
    assert sorted(i for i, _ in found.terms) == sorted(truth)
    assert found.terms[0][0] == 17 and found.cosine > 0.9999
    ratio = dict(found.terms)[123] / dict(found.terms)[17]
    assert abs(ratio - (-0.5 / 0.8)) < 1e-6


def test_official_dictionary_equals_a_loop_of_the_official_formula():
    """``text - mean(axis=0)``, then each embedding dimension divided by its norm over the
    texts and times 100 (compute_sparse_decomposition.py), as an explicit loop."""
    from vital.effects.texts import dictionary
    gen = torch.Generator().manual_seed(1)
    texts = F.normalize(torch.randn(40, 12, generator=gen), dim=-1).double()
    want = torch.empty_like(texts)
    for j in range(texts.shape[1]):
        column = [float(texts[i, j]) for i in range(texts.shape[0])]
        mean = sum(column) / len(column)
        norm = sum((v - mean) ** 2 for v in column) ** 0.5
        for i, v in enumerate(column):
            want[i, j] = 100.0 * (v - mean) / norm
    torch.testing.assert_close(dictionary(texts.float(), "dimensions").double(), want,
                               rtol=1e-5, atol=1e-4)
    rows = dictionary(texts.float(), "texts")
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(40))


def test_omp_recovers_planted_texts_in_the_official_dictionary():
    """A component planted as a combination of three texts of the official dictionary: the
    three come out on top (precision@3 = 1) with the planted ratios."""
    from vital.effects.texts import dictionary, sparse_decompose
    gen = torch.Generator().manual_seed(2)
    atoms = dictionary(F.normalize(torch.randn(400, 64, generator=gen), dim=-1), "dimensions")
    truth = {5: 0.7, 211: 0.4, 390: -0.3}
    component = F.normalize(sum(c * atoms[i] for i, c in truth.items()), dim=0)
    (found,) = sparse_decompose(component[None], atoms, k=32)
    assert sorted(i for i, _ in found.terms[:3]) == sorted(truth) and found.cosine > 0.9999
    assert dict(found.terms)[390] / dict(found.terms)[5] == pytest.approx(-0.3 / 0.7, abs=1e-6)


def test_protocol_sets_defaults_and_flags_win():
    from vital.effects.run import PROTOCOLS, EffectsCFG, resolve
    official = resolve(EffectsCFG())
    assert (official.normalise, official.dictionary, official.components, official.shares) == (
        "embedding", "dimensions", 32, "official") and official.protocol == "official"
    toolkit = resolve(EffectsCFG(protocol="toolkit"))
    assert (toolkit.normalise, toolkit.dictionary, toolkit.components, toolkit.shares) == (
        "none", "texts", 16, "exact")
    mine = resolve(EffectsCFG(components=8, normalise="none"))
    assert (mine.normalise, mine.dictionary, mine.components) == ("none", "dimensions", 8)
    assert set(PROTOCOLS["official"]) == set(PROTOCOLS["toolkit"])
    with pytest.raises(ConfigError, match="unknown protocol"):
        resolve(EffectsCFG(protocol="paper"))


def test_batched_omp_equals_scikit_learn():
    from sklearn.linear_model import orthogonal_mp
    from vital.effects.texts import dictionary, omp
    gen = torch.Generator().manual_seed(3)
    atoms = dictionary(torch.randn(500, 48, generator=gen))
    targets = F.normalize(torch.randn(7, 48, generator=gen), dim=-1)
    chosen, coef = omp(atoms, targets, 6, chunk=3)
    dense = torch.zeros(7, 500, dtype=torch.float64).scatter_(1, chosen, coef)
    want = orthogonal_mp(atoms.double().t().numpy(), targets.double().t().numpy(),
                         n_nonzero_coefs=6, precompute=False)
    torch.testing.assert_close(dense, torch.from_numpy(want.T), rtol=1e-6, atol=1e-9)


def test_text_sets(tmp_path):
    from vital.effects.texts import text_set
    assert len(text_set("imagenet")) == 1000
    words = text_set("words20k")
    assert len(words) > 15000 and all(w.isalpha() for w in words[:100])
    (tmp_path / "t.txt").write_text("a dog\n\n  a red car \n")
    assert text_set(str(tmp_path / "t.txt")) == ["a dog", "a red car"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="has no lines"):
        text_set(str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match="neither a file nor a bundled set"):
        text_set("no_such_words.txt")


# ---------------------------------------------------------------- the script

def run_script(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "neuron_effects.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def labelled(tmp_path):
    root = tmp_path / "labelled"
    write_images(root / "goldfish", 3, seed=1)
    write_images(root / "espresso", 3, seed=2)
    return root


def test_script_runs_end_to_end(tiny_clip_file, tmp_path):
    write_images(tmp_path / "probe" / "sub", 7)
    (tmp_path / "texts.txt").write_text("a dog\na cat\na car\nthe sea\na red apple\nmusic\n")
    folder = labelled(tmp_path)
    out = run_script(["--model", str(tiny_clip_file), "--layer", "0", "block.1.mlp",
                      "--neurons", "0", "3", "10", "--probe_dir", str(tmp_path / "probe"),
                      "--batch_size", "3", "--neuron_chunk", "2", "--top_k", "4",
                      "--texts", str(tmp_path / "texts.txt"), "--components", "2",
                      "--sheets", "2", "--heatmap", "a dog", "--ablate",
                      "--ablate_dir", str(folder), "--ablate_keep", "0", "1",
                      "--zeroshot_classes", "present", "--out_dir", str(tmp_path / "out"),
                      "--run_name", "tiny", "--no-progress", "--visualise", "1",
                      "--vis_steps", "2", "--vis_refs", "3"], tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "out" / "tiny"
    rows = list(csv.DictReader(open(run / "neurons.csv")))
    assert [(r["layer"], r["neuron"]) for r in rows] == [
        ("0", "0"), ("0", "3"), ("0", "10"), ("1", "0"), ("1", "3"), ("1", "10")]
    assert all(0 < float(r["explained_variance"]) <= 1 for r in rows[:3])
    assert all(abs(float(r["significant_fraction"]) - 4 / 7) < 1e-3 for r in rows[:3])
    assert all(r["top_words"] for r in rows[:3])
    # block 1 is the last block: no later head, zero second-order effects, nothing to describe
    assert all(float(r["explained_variance"]) == 0 and not r["top_words"] for r in rows[3:])
    from safetensors.torch import load_file
    comps = load_file(str(run / "components.safetensors"))
    assert comps["block0.components"].shape == (3, 32)
    torch.testing.assert_close(comps["block0.components"].norm(dim=-1), torch.ones(3))
    assert len(list((run / "sheets").glob("block0_*.png"))) == 2
    assert (run / "heatmap_block0.png").is_file()
    acc = json.loads((run / "ablation.json").read_text())
    assert set(acc["0"]) == {"none", "all", "all_but_top1", "images", "classes"}
    assert acc["0"]["images"] == 6
    config = json.loads((run / "config.json").read_text())
    assert config["cfg"]["layer"] == ["0", "block.1.mlp"] and config["probe_images"] == 7
    assert (config["cfg"]["protocol"], config["cfg"]["normalise"], config["cfg"]["dictionary"],
            config["cfg"]["components"]) == ("official", "embedding", "dimensions", 2)
    assert "block 0 zero-shot accuracy" in out.stdout
    # --visualise 1: the strongest neuron of block 0 (block 1 has no second-order direction)
    strips = list((run / "visuals").glob("block*_neuron*.png"))
    assert [p.name.split("_")[0] for p in strips] == ["block0"]
    assert (run / "visuals" / strips[0].stem / "final.png").is_file()
    assert "cosine" in strips[0].with_suffix(".txt").read_text()


def test_mean_ablation_of_everything_matches_direct_sum(clip3):
    """Ablating all neurons with their own means on the probe set itself leaves the average
    embedding unchanged: sum over images of (effect - mean) is zero."""
    from vital.effects.run import EffectsCFG, LayerRun, _ablated_embeddings
    from vital.effects.stats import MeanTracker
    x = images(5, clip3.input_size)
    first, second, rec, maps = fast_effects(clip3, x, 0)
    run = LayerRun(maps, MeanTracker(1, 1), MeanTracker(1, 1), mean=second.mean(0))
    cfg = EffectsCFG(neuron_chunk=100, ablate_keep=[0, 3, 10_000])
    scale = torch.ones(5)
    out = _ablated_embeddings(rec, run, rec.embedding, scale, cfg)
    torch.testing.assert_close(out[0].mean(0), rec.embedding.mean(0), rtol=1e-4, atol=1e-5)
    want = rec.embedding - second.sum(1) + second.mean(0).sum(0)
    torch.testing.assert_close(out[0], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[10_000], rec.embedding)       # every neuron kept
    norms = (second - second.mean(0)).norm(dim=-1)
    keep = norms.topk(3, dim=1).indices
    spared = torch.stack([(second - second.mean(0))[b, keep[b]].sum(0) for b in range(5)])
    torch.testing.assert_close(out[3], want + spared, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args, says", [
    (["--layer", "block.0.attn"], "has no MLP neurons"),
    (["--layer", "0", "--neurons", "99999"], "out of range"),
    (["--probe_dir", "EMPTY"], "holds no images"),
    (["--texts", "NOLINES"], "has no lines"),
    (["--ablate", "--ablate_dir", "BADCLASS"], "is not an ImageNet class name"),
])
def test_bad_input_is_one_sentence(tiny_clip_file, tmp_path, capsys, args, says):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nolines.txt").write_text("\n")
    write_images(tmp_path / "badclass" / "goldfsh_and_chips", 1)
    probe = write_images(tmp_path / "probe", 2)
    base = {"--model": str(tiny_clip_file), "--probe_dir": str(probe), "--layer": "0",
            "--out_dir": str(tmp_path / "out"), "--texts": "imagenet"}
    args = [a.replace("EMPTY", str(tmp_path / "empty")).replace("NOLINES",
            str(tmp_path / "nolines.txt")).replace("BADCLASS", str(tmp_path / "badclass"))
            for a in args]
    for key, value in base.items():
        if key not in args:
            args += [key, value]
    assert_one_sentence(args, says, capsys)
    assert not (tmp_path / "out").exists()


def assert_one_sentence(argv, says, capsys):
    """What neuron_effects.py does with ``argv``, in-process (the script is these two calls)."""
    from vital.cli import main
    from vital.modes.effect_visuals import NeuronEffectsCFG, run_neuron_effects
    assert main(NeuronEffectsCFG, run_neuron_effects, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines


def test_a_classifier_is_refused_by_the_script(tmp_path, capsys):
    probe = write_images(tmp_path / "probe", 2)
    assert_one_sentence(["--model", "efficientnet-lite0", "--probe_dir", str(probe),
                         "--out_dir", str(tmp_path / "out")], "need a CLIP ViT", capsys)
    assert_one_sentence(["--model", "torchvision:resnet18?weights=none", "--probe_dir",
                         str(probe), "--out_dir", str(tmp_path / "out")], "need a CLIP ViT",
                        capsys)


# ---------------------------------------------------------------- a planted neuron

def _plant(src: Path, dest: Path, neuron: int, direction: torch.Tensor, heads: int) -> Path:
    """``vital.effects.planted.plant_direction`` on a saved model, into ``dest``."""
    from safetensors.torch import load_file, save_file
    from vital.effects.planted import plant_direction
    save_file(plant_direction(load_file(str(src)), 0, neuron, direction, heads), str(dest))
    return dest


def test_a_planted_neuron_is_recovered_with_its_words(tmp_path):
    """Issue 28: a block-0 neuron made to write a combination of three dictionary texts (the
    official dictionary): the pipeline's first PC is that direction (cosine >= 0.99), its
    words are those of the planted direction itself, the planted texts are its top 3
    (precision@3 = 1), and the first PC explains all of it. The three texts are the least
    coherent triple of the dictionary: OMP, like the official code's scikit-learn OMP, can
    only recover texts that their neighbours do not mimic (a random text tower makes 'dog'
    and 'cat' 0.97 alike)."""
    import itertools
    from vital.effects.run import EffectsCFG, run_effects
    from vital.effects.texts import dictionary, sparse_decompose, text_embeddings
    from vital.models import load_target
    words = ["dog", "cat", "car", "sea", "apple", "music", "tree", "house", "bird", "river",
             "shoe", "cloud", "bread", "train", "flower", "lamp"]
    (tmp_path / "texts.txt").write_text("\n".join(words) + "\n")
    src = save_clip(tmp_path / "clip.safetensors", layers=2, width=128, embed=32, scale=1.0)
    atoms = dictionary(text_embeddings(load_target(str(src)), words, progress=False),
                       "dimensions")
    unit = F.normalize(atoms, dim=-1)
    coherence = (unit @ unit.t()).abs()
    triple = min(itertools.combinations(range(len(words)), 3),
                 key=lambda t: max(coherence[i, j] for i, j in itertools.combinations(t, 2)))
    planted = dict(zip(triple, (1.0, 0.6, 0.35)))
    direction = F.normalize(sum(c * atoms[i] for i, c in planted.items()), dim=0)
    model = _plant(src, tmp_path / "planted.safetensors", 7, direction, heads=2)
    write_images(tmp_path / "probe", 12)
    _, result = run_effects(EffectsCFG(model=str(model), layer=["0"], probe_dir=str(
        tmp_path / "probe"), texts=str(tmp_path / "texts.txt"), top_k=6, components=3,
        sheets=0, device="cpu", out_dir=str(tmp_path / "out"), progress=False))
    index = [s.neuron for s in result.summaries[0]].index(7)
    component = result.summaries[0][index].component.double()
    assert abs(float(F.cosine_similarity(component, direction.double(), dim=0))) >= 0.99
    found = [i for i, _ in result.words[0][index].terms[:3]]
    (alone,) = sparse_decompose(direction[None], atoms, 3)
    assert found == [i for i, _ in alone.terms[:3]]
    assert set(found) == set(planted)
    assert result.summaries[0][index].explained >= 0.99   # it writes nothing else


# ---------------------------------------------------------------- stopped and resumed

@pytest.mark.parametrize("stop_at", [("effects: means", 2), ("effects: top k", 1)])
def test_a_stopped_run_saves_its_sums_and_resumes_to_the_same_result(
        tiny_clip_file, tmp_path, monkeypatch, stop_at):
    """Ctrl-C in pass 1 or pass 2 (after some batches): the checkpoint is written, the
    status is "interrupted", and --resume finishes the same folder with the same numbers as
    an uninterrupted run."""
    import safetensors.torch as st
    from vital.effects import run as run_mod
    from vital.effects.run import EffectsCFG, run_effects
    write_images(tmp_path / "probe", 9)
    (tmp_path / "texts.txt").write_text("a dog\na cat\na car\nthe sea\nmusic\n")
    base = dict(model=str(tiny_clip_file), layer=["0"], probe_dir=str(tmp_path / "probe"),
                texts=str(tmp_path / "texts.txt"), batch_size=2, top_k=3, sheets=0,
                device="cpu", progress=False, out_dir=str(tmp_path / "out"),
                heatmap="a dog", heatmap_images=5)
    whole_dir, _ = run_effects(EffectsCFG(**base, run_name="whole"))
    real = run_mod._batches
    seen = {}

    def interrupting(target, files, layers, cfg, desc, *a, **k):
        for item in real(target, files, layers, cfg, desc, *a, **k):
            seen[desc] = seen.get(desc, 0) + 1
            if (desc, seen[desc]) == (stop_at[0], stop_at[1] + 1):
                raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(run_mod, "_batches", interrupting)
    cut_dir, cut = run_effects(EffectsCFG(**base, run_name="cut"))
    assert cut.stopped == "interrupted" and (cut_dir / "checkpoint.json").is_file()
    assert not (cut_dir / "neurons.csv").exists()
    monkeypatch.setattr(run_mod, "_batches", real)
    with pytest.raises(ConfigError, match="other settings"):
        run_effects(EffectsCFG(**{**base, "top_k": 4}, resume=str(cut_dir)))
    again_dir, again = run_effects(EffectsCFG(**base, resume=str(cut_dir)))
    assert again_dir == cut_dir and again.stopped is None
    assert not (cut_dir / "checkpoint.json").exists()
    a = st.load_file(str(whole_dir / "components.safetensors"))
    b = st.load_file(str(cut_dir / "components.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert (whole_dir / "neurons.csv").read_text() == (cut_dir / "neurons.csv").read_text()


def test_resume_without_a_checkpoint_is_one_sentence(tiny_clip_file, tmp_path):
    from vital.effects.run import EffectsCFG, run_effects
    write_images(tmp_path / "probe", 3)
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        run_effects(EffectsCFG(model=str(tiny_clip_file), layer=["0"], probe_dir=str(
            tmp_path / "probe"), texts="", device="cpu", progress=False,
            resume=str(tmp_path)))


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_signals_wait_for_the_end_of_a_deferred_block(signum):
    """A batch added to running sums is never cut in half: the signal is raised after it."""
    import os
    import signal
    from vital.cli import Terminated, signals_deferred, sigterm_as_interrupt
    done = []
    # a shell's background job starts with SIGINT ignored; the test wants Python's usual handler
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with sigterm_as_interrupt():
            with pytest.raises(Terminated if signum == "SIGTERM" else KeyboardInterrupt):
                with signals_deferred():
                    os.kill(os.getpid(), getattr(signal, signum))
                    done.append("the whole batch")
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert done == ["the whole batch"]


def test_official_units_scale_each_effect_by_100_over_its_embedding_norm(clip2, tmp_path):
    """--normalise embedding (the official default): every image's effects times
    100 / |embedding| of that image, against the same sums in embedding units."""
    from vital.effects.run import EffectsCFG, layer_runs, pass_means, resolve
    from vital.refs.patches import iter_images
    files = sorted(write_images(tmp_path / "probe", 3).iterdir())
    neurons = torch.arange(6)
    totals = {}
    for units in ("none", "embedding"):
        for f in files:
            cfg = resolve(EffectsCFG(normalise=units, batch_size=1, progress=False))
            runs = layer_runs(clip2, [0], neurons, cfg)
            pass_means(clip2, [f], runs, cfg)
            totals[units, f] = runs[0].means.total
    for f in files:
        (images, _), = iter_images([f], clip2.input_size, batch=1)
        norm = float(dec.record(clip2, images, [0]).embedding.norm())
        torch.testing.assert_close(totals["embedding", f], totals["none", f] * 100.0 / norm,
                                   rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the official mean/bias shares

def test_official_shares_equal_a_loop_of_the_official_formulas(clip3):
    """vital.effects.official against the official code's steps written out one image, neuron,
    later block, head and token at a time (prs_second_order_neurons_hook.py): each part is
    centred by mean / ((1 + 2L) N) and gets every bias's equal share."""
    visual = dec.clip_vit(clip3)
    blocks, layer, neurons = visual.transformer.resblocks, 0, torch.tensor([3, 17])
    saved = {name: p.detach().clone() for name, p in visual.named_parameters() if p.ndim == 1}
    try:
        for p in visual.parameters():   # random biases: every share is exercised
            if p.ndim == 1:
                p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
        _check_official_shares(clip3, visual, blocks, layer, neurons)
    finally:
        for name, p in visual.named_parameters():
            if name in saved:
                p.data.copy_(saved[name])


def _check_official_shares(clip3, visual, blocks, layer, neurons):
    from vital.effects.official import official_second_order, record_official
    x01 = images(2, clip3.input_size, seed=4)
    fast = official_second_order(clip3, record_official(clip3, x01, layer), layer, neurons)
    stream, rows, acts = {}, {}, {}
    hooks = [blocks[layer].mlp.gelu.register_forward_hook(
        lambda m, a, out: acts.update(x=out.double()))]
    for b in range(layer + 1, len(blocks)):
        hooks.append(blocks[b].ln_1.register_forward_pre_hook(
            lambda m, a, b=b: stream.__setitem__(b, a[0].double())))
        hooks.append(blocks[b].attn.probs.register_forward_hook(
            lambda m, a, out, b=b: rows.__setitem__(b, out.double())))
    hooks.append(visual.ln_post.register_forward_pre_hook(
        lambda m, a: stream.__setitem__("post", (a[0] if a[0].ndim == 2 else a[0][:, 0])
                                        .double())))
    with torch.no_grad():
        emb = clip3.output(x01).double()
    for h in hooks:
        h.remove()
    width, n_all = visual.ln_post.weight.shape[0], blocks[layer].mlp.c_proj.weight.shape[1]
    d = lambda t: t.detach().double()   # noqa: E731
    for i in range(2):
        post = stream["post"][i]
        m_post, s_post = post.mean(), (post.var(unbiased=False) + visual.ln_post.eps).sqrt()
        for j, n in enumerate(neurons.tolist()):
            total = torch.zeros(visual.proj.shape[1], dtype=torch.float64)
            for L in range(layer + 1, len(blocks)):
                blk, attn = blocks[L], blocks[L].attn
                heads, dh, share = attn.heads, width // attn.heads, (1 + 2 * L) * n_all
                post_share = (1 + 2 * L) * (1 + 2 * len(blocks)) * heads * n_all
                for h in range(heads):
                    wv = d(attn.in_proj_weight)[2 * width:][h * dh:(h + 1) * dh]
                    bv = d(attn.in_proj_bias)[2 * width:][h * dh:(h + 1) * dh]
                    wo = d(attn.out_proj.weight)[:, h * dh:(h + 1) * dh]
                    o = torch.zeros(dh, dtype=torch.float64)
                    for t in range(stream[L].shape[1]):
                        s = stream[L][i, t]
                        mean, std = s.mean(), (s.var(unbiased=False) + blk.ln_1.eps).sqrt()
                        x = acts["x"][i, t, n] * d(blocks[layer].mlp.c_proj.weight)[:, n] \
                            + d(blocks[layer].mlp.c_proj.bias) / n_all
                        y = d(blk.ln_1.weight) * (x - mean / share) / std \
                            + d(blk.ln_1.bias) / share
                        o += rows[L][i, h, 0, t] * (wv @ y + bv / share)
                    r = wo @ o + d(attn.out_proj.bias) / (share * heads)
                    z = d(visual.ln_post.weight) * (r - m_post / post_share) / s_post \
                        + d(visual.ln_post.bias) / post_share
                    total += z @ d(visual.proj)
            torch.testing.assert_close(fast[i, j], 100 * total / emb[i].norm(),
                                       rtol=1e-9, atol=1e-9)


def test_fast_official_shares_equal_the_official_formulas(clip3):
    """The pipeline's official convention (maps without exact centring + each image's shares)
    equals vital.effects.official (checked above against a loop of the official code), with
    every bias random; the exact convention differs from it."""
    from vital.effects.official import official_second_order, record_official
    visual = dec.clip_vit(clip3)
    saved = {name: p.detach().clone() for name, p in visual.named_parameters() if p.ndim == 1}
    try:
        for p in visual.parameters():
            if p.ndim == 1:
                p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel() + 1))
        x01, layer, neurons = images(3, clip3.input_size, seed=5), 0, torch.arange(0, 40, 3)
        slow = official_second_order(clip3, record_official(clip3, x01, layer), layer, neurons)
        rec = dec.record(clip3, x01, [layer])
        scale = 100 / rec.embedding.norm(dim=-1)[:, None, None]
        maps = dec.effect_maps(visual, layer, neurons, centre=False)
        fast = dec.second_order(dec.coefficients(rec, maps), maps, slice(None),
                                dec.shares(visual, rec, maps)) * scale
        torch.testing.assert_close(fast.double(), slow, rtol=1e-4, atol=1e-4 * slow.abs().max())
        exact = dec.effect_maps(visual, layer, neurons)
        ours = dec.second_order(dec.coefficients(rec, exact), exact, slice(None)) * scale
        assert (ours.double() - slow).norm() > 1e-3 * slow.norm()
    finally:
        for name, p in visual.named_parameters():
            if name in saved:
                p.data.copy_(saved[name])
