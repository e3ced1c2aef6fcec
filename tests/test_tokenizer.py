"""Tokenizer: a tiny byte-level BPE built here, round trips, chat template, streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import moekit
from moekit.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = ["hello world", "the quick brown fox jumps over the lazy dog", "hello there, hello again",
          "moekit runs mixture of experts models", "héllo wörld"] * 20
TEXTS = ["hello world", "héllo ✓", "ünïcödé ✓✓ 日本語 🙂", "  leading and trailing spaces  ",
         "tabs\tand\nnewlines", ""]


def _build(path: Path, with_config: bool = True) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if with_config:
        (path / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHAT_TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("tok") / "model")


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return load_tokenizer(tok_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens(tok):
    bos, eos = tok._tok.token_to_id("<s>"), tok._tok.token_to_id("</s>")
    ids = tok.encode("hello")
    assert ids[0] == bos and tok.encode("hello", add_special_tokens=False) == ids[1:]
    assert tok.eos_token_id == eos and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.decode(ids + [eos]) == "hello"  # special tokens skipped
    assert tok.decode(ids + [eos], skip_special_tokens=False) == "<s>hello</s>"


def test_chat_template(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    assert tok.apply_chat_template(messages) == "<s><|system|>be brief</s><|user|>héllo</s><|assistant|>"
    assert tok.apply_chat_template(messages[1:], add_generation_prompt=False) == "<s><|user|>héllo</s>"


def test_chat_template_from_jinja_file(tmp_path):
    path = _build(tmp_path / "m", with_config=False)
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tok = Tokenizer(path)
    assert tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "[a][b]"
    assert tok.eos_token_id is None


def test_chat_template_raise_exception(tmp_path):
    path = _build(tmp_path / "m", with_config=False)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ raise_exception('roles must alternate') }}"}))
    with pytest.raises(moekit.MoekitError, match="chat template: roles must alternate"):
        Tokenizer(path).apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template(tmp_path):
    tok = Tokenizer(_build(tmp_path / "m", with_config=False))
    with pytest.raises(moekit.MoekitError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("text", ["héllo ✓", "ünïcödé ✓✓ 日本語 🙂", "hello world"])
def test_stream_decoder_rebuilds_the_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # never a half character


def test_stream_decoder_holds_back_partial_characters(tok):
    ids = tok.encode("✓", add_special_tokens=False)
    assert len(ids) == 3  # one token per UTF-8 byte: the check mark was not in the corpus
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids] == ["", "", "✓"]


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(moekit.CheckpointError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "tokenizer.json") in message and "not found" in message
    assert "\n" not in message


def test_damaged_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(moekit.CheckpointError, match="cannot be read as a tokenizer"):
        Tokenizer(tmp_path)


def test_damaged_tokenizer_config(tmp_path):
    path = _build(tmp_path / "m", with_config=False)
    (path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(moekit.CheckpointError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer(path)


def _build_sentencepiece_style(path: Path) -> Path:
    """A Llama/Mistral-style tokenizer.json: '▁' for spaces, byte fallback, a leading-space strip."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz,.":
        vocab[ch] = len(vocab)
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("▁he", "ll"), ("▁w", "o"), ("▁", "w")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>",
                                 fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.mark.parametrize("text", ["hello world", "héllo ✓", "hello, wörld ✓✓ 🙂."])
def test_sentencepiece_style_round_trip_and_stream(tmp_path, text):
    tok = Tokenizer(_build_sentencepiece_style(tmp_path / "sp"))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
