"""Reference sets: folder errors, unreadable images, sorted features and the disk cache."""
import pytest
import torch

from vital.models import channels_positions
from vital.refs.images import ReferenceError, list_images, load_images
from vital.refs.references import reference_quantiles, sorted_features


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ReferenceError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ReferenceError, match="holds no images"):
        list_images(tmp_path / "empty")


def test_unreadable_images_are_skipped_then_fail_when_none_left(ref_folder):
    bad = ref_folder / "zz_broken.png"
    bad.write_bytes(b"not a png")
    files = list_images(ref_folder)
    with pytest.warns(UserWarning, match="unreadable"):
        images, used = load_images(files, 32)
    assert images.shape == (4, 3, 32, 32) and bad not in used
    with pytest.raises(ReferenceError, match="could be read"), pytest.warns(UserWarning):
        load_images([bad], 32)


def test_fewer_images_than_asked_warns(ref_folder):
    with pytest.warns(UserWarning, match="using the 4 that exist"):
        images, _ = load_images(list_images(ref_folder), 32, num=50)
    assert len(images) == 4


def test_sorted_features_are_the_mean_of_per_image_sorts(tiny_cnn_target, ref_folder):
    images, _ = load_images(list_images(ref_folder), 48)
    q = sorted_features(tiny_cnn_target, ["stage1"], images, batch_size=3, progress=False)["stage1"]
    with tiny_cnn_target.hooks(["stage1"]) as feats:
        tiny_cnn_target(images)
        x = channels_positions(feats["stage1"], "BCHW")
    expected = torch.stack([xi.sort(-1).values for xi in x]).mean(0)
    torch.testing.assert_close(q, expected)
    assert (q.diff(dim=-1) >= 0).all()


def test_cache_hit_and_corrupt_cache_is_rebuilt(tiny_cnn_target, ref_folder, isolated_cache):
    files = list_images(ref_folder)
    first, info1 = reference_quantiles(tiny_cnn_target, ["stem", "stage2"], files, 48, progress=False)
    again, info2 = reference_quantiles(tiny_cnn_target, ["stem", "stage2"], files, 48, progress=False)
    assert not info1["cache_hit"] and info2["cache_hit"] and info1["key"] == info2["key"]
    torch.testing.assert_close(first, again)
    cached = next((isolated_cache / "references").glob("*.safetensors"))
    data = bytearray(cached.read_bytes())
    data[-8:] = b"\x00" * 8          # flip bytes inside the tensor payload
    cached.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt, info3 = reference_quantiles(tiny_cnn_target, ["stem", "stage2"], files, 48,
                                             progress=False)
    assert not info3["cache_hit"]
    torch.testing.assert_close(first, rebuilt)


def test_cache_key_depends_on_content_size_and_layers(tiny_cnn_target, ref_folder):
    files = list_images(ref_folder)
    key = lambda layers, size: reference_quantiles(  # noqa: E731
        tiny_cnn_target, layers, files, size, progress=False)[1]["key"]
    base = key(["stem"], 48)
    assert key(["stage1"], 48) != base and key(["stem"], 32) != base
    files[0].write_bytes(files[1].read_bytes())
    assert key(["stem"], 48) != base


def test_cache_hit_does_not_decode_images(tiny_cnn_target, ref_folder, isolated_cache,
                                          monkeypatch):
    import vital.refs.images as R
    files = list_images(ref_folder)
    first, _ = reference_quantiles(tiny_cnn_target, ["stem"], files, 48, num=3, progress=False)

    def no_decode(*args, **kwargs):
        raise AssertionError("a cache hit must not decode the reference images")
    monkeypatch.setattr(R, "load_image", no_decode)
    again, info = reference_quantiles(tiny_cnn_target, ["stem"], files, 48, num=3, progress=False)
    assert info["cache_hit"] and info["files"] == [str(f) for f in files[:3]]
    torch.testing.assert_close(first, again)


def test_cache_with_an_unreadable_file_hits_on_the_readable_ones(tiny_cnn_target, ref_folder,
                                                                   isolated_cache):
    bad = ref_folder / "a_broken.png"          # sorts first: the fast path's candidates miss
    bad.write_bytes(b"not a png")
    files = list_images(ref_folder)
    assert files[0] == bad
    with pytest.warns(UserWarning, match="unreadable"):
        first, info1 = reference_quantiles(tiny_cnn_target, ["stem"], files, 48, num=3,
                                           progress=False)
    with pytest.warns(UserWarning, match="unreadable"):
        again, info2 = reference_quantiles(tiny_cnn_target, ["stem"], files, 48, num=3,
                                           progress=False)
    assert str(bad) not in info1["files"] and len(info1["files"]) == 3
    assert not info1["cache_hit"] and info2["cache_hit"] and info1["key"] == info2["key"]
    torch.testing.assert_close(first, again)
