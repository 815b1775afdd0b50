"""CLIP BPE ids equal open_clip's own tokenizer, on open_clip's packaged vocabulary.

The peer runs in the test: ``open_clip.get_tokenizer('ViT-B-32')`` (its ``SimpleTokenizer``:
ftfy + html.unescape + the ``regex`` package) tokenizes a corpus of 10,000+ strings generated
here (CLIP's 80 ImageNet templates x class names, case and punctuation, numerals, accents, CJK,
emoji, HTML entities, mojibake, long texts, empty strings, whitespace runs, open_clip's special
token names, and random mixtures of all of these), and both of our BPE backends (the
BPE written in Python, the default, and the ``tokenizers`` package's) must give identical ``[N, 77]`` ids.
"""
import pickle

import numpy as np
import pytest

open_clip = pytest.importorskip(
    "open_clip", reason="open_clip_torch is not installed: parity with open_clip's tokenizer needs the [test] "
    "extra (CI installs it, with torch==2.14.1 torchvision==0.29.1 from local files)")
pytest.importorskip("ftfy", reason="open_clip's tokenizer needs ftfy (a dependency of open_clip_torch)")
pytest.importorskip("tokenizers", reason="the tokenizers-backed BPE needs the 'tokenizers' package ([test] extra)")

from open_clip import zero_shot_metadata  # noqa: E402

from contrastive_jax.data.tokenizer import ClipBpeTokenizer, TextRules, read_bpe_merges  # noqa: E402

VOCAB = open_clip.tokenizer.default_bpe()  # bpe_simple_vocab_16e6.txt.gz as open_clip ships it
CLIP_MERGES = 49408 - 514  # what open_clip (and every OpenAI / open_clip checkpoint) uses

# Fragments of the kinds of text captions contain. Each list is used on its own and mixed.
NUMERALS = ["2", "42", "3.14", "1,000,000", "10th", "x²+y²", "½ cup", "¾", "Ⅻ", "①②③", "٣٤٥",
            "۱۲۳", "१२३", "๓", "1e-5", "#1", "$9.99", "50%", "2024-01-31", "⁴²", "₂O", "0x1F"]
ACCENTS = ["café", "naïve", "Ångström", "résumé", "e\u0301cole", "São Paulo", "Zürich", "Ελληνικά",
           "Москва", "Việt Nam", "Łódź", "ﬁancé", "Straße", "İstanbul", "ǅemal", "Ŀ", "ß"]
CJK = ["日本語のテキスト", "中文字符", "한국어 문장", "ｶﾀｶﾅ", "ＡＢＣ１２３", "東京タワー", "猫と犬",
       "漢字かな交じり文", "ㄅㄆㄇ", "〜"]
EMOJI = ["🐶", "🐱‍👤", "👍🏽", "👨‍👩‍👧", "🇯🇵", "❤️", "🙂🙃", "✨new✨", "☕", "🏳️‍🌈", "©", "™"]
HTML = ["&amp;", "Tom &amp; Jerry", "it&#39;s", "&quot;quoted&quot;", "&lt;b&gt;bold&lt;/b&gt;",
        "&amp;amp;", "&nbsp;", "&#x1F600;", "<b>bold</b> &amp; co", "AT&T", "&copy; 2020", "&#8220;x&#8221;",
        "&unknown;", "a&b"]
MOJIBAKE = ["cafÃ©", "donâ€™t", "Ã¼ber", "â€œquotedâ€\x9d", "SeÃ±or", "naÃ¯ve", "Ã…ngstrÃ¶m",
            "æ—¥æœ¬", "Ã©tÃ©", "â€”dash"]
PUNCT = ["!", "?!", "...", "—", "–", "(", ")", "[x]", "{y}", "\"", "'", "’", "“quoted”", "«fr»", "@user",
         "#tag", "a/b", "c_d", "e-f", "...!!!", "\\", "~", "`", "<", ">", "*", "|", "·"]
