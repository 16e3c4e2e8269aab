"""clip_custom's tokenizer against open_clip's (OpenAI's BPE) on an awkward corpus."""
import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer as PeerTokenizer

from clip_custom import SimpleTokenizer, tokenize

CORPUS = [
    "a photo of a dog",
    "A PHOTO of a Dog, MiXeD cAsE!",
    "",
    "   leading and trailing   ",
    "whitespace\t\truns\n\nand\r\nnewlines\u00a0nbsp\u3000ideographic space",
    "emoji 🐶🐱🦊 and flags 🇩🇪 and zwj 👩‍👩‍👧",
    "unicode: naïve café Ünïcödé straße ΑΒΓ δέλτα кириллица 日本語のテキスト 한국어",
    "html &amp; entities &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;single&#39; &amp;amp; double",
    "a literal <tag> stops ftfy's own unescaping: &amp;amp; &amp;lt; &quot;",
    "mojibake fixed by ftfy: cafÃ© and â€œquotesâ€\x9d",
    "contractions: it's we'll they'd I'm you're we've can't IT'S",
    "numbers 12345 3.14159 1,000,000 2nd 3rd",
    "punctuation!!! ??? ... --- ### $$$ (parens) [brackets] {braces}",
    "accents combining: e\u0301 a\u0308",
    "url https://example.com/path?q=1&x=2 email a.b@c.org",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["long text with many words"] * 40),
    "x" * 500,
]


@pytest.fixture(scope="module")
def ours():
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def peer():
    return PeerTokenizer()


@pytest.mark.parametrize("text", CORPUS)
def test_encode_and_decode_equal_open_clip(ours, peer, text):
    ids = ours.encode(text)
    assert ids == peer.encode(text)
    assert ours.decode(ids) == peer.decode(ids)


def test_tokenize_equals_open_clip_with_truncation():
    ours = tokenize(CORPUS, truncate=True)
    assert ours.shape == (len(CORPUS), 77) and ours.dtype == torch.long
    assert torch.equal(ours, open_clip.tokenize(CORPUS))


def test_other_context_length_equals_open_clip():
    short = CORPUS[:8]
    assert torch.equal(tokenize(short, context_length=24, truncate=True),
                       open_clip.tokenize(short, context_length=24))


def test_vocabulary_and_special_tokens_equal_open_clip(ours, peer):
    assert ours.vocab_size == peer.vocab_size == 49408
    assert (ours.sot_token_id, ours.eot_token_id) == (peer.sot_token_id, peer.eot_token_id)
    # every ordinary token has the same id (the two special tokens differ only in spelling)
    for token, i in ours.encoder.items():
        if i < ours.sot_token_id:
            assert peer.encoder[token] == i


def test_too_long_text_raises_unless_truncated():
    long = CORPUS[-2]
    with pytest.raises(ValueError, match="truncate=True"):
        tokenize(long)
    row = tokenize(long, truncate=True)[0]
    assert row[-1].item() == SimpleTokenizer().eot_token_id  # end token kept
    assert (row != 0).all()


def test_single_string_and_padding(ours):
    row = tokenize("a photo of a dog")
    ids = ours.encode("a photo of a dog")
    assert row.shape == (1, 77)
    assert row[0, : len(ids) + 2].tolist() == [ours.sot_token_id, *ids, ours.eot_token_id]
    assert row[0, len(ids) + 2:].eq(0).all()
    assert row[0].argmax().item() == len(ids) + 1  # the end token is the highest id (text pooling)


def test_html_entities_are_unescaped_twice(ours):
    assert ours.encode("&amp;amp;") == ours.encode("&")
    assert ours.encode("Cat &amp; Dog") == ours.encode("cat & dog")
    # with a literal '<' ftfy leaves entities alone, so both unescapes are ours
    assert ours.encode("<b> &amp;amp;") == ours.encode("<b> &")


def test_bpe_cache_is_used(ours):
    ours.encode("hippopotamus")
    cached = [k for k in ours.cache if "hippo" in k]
    assert cached
    ours.cache[cached[0]] = ["a</w>"]  # a poisoned cache entry proves the cache is read
    try:
        assert ours.encode("hippopotamus") == [ours.encoder["a</w>"]]
    finally:
        del ours.cache[cached[0]]
    assert ours.encode("hippopotamus") != [ours.encoder["a</w>"]]


def _peer_words(peer, alpha_only):
    """Independent reference: open_clip's decoder entries ending in </w> that are valid UTF-8."""
    words = []
    for i in range(peer.vocab_size):
        token = peer.decoder[i]
        if not token.endswith("</w>"):
            continue
        try:
            word = bytearray(peer.byte_decoder[c] for c in token[:-4]).decode("utf-8")
        except (UnicodeDecodeError, KeyError):
            continue
        if not alpha_only or word.isalpha():
            words.append(word)
    return words


@pytest.mark.parametrize("alpha_only", [False, True])
def test_vocab_words_are_the_whole_word_tokens(ours, peer, alpha_only):
    words = ours.vocab_words(alpha_only=alpha_only)
    assert words == _peer_words(peer, alpha_only)
    assert "dog" in words and "photo" in words


def test_common_vocab_words_encode_to_one_token(ours):
    for word in ["dog", "photo", "king", "queen", "banana"]:
        assert ours.encode(word) == [ours.encoder[word + "</w>"]]
