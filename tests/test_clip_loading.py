"""Every clip_custom loader path, on files the tests write into tmp_path (nothing downloads)."""
import hashlib
import json
import urllib.error
import warnings

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

import clip_custom
from clip_custom import build_model, load, load_state_dict_any
from clip_custom import download as download_mod
from clip_custom.convert import from_transformers, transformers_arch
from helpers import random_images, random_tokens, tiny_clip, tiny_clip_cfg

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB, CONTEXT = 100, 16
# the peer: a tiny ViT (width 64, one block, patch 8 at 32 px), text width 128, two blocks
PEER = dict(width=64, layers=1, text_width=128, text_layers=2, vocab=VOCAB, context=CONTEXT)
PEER_CFG = tiny_clip_cfg("vit", **PEER)   # as open_clip_config.json describes it


def text_ids(n: int, seed: int = 0) -> torch.Tensor:
    return random_tokens(n, VOCAB, CONTEXT, seed)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def peer():
    return tiny_clip("vit", seed=5, **PEER)


@pytest.fixture(scope="module")
def reference(peer):
    return build_model(peer.state_dict())


@torch.no_grad()
def _assert_same_model(model, reference, size=32):
    x, tokens = random_images(2, size, seed=1), text_ids(2, seed=1)
    torch.testing.assert_close(model.encode_image(x), reference.encode_image(x), **TOL)
    torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens), **TOL)


# ---------------------------------------------------------------- local files


def test_torchscript_archive(tmp_path, reference):
    path = tmp_path / "tiny_jit.pt"
    example = (random_images(1, 32), text_ids(1))
    with warnings.catch_warnings():  # TorchScript is deprecated; OpenAI still ships it
        warnings.simplefilter("ignore")
        torch.jit.trace(reference, example, check_trace=False).save(str(path))
    model, preprocess = load(str(path))
    _assert_same_model(model, reference)
    assert model.weight_sha256 == _sha256(path)
    assert preprocess.transforms[1].size == (32, 32)  # CenterCrop at the native resolution


def test_pt_state_dict_with_openai_extra_keys(tmp_path, peer, reference):
    sd = dict(peer.state_dict())
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(CONTEXT),
              vocab_size=torch.tensor(VOCAB))
    path = tmp_path / "tiny.pt"
    torch.save(sd, path)
    state_dict, sha = load_state_dict_any(path)
    assert sha == _sha256(path)
    _assert_same_model(build_model(state_dict), reference)


def test_wrapped_training_checkpoint(tmp_path, peer, reference):
    path = tmp_path / "epoch_1.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in peer.state_dict().items()}}, path)
    _assert_same_model(load(str(path))[0], reference)