CLITICS = ["it's", "IT'S", "they’re", "can't", "we'll", "I'd", "you've", "I'm", "rock'n'roll", "'s", "o'clock"]
SPACES = ["", " ", "  ", "\t", "\n", "\r\n", "a   b", " lead", "trail ", "\u3000", "\xa0", "\u2028",
          "\u200b", "\u200d", "\x85", "\x1f"]
SPECIALS = ["<start_of_text>", "<end_of_text>", "foo<end_of_text>bar", "!!<end_of_text>", "<|endoftext|>",
            "<START_OF_TEXT> a", "<start_of_text"]
CONTROL = ["\x00", "\x07", "\x1b[31mred\x1b[0m", "\ufeff", "\u202e", "\ufffd", "\U0001d400\U0001d401"]
FRAGMENTS = [NUMERALS, ACCENTS, CJK, EMOJI, HTML, MOJIBAKE, PUNCT, CLITICS, SPACES, SPECIALS, CONTROL]


def clip_corpus(seed: int = 0) -> list[str]:
    """About 12,000 strings (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    templates = zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
    classes = list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    assert len(templates) == 80
    picked = [classes[i] for i in range(0, len(classes), 13)]  # 77 classes
    corpus = [t(c) for t in templates for c in picked]  # 6,160
    # Case and punctuation variants of template sentences.
    for i in range(1500):
        s = corpus[int(rng.integers(len(corpus)))]
        case = (str.upper, str.title, str.swapcase, str.capitalize, lambda x: x)[i % 5]
        corpus.append(case(s) + str(rng.choice(PUNCT)) + str(rng.choice(PUNCT)))
    words = [w for s in corpus[:6160:37] for w in s.split()]
    pool = [f for group in FRAGMENTS for f in group] + words
    for group in FRAGMENTS:  # each fragment alone, in a sentence, and glued to a word
        for f in group:
            corpus += [f, f"a photo of {f}.", f"{f}{rng.choice(words)}", f"{rng.choice(words)} {f} {f}"]
    for _ in range(3000):  # random mixtures, with random separators (including none)
        n = int(rng.integers(1, 9))
        seps = rng.choice(["", " ", "  ", "\t", "-", "\n"], n)
        corpus.append("".join(str(rng.choice(pool)) + str(s) for s in seps))
    # Long texts: truncated at 77 tokens, EOS kept; some cut inside multi-token words.
    for i in range(200):
        n = int(rng.integers(40, 160))
        corpus.append(" ".join(str(rng.choice(pool if i % 2 else words)) for _ in range(n)))
    corpus += ["supercalifragilisticexpialidocious " * 30, "a" * 500, "ab" * 300 + " end", "🙂" * 100]
    return corpus


@pytest.fixture(scope="module")
def corpus():
    texts = clip_corpus()
    assert len(texts) >= 10_000
    return texts


@pytest.fixture(scope="module")
def reference(corpus):
    tok = open_clip.get_tokenizer("ViT-B-32")
    return tok(corpus).numpy()


def test_the_packaged_vocabulary_header_is_not_a_merge():
    with open(VOCAB, "rb") as f:
        import gzip

        first = gzip.decompress(f.read()).split(b"\n", 1)[0]
    assert b"#version" in first and not first.startswith(b"#")  # '"bpe_simple_vocab_16e6.txt#version: 0.2'
    merges = read_bpe_merges(VOCAB, CLIP_MERGES)
    assert len(merges) == CLIP_MERGES and merges[:2] == [("i", "n"), ("t", "h")]
    tok = ClipBpeTokenizer(merges, max_len=77)
    assert tok.vocab_size == 49408 and (tok.bos_id, tok.eos_id) == (49406, 49407)
    ids = tok.encode(["a photo of a dog"])[0]
    assert list(ids[:7]) == [49406, 320, 1125, 539, 320, 1929, 49407] and not ids[7:].any()
    want = open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog"]).numpy()
    np.testing.assert_array_equal(tok.encode(["a photo of a dog"]), want)


@pytest.mark.parametrize("backend", ["tokenizers", "python"])
def test_ids_equal_open_clip_on_the_corpus(corpus, reference, backend):
    tok = ClipBpeTokenizer.from_file(VOCAB, 77, num_merges=CLIP_MERGES, backend=backend)
    assert tok.backend == backend and tok.rules == TextRules(clean="clip")
    ours = tok.encode(corpus)
    bad = np.flatnonzero((ours != reference).any(axis=1))
    assert bad.size == 0, (f"{bad.size} of {len(corpus)} texts differ, e.g. "
                           + "; ".join(f"{corpus[i]!r}: ours {ours[i][:12]} open_clip {reference[i][:12]}"
                                       for i in bad[:5]))
    # The corpus exercises what it claims to: truncation (a full row ending in EOS), texts mapped
    # to specials, empty texts ([BOS, EOS]).
    full = reference[:, -1] != 0
    assert full.sum() >= 100 and (reference[full, -1] == 49407).all()
    assert ((reference[:, 1:-1] == 49407).sum(axis=1) > 1).any()  # '<end_of_text>' inside a text
    assert ((reference[:, 0] == 49406) & (reference[:, 1] == 49407)).sum() >= 10


def test_tokenizer_pickles_and_reloads_with_the_same_ids(corpus, reference, tmp_path):
    tok = ClipBpeTokenizer.from_file(VOCAB, 77, num_merges=CLIP_MERGES, backend="tokenizers")
    tok.encode(["built"])  # the Rust tokenizer exists now; pickling must leave it behind
    texts = corpus[::97]
    clone = pickle.loads(pickle.dumps(tok))  # grain worker processes
    assert clone.backend == "tokenizers"
    np.testing.assert_array_equal(clone.encode(texts), reference[::97])
    tok.save(tmp_path / "tokenizer.json")
    from contrastive_jax.data.tokenizer import load_tokenizer

    np.testing.assert_array_equal(load_tokenizer(tmp_path / "tokenizer.json").encode(texts), reference[::97])


def test_pretokenizer_without_the_regex_package_splits_the_corpus_identically(corpus, monkeypatch):
    # Without `regex`, the letter / number classes are spelled out from unicodedata for `re`.
    import sys

    import regex

    from contrastive_jax.data import tokenizer as tokenizer_lib

    exact = tokenizer_lib.clip_pretokenizer()
    assert isinstance(exact, regex.Pattern)
    tokenizer_lib.clip_pretokenizer.cache_clear()
    monkeypatch.setitem(sys.modules, "regex", None)  # import regex -> ImportError
    try:
        fallback = tokenizer_lib.clip_pretokenizer()
        assert not isinstance(fallback, regex.Pattern)
        cleaned = [TextRules(clean="clip").apply(t) for t in corpus]
        assert [t for t in cleaned if exact.findall(t) != fallback.findall(t)] == []
    finally:
        tokenizer_lib.clip_pretokenizer.cache_clear()


def test_without_ftfy_plain_text_still_matches_and_the_gap_is_announced(corpus, reference, monkeypatch):
    # Without ftfy, cleaning is Unicode NFC only: plain text keeps open_clip's ids (the template x
    # class-name part of the corpus), repaired text (curly quotes, mojibake, ...) may not, and a
    # warning says so once.
    import sys

    from contrastive_jax.data import tokenizer as tokenizer_lib

    tokenizer_lib._ftfy_fix_text.cache_clear()
    monkeypatch.setitem(sys.modules, "ftfy", None)
    try:
        tok = ClipBpeTokenizer.from_file(VOCAB, 77, num_merges=CLIP_MERGES)
        with pytest.warns(UserWarning, match="without the 'ftfy' package"):
            plain = tok.encode(corpus[:6160])
        np.testing.assert_array_equal(plain, reference[:6160])
        assert (tok.encode(["donâ€™t “quoted”"]) != open_clip.get_tokenizer("ViT-B-32")(["donâ€™t “quoted”"]).numpy()).any()
    finally:
        tokenizer_lib._ftfy_fix_text.cache_clear()
