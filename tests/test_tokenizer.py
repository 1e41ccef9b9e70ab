"""The SentencePiece BPE tokenizer, trained in seconds on a generated corpus: special ids, digit
splitting, byte fallback and lossless round trips of arbitrary Unicode."""

from __future__ import annotations

import random
import re

import pytest

pytest.importorskip("sentencepiece", reason="the tokenizer needs sentencepiece "
                    "(pip install sentencepiece)")

from llama_kernels.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

VOCAB = 400
WORDS = ("the model of language is trained on tokens from the corpus and in 2023 it "
         "has 65 billion parameters at 2048 tokens of context").split()
# A string outside the corpus with every troublesome kind of character (U+2581 excepted).
HARD = "😀👍🏽 日本語の文 ünïcödé \x00\x01\x7f\t\r\n  double  spaces \u200b\U0010fffd ~"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    rng = random.Random(1234)
    path = tmp_path_factory.mktemp("tok") / "corpus.txt"
    # Frequent multi-digit numbers: without split_digits, BPE would merge "2023" or "65".
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
             + f" {rng.choice(['2023', '65', '2048', '1000000'])}" for _ in range(3000)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model_path = train_tokenizer([path], VOCAB, path.parent / "tok")
    assert model_path.endswith(".model")
    return Tokenizer(model_path)


def test_special_ids_and_flags(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (VOCAB, 1, 2, -1)
    body = tok.encode("the model", bos=False)
    assert tok.encode("the model") == [1] + body
    assert tok.encode("the model", bos=False, eos=True) == body + [2]
    assert tok.decode([1] + body + [2]) == "the model"
    assert all(3 <= i < VOCAB for i in body)


def test_bpe_learned_merges(tok):
    text = "the model of language is trained on tokens from the corpus"
    assert len(tok.encode(text, bos=False)) < len(text.encode()) / 2


def test_numbers_split_into_single_digits(tok):
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    pieces = [p for p in pieces if not re.fullmatch(r"<0x[0-9A-F]{2}>", p)]  # byte pieces
    assert not [p for p in pieces if re.search(r"\d\d", p)], "a multi-digit piece was learned"
    number = "2023 65 31415926"  # 1, 3, 9 never occur in the corpus: byte pieces
    texts = [piece_text(tok.id_to_piece(i)) for i in tok.encode(number, bos=False)]
    digits = [t for t in texts if re.search(r"\d", t)]
    assert all(len(t) == 1 for t in digits), texts
    assert "".join(digits) == number.replace(" ", "")


def piece_text(piece: str) -> str:
    m = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
    return chr(int(m.group(1), 16)) if m else piece.replace("\u2581", "")


def test_byte_fallback_round_trips_unseen_characters(tok):
    ids = tok.encode(HARD, bos=False)
    pieces = {tok.id_to_piece(i) for i in ids}
    assert {"<0xF0>", "<0x9F>", "<0x00>", "<0x0A>"} <= pieces  # 😀 and control bytes as bytes
    assert 0 not in ids  # never <unk>
    assert tok.decode(ids) == HARD


def test_round_trip_of_arbitrary_unicode(tok):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    # U+2581 is SentencePiece's whitespace marker and decodes to a space (as in Meta's model).
    @hypothesis.given(st.text(st.characters(blacklist_characters="\u2581",
                                            blacklist_categories=("Cs",)), max_size=40))
    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    def round_trip(text):
        ids = tok.encode(text, bos=True, eos=True)
        assert 0 not in ids
        assert tok.decode(ids) == text

    round_trip()


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing.model")
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, 200, tmp_path / "t")
    with pytest.raises(ValueError, match="files"):
        train_tokenizer([], 400, tmp_path / "t")