def test_safetensors(tmp_path, peer, reference):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(path))
    model, _ = load(str(path))
    _assert_same_model(model, reference)
    assert model.weight_sha256 == _sha256(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_fp16_weights_are_upcast(tmp_path, peer, suffix):
    half = {k: v.half() if v.is_floating_point() else v for k, v in peer.state_dict().items()}
    path = tmp_path / f"tiny_fp16{suffix}"
    save_file(half, str(path)) if suffix == ".safetensors" else torch.save(half, path)
    state_dict, _ = load_state_dict_any(str(path))
    assert all(v.dtype == torch.float32 for v in state_dict.values() if v.is_floating_point())
    model, _ = load(str(path))
    assert model.dtype == torch.float32
    _assert_same_model(model, build_model({k: v.float() for k, v in half.items()}))


def test_non_clip_state_dict_is_rejected(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(ValueError, match="not a CLIP state dict.*token_embedding.weight"):
        load_state_dict_any(str(path))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_rejected(tmp_path, peer, suffix):
    path = tmp_path / f"broken{suffix}"
    sd = {k: v.contiguous() for k, v in peer.state_dict().items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load(str(path))


def test_unknown_name_lists_the_valid_forms():
    with pytest.raises(ValueError) as info:
        load("ViT-B-32")
    message = str(info.value)
    assert all(name in message for name in clip_custom.available_models())
    assert "hf-hub:ORG/REPO" in message and ".safetensors" in message
    assert "Did you mean ViT-B/32" in message


def test_jit_true_is_refused():
    with pytest.raises(ValueError, match="jit=False"):
        load("RN50", jit=True)


# ---------------------------------------------------------------- OpenAI download


@pytest.fixture
def served_weights(tmp_path, peer, monkeypatch):
    """A weight file behind a file:// URL of OpenAI's shape (.../<sha256>/<name>.pt), cache in tmp."""
    def serve(sha=None):
        blob = tmp_path / "blob.pt"
        torch.save(peer.state_dict(), blob)
        folder = tmp_path / "server" / (sha or _sha256(blob))
        folder.mkdir(parents=True)
        source = folder / "ViT-B-32.pt"
        blob.rename(source)
        monkeypatch.setitem(download_mod.MODELS, "ViT-B/32", source.as_uri())
        return source

    monkeypatch.setenv("VITAL_CACHE", str(tmp_path / "cache"))
    return serve


def test_openai_download_is_cached_and_verified(served_weights, tmp_path, reference):
    source = served_weights()
    sha = _sha256(source)
    model, _ = load("ViT-B/32")
    _assert_same_model(model, reference)
    cached = tmp_path / "cache" / "clip" / "ViT-B-32.pt"
    assert cached.is_file() and model.weight_sha256 == sha
    assert [p.name for p in cached.parent.iterdir()] == ["ViT-B-32.pt"]  # no temp files left
    source.unlink()  # a second load must not download again
    state_dict, sha_again = load_state_dict_any("ViT-B/32")
    assert sha_again == sha and "visual.proj" in state_dict


def test_corrupt_cached_file_is_downloaded_again(served_weights, tmp_path, reference):
    source = served_weights()
    cached = tmp_path / "cache" / "clip" / "ViT-B-32.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the weights")
    with pytest.warns(UserWarning, match="downloading it again"):
        model, _ = load("ViT-B/32")
    _assert_same_model(model, reference)
    assert _sha256(cached) == _sha256(source)


def test_openai_checksum_mismatch_deletes_partial_file(served_weights, tmp_path):
    served_weights(sha="0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256.*deleted"):
        load("ViT-B/32")
    assert list((tmp_path / "cache" / "clip").iterdir()) == []


def test_offline_error_names_url_and_target(served_weights, tmp_path, monkeypatch):
    served_weights()

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(download_mod.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as info:
        load("ViT-B/32")
    message = str(info.value)
    assert download_mod.MODELS["ViT-B/32"] in message
    assert str(tmp_path / "cache" / "clip" / "ViT-B-32.pt") in message
    assert list((tmp_path / "cache" / "clip").iterdir()) == []


def test_openai_urls_carry_their_checksums():
    assert set(clip_custom.available_models()) == {
        "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
        "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"}
    for url in download_mod.MODELS.values():
        assert url.startswith("https://openaipublic.azureedge.net/clip/models/")
        assert len(url.split("/")[-2]) == 64


# ---------------------------------------------------------------- transformers layout


def _tiny_transformers_clip(heads=2, act="quick_gelu", eos_token_id=VOCAB - 1, seed=0):
    torch.manual_seed(seed)
    common = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=heads, hidden_act=act)
    config = CLIPConfig(
        text_config=dict(common, vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                         bos_token_id=VOCAB - 2, eos_token_id=eos_token_id, pad_token_id=0),
        vision_config=dict(common, image_size=32, patch_size=8),
        projection_dim=32)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def _assert_matches_transformers(model, hf):
    x, tokens = random_images(2, 32, seed=2), text_ids(3, seed=2)
    torch.testing.assert_close(model.encode_image(x), _features(hf.get_image_features(pixel_values=x)), **TOL)
    torch.testing.assert_close(model.encode_text(tokens), _features(hf.get_text_features(input_ids=tokens)), **TOL)


@pytest.mark.parametrize("heads,act,eos", [
    (2, "quick_gelu", VOCAB - 1),  # OpenAI-like: 64-wide heads, first end token pooled
    (2, "quick_gelu", 2),  # legacy configs: transformers pools at argmax of the ids
    (8, "gelu", VOCAB - 1),  # 16-wide heads and exact GELU, as some non-OpenAI CLIPs
])
def test_transformers_conversion_matches_transformers(heads, act, eos):
    hf = _tiny_transformers_clip(heads, act, eos)
    state_dict = from_transformers(hf.state_dict())
    model = build_model(state_dict, **transformers_arch(hf.config.to_dict(), state_dict))
    _assert_matches_transformers(model, hf)


# ---------------------------------------------------------------- hub (offline cache)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline HF cache in tmp_path. huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import,
    so the resolved constants are patched too."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def add_repo(repo_id):
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        return snapshot

    return add_repo


def test_hub_transformers_layout(hub_cache):
    hf = _tiny_transformers_clip(heads=8, act="gelu", seed=7)
    hf.save_pretrained(hub_cache("tiny-org/tiny-clip-hf"))
    model, _ = load("hf-hub:tiny-org/tiny-clip-hf")
    _assert_matches_transformers(model, hf)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert model.visual.transformer.resblocks[0].attn.heads == 8


def test_hub_open_clip_layout(hub_cache, peer, reference):
    snapshot = hub_cache("tiny-org/tiny-clip-oc")
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()},
              str(snapshot / "open_clip_model.safetensors"))
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": PEER_CFG}))
    model, _ = load("hf-hub:tiny-org/tiny-clip-oc")
    _assert_same_model(model, reference)
    state_dict, sha = load_state_dict_any("hf-hub:tiny-org/tiny-clip-oc")
    assert sha == _sha256(snapshot / "open_clip_model.safetensors")


