"""mlxterp.core.positions: the one position-selection and token-matching rule."""

from __future__ import annotations

import pytest

from mlxterp.core.positions import ALL, find_token, match_token, names_one, select_positions
from mlxterp.errors import PositionError

TOKENS = ["<s>", "The", " capital", " of", " France", " is", "France"]


def test_indices_and_negatives():
    assert select_positions(0, TOKENS) == [0] and select_positions(-1, TOKENS) == [6]
    with pytest.raises(PositionError, match=r"position 7 is outside the prompt's 7 tokens \(0\.\.6, or -7\.\.-1\)"):
        select_positions(7, TOKENS)
    with pytest.raises(PositionError):
        select_positions(-8, TOKENS)


def test_slices_lists_and_all():
    assert select_positions(slice(1, 3), TOKENS) == [1, 2]
    assert select_positions(slice(-2, None), TOKENS) == [5, 6]
    assert select_positions([0, -1, "is"], TOKENS) == [0, 6, 5]
    assert select_positions(ALL, TOKENS) == list(range(7)) and select_positions(None, TOKENS) == list(range(7))
    with pytest.raises(PositionError, match="the slice 3:1 selects none"):
        select_positions(slice(3, 1), TOKENS)
    assert names_one(3) and names_one("x") and not names_one([1]) and not names_one(ALL) and not names_one(slice(1))


def test_token_text_exact_first_then_ignoring_surrounding_spaces():
    assert match_token("France", TOKENS) == 6  # the exact token wins over " France"
    assert match_token(" France", TOKENS) == 4
    assert match_token("capital", TOKENS) == 2  # BPE's leading space ignored
    assert match_token("capital ", TOKENS) == 2


def test_no_substring_matches_and_errors_name_the_valid_tokens():
    with pytest.raises(PositionError) as error:
        match_token("ance ", TOKENS)  # was " France" in the evaluator and an error in the editor
    assert "no token of the input matches 'ance '" in str(error.value)
    assert "4:' France'" in error.value.valid
    with pytest.raises(PositionError, match="did you mean 'capital'"):
        match_token("capitol", TOKENS)
    assert find_token("cap", TOKENS) is None


def test_empty_text_is_an_error_everywhere():
    with pytest.raises(PositionError, match='an empty token text "" names no token'):
        match_token("", TOKENS)
    with pytest.raises(PositionError):
        select_positions(["", 0], TOKENS)
    assert find_token("", ["", "a"]) is None
    assert find_token(" ", ["a", " "]) == 1 and find_token(" ", ["a", "\n"]) is None
