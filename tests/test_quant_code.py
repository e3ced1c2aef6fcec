"""The sub-1-bit code: exact round trip on random ternary matrices of odd shapes, and sizes near
the entropy bound on QMoE-like statistics."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.quant.code import (MAX_WORD, build_dictionary, choose_dictionary, decode, encode, entropy_bits,
                               symbol_probabilities)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 7), cols=st.integers(1, 300), p_zero=st.floats(0.0, 0.99),
       bits=st.sampled_from([2, 3, 8, 10]), chunk=st.sampled_from([None, 1, 4, 32]), seed=st.integers(0, 10_000))
def test_round_trip_is_exact(rows, cols, p_zero, bits, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([p_zero, (1 - p_zero) / 2, (1 - p_zero) / 2]) + 1e-6
    codes = torch.multinomial(probs, rows * cols, replacement=True, generator=g).view(rows, cols).to(torch.uint8)
    # a dictionary built for other statistics must still code everything (it is only less compact)
    d = build_dictionary(symbol_probabilities(codes) if seed % 2 else (0.5, 0.25, 0.25), bits)
    words, starts = encode(codes[None], d, chunk)
    assert words.shape[:2] == (1, rows) and starts.shape == words.shape[:3]
    assert torch.equal(decode(words, starts, d.table, cols)[0], codes)


def test_dictionary_is_a_complete_code():
    d = build_dictionary((0.885, 0.0575, 0.0575), 8)
    lengths = (d.table[:, 1].to(torch.int64) & 0xFFFFFFFF) >> 27
    used = lengths > 0
    assert int(used.sum()) <= 256 and int(lengths.max()) <= MAX_WORD
    # Kraft equality of a complete ternary parse tree: sum 3^-len over words = 1
    assert abs(float((3.0 ** -lengths[used].double()).sum()) - 1.0) < 1e-9


def test_bits_per_parameter_near_the_entropy_bound():
    g = torch.Generator().manual_seed(0)
    codes = torch.multinomial(torch.tensor([0.885, 0.0575, 0.0575]), 64 * 2048, replacement=True,
                              generator=g).view(64, 2048).to(torch.uint8)
    probs = symbol_probabilities(codes)
    d = choose_dictionary(probs, codes.numel(), 64)
    words, starts = encode(codes, d)
    stored_bits = 8 * (words.numel() * words.element_size() + starts.numel() * starts.element_size())
    bits = stored_bits / codes.numel()
    bound = entropy_bits(probs)
    assert 0.6 < bound < 0.66
    assert bound < bits < 1.0  # QMoE: 0.807 at this zero share, with one fixed table