def test_hub_open_clip_unsupported_option_is_named(hub_cache, peer):
    snapshot = hub_cache("tiny-org/avg-pool")
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()},
              str(snapshot / "open_clip_model.safetensors"))
    config = {"model_cfg": {"vision_cfg": {"pool_type": "avg"}, "text_cfg": {}}}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vision_cfg.pool_type='avg'"):
        load("hf-hub:tiny-org/avg-pool")


def test_hub_repo_missing_offline(hub_cache):
    with pytest.raises(RuntimeError, match="none of open_clip_model.safetensors.*HF_HUB_OFFLINE"):
        load("hf-hub:nobody/nothing")


def test_bad_hub_spec():
    with pytest.raises(ValueError, match="hf-hub:ORG/REPO"):
        load("hf-hub:no-slash")


def test_hub_without_network_uses_the_cache_and_says_why_it_fails(hub_cache, monkeypatch, peer,
                                                                  reference):
    """HF_HUB_OFFLINE unset and the hub unreachable: a cached repo loads (no download
    retries), a missing one fails at once with a sentence that names the network."""
    import time
    from clip_custom import hub
    from clip_custom.download import DownloadError
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "unreachable",
                        lambda endpoint: "huggingface.co:443 does not answer (test)")
    snapshot = hub_cache("tiny-org/cached")
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()},
              str(snapshot / "open_clip_model.safetensors"))
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": PEER_CFG}))
    model, _ = load("hf-hub:tiny-org/cached")
    _assert_same_model(model, reference)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="the hub cannot be reached: huggingface.co:443"):
        load("hf-hub:nonexistent/repo")
    assert time.monotonic() - started < 5


def test_hub_reachability_is_a_quick_tcp_check(monkeypatch):
    import socket
    from clip_custom import hub
    hub.unreachable.cache_clear()

    def refuse(address, timeout):
        assert address == ("hub.example", 443) and timeout <= 5
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert hub.unreachable("https://hub.example") == \
        "hub.example:443 does not answer (Connection refused)"
    hub.unreachable.cache_clear()
