"""CLIP's byte-level BPE tokenizer (49,408 tokens), reading the bundled OpenAI merges file.

Text -> ftfy fix + double HTML unescape -> whitespace runs collapsed -> lower case ->
regex pre-tokenisation -> UTF-8 bytes mapped to printable characters -> BPE merges by rank.
Ids: 256 byte tokens, 256 byte+'</w>' tokens, 48,894 merges, then start and end of text.
"""
import functools
import gzip
import html
from pathlib import Path

import ftfy
import regex
import torch

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
N_MERGES = 49152 - 256 - 2  # merges used by CLIP (the file holds more)
START, END = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"  # suffix marking the last symbol of a pre-token
CONTEXT_LENGTH = 77
_SPLIT = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE)
_WHITESPACE = regex.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """Reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are given the
    characters 256, 257, ... in byte order, so no token contains whitespace or control codes.
    The dict's order (printable bytes first, then the others) is the order of the first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of `pair`, scanning left to right."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


class SimpleTokenizer:
    def __init__(self, vocab_file: str | Path = VOCAB_FILE):
        self.byte_encoder = byte_to_char()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        merges = self._read_merges(vocab_file)
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + WORD_END for s in symbols] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.cache = {START: [START], END: [END]}  # pre-token -> BPE symbols
        self.sot_token_id, self.eot_token_id = self.encoder[START], self.encoder[END]
        self.vocab_size = len(vocab)

    @staticmethod
    def _read_merges(vocab_file) -> list[tuple[str, str]]:
        lines = gzip.open(vocab_file).read().decode("utf-8").split("\n")
        return [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is a header

    def bpe(self, token: str) -> list[str]:
        """Pre-token (already byte-mapped) -> BPE symbols, the last one ending in '</w>'."""
        if token not in self.cache:
            symbols = [*token[:-1], token[-1] + WORD_END]
            while len(symbols) > 1:
                pairs = zip(symbols, symbols[1:])
                best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
                if best not in self.bpe_ranks:
                    break
                symbols = _merge_pair(symbols, best)
            self.cache[token] = symbols
        return self.cache[token]

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in _SPLIT.findall(clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(mapped))
        return ids

    def decode(self, ids) -> str:
        """Token ids -> text; each '</w>' becomes a space, invalid UTF-8 becomes U+FFFD."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        text = bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace(WORD_END, " ")

    def vocab_words(self, alpha_only: bool = False) -> list[str]:
        """Tokens that are whole words (end in '</w>'), as plain strings, in id order.

        Tokens whose bytes are not valid UTF-8 on their own are left out; `alpha_only` keeps only
        purely alphabetic words (what a "live opinion" vocabulary wants).
        """
        words = []
        for token in self.encoder:
            if not token.endswith(WORD_END):
                continue
            try:
                word = bytes(self.byte_decoder[c] for c in token[:-len(WORD_END)]).decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not alpha_only or word.isalpha():
                words.append(word)
        return words

    def __call__(self, texts, context_length: int = CONTEXT_LENGTH, truncate: bool = False):
        return tokenize(texts, context_length, truncate, tokenizer=self)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False,
             tokenizer: SimpleTokenizer | None = None) -> torch.Tensor:
    """Texts -> LongTensor (N, context_length): start, tokens, end, zero padding.

    Too long a text raises ValueError unless `truncate`, which cuts it and keeps the end token.
    """
    tok = tokenizer or default_tokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(
                    f"text {i} ({text[:40]!r}...) is {len(ids)} tokens with start and end, more than "
                    f"context_length={context_length}; shorten it or pass truncate=True")
            ids = ids[:context_length - 1] + [tok.eot_token_id]
        result[i, :len(ids)] = torch.tensor(ids)
    return result
