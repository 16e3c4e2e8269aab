"""Bundled reference photos: they exist, show their class, and build deterministic folders;
scripts/build_references.py builds them as a user runs it."""
import torch

from helpers import assert_png_shows, run_script
from vital.refs.bundled import PHOTOS, build_reference_folders, photo_path
from vital.refs.images import list_images, load_image


def test_each_photo_shows_its_class(tmp_path):
    from vital.models import load_target
    target = load_target("efficientnet-lite0")
    images = torch.stack([load_image(photo_path(p), target.input_size) for p in PHOTOS])
    with torch.no_grad():
        top3 = target(images).topk(3, dim=-1).indices
    for photo, top in zip(PHOTOS, top3.tolist()):
        assert photo.class_index in top, (photo.folder, top)


def test_folders_are_built_once_and_deterministic(tmp_path):
    one = PHOTOS[:2]
    made = build_reference_folders(tmp_path / "a", n_views=3, size=32, photos=one)
    again = build_reference_folders(tmp_path / "b", n_views=3, size=32, photos=one)
    for name, folder in made.items():
        files = list_images(folder)
        assert len(files) == 3
        assert [f.read_bytes() for f in files] == [f.read_bytes() for f in list_images(again[name])]
    stamp = list_images(made[one[0].folder])[0].stat().st_mtime_ns
    build_reference_folders(tmp_path / "a", n_views=3, size=32, photos=one)
    assert list_images(made[one[0].folder])[0].stat().st_mtime_ns == stamp


def test_script_builds_one_folder_per_photo(tmp_path):
    proc = run_script("scripts/build_references.py", "--out", tmp_path / "refs", "--views", "2",
                      "--size", "32", cwd=tmp_path)
    assert len(proc.stdout.splitlines()) == len(PHOTOS)
    for photo in PHOTOS:
        folder = tmp_path / "refs" / photo.folder
        assert f"ImageNet class {photo.class_index}" in proc.stdout and str(folder) in proc.stdout
        views = [assert_png_shows(f, (32, 32)) for f in list_images(folder)]
        assert len(views) == 2 and (views[0] != views[1]).any()   # two different views
