"""vital.refs.words: word images are deterministic, distinct, centred, and fail clearly."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from vital.refs import words as typography
from vital.refs.words import default_font_path, render_word, word_tensor


def _ink(image) -> np.ndarray:
    """Boolean (H, W): pixels darker than mid-grey."""
    return np.asarray(image.convert("L")) < 128


def _ink_rows(ink: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive rows that hold ink: one run per text line."""
    rows = ink.any(1)
    runs, start = [], None
    for y, has in enumerate(list(rows) + [False]):
        if has and start is None:
            start = y
        elif not has and start is not None:
            runs.append((start, y))
            start = None
    return runs


def test_font_ships_with_matplotlib():
    import matplotlib
    path = default_font_path()
    assert path.name == "DejaVuSans-Bold.ttf" and path.is_file()
    assert Path(matplotlib.get_data_path()) in path.parents


def test_same_word_same_bytes(tmp_path):
    first = render_word("KING", 64).tobytes()
    copy = tmp_path / default_font_path().name      # another path: its own font object
    copy.write_bytes(default_font_path().read_bytes())
    second = render_word("KING", 64, font=copy).tobytes()
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()


def test_different_words_differ():
    words = ["MAN", "WOMAN", "KING", "QUEEN"]
    inks = {w: _ink(render_word(w, 64)) for w in words}
    for i, a in enumerate(words):
        for b in words[i + 1:]:
            differing = (inks[a] != inks[b]).mean()
            assert differing > 0.05, (a, b, differing)   # not a few stray pixels
    assert render_word("man", 64).tobytes() != render_word("MAN", 64).tobytes()


@pytest.mark.parametrize("word", ["I", "MAN", "WOMANHOOD"])
def test_word_is_centred_inside_the_margin(word):
    size = 96
    ink = _ink(render_word(word, size))
    ys, xs = np.nonzero(ink)
    margin = round(typography.MARGIN * size)
    assert ys.min() >= margin - 1 and ys.max() <= size - margin
    assert xs.min() >= margin - 1 and xs.max() <= size - margin
    # the ink's bounding box is centred to within a pixel and a half
    assert abs((ys.min() + ys.max()) / 2 - (size - 1) / 2) <= 1.5
    assert abs((xs.min() + xs.max()) / 2 - (size - 1) / 2) <= 1.5
    # as large as fits: the ink spans most of the room on one axis (vertically the fitted box
    # is the font's line box, from above the capitals to below the baseline, so "I" gets ~72 %)
    room = size - 2 * margin
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 >= 0.7 * room


def test_long_text_wraps_onto_several_lines():
    ink = _ink(render_word("a photo of a queen", 96))
    assert len(_ink_rows(ink)) >= 2
    assert len(_ink_rows(_ink(render_word("KING", 96)))) == 1
    explicit = _ink(render_word("TOP\nBOTTOM", 96))
    assert len(_ink_rows(explicit)) == 2


def test_word_tensor_matches_the_image():
    t = word_tensor("QUEEN", 48)
    assert t.shape == (3, 48, 48) and t.dtype == torch.float32
    expected = torch.from_numpy(np.array(render_word("QUEEN", 48))).permute(2, 0, 1) / 255.0
    torch.testing.assert_close(t, expected.float())
    assert t.min() == 0.0 and t.max() == 1.0     # black ink on white paper


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_word_is_an_error(text):
    with pytest.raises(ValueError, match="empty word"):
        render_word(text, 32)


def test_missing_font_and_tiny_size_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ttf"):
        render_word("MAN", 32, font=tmp_path / "nope.ttf")
    with pytest.raises(ValueError, match="too small"):
        render_word("MAN", 4)
