from __future__ import annotations

from covo.segmentation import states, step_ends


def _tokens(*lines: str) -> list[str]:
    """One token per line, each ending with its newline."""
    return [line + "\n" for line in lines]


def test_no_newline_is_one_step():
    assert step_ends(["The", " answer", " is", " 4"]) == [4]


def test_empty_response_has_no_steps():
    assert step_ends([]) == []
    assert states(7, []) == []
    assert states(7, [], include_prompt_state=True) == []


def test_cut_after_the_token_that_holds_the_newline():
    # "a.\n\n" ends inside token 1 (two newlines, one token): no cut inside it, one line end.
    tokens = ["a", ".\n\n", "b", " c", ":\n", "d"]
    assert step_ends(tokens) == [2, 5, 6]


def test_newline_in_the_middle_of_a_token_ends_the_line_after_that_token():
    assert step_ends(["x", "=1\nso", " y", "\n", "z"]) == [2, 4, 5]


def test_empty_lines_join_the_following_step():
    # lines: "\n"(0:1) empty, "a\n"(1:3), "\n"(3:4) empty, "  \n"(4:5) empty, "b"(5:6)
    tokens = ["\n", "a", "\n", "\n", "  \n", "b"]
    assert step_ends(tokens) == [3, 6]


def test_trailing_empty_lines_join_the_last_step():
    # lines: "a\n"(0:2), "b\n"(2:4), "\n"(4:5), " \n"(5:6): the last two are empty
    tokens = ["a", "\n", "b", "\n", "\n", " \n"]
    assert step_ends(tokens) == [2, 6]


def test_whitespace_only_response_is_one_step():
    assert step_ends(["\n", " ", "\n"]) == [3]


def test_display_math_over_three_lines_is_one_step():
    # lines: "We get\n"(0:2), "\[\n"(2:3), "x = 1\n"(3:6), "\]\n"(6:7), "done"(7:8)
    tokens = ["We get", "\n", "\\[\n", "x", " = 1", "\n", "\\]\n", "done"]
    assert step_ends(tokens) == [2, 7, 8]


def test_inline_display_math_on_one_line_is_an_ordinary_line():
    tokens = _tokens("\\[ x = 1 \\]", "next") + ["end"]
    assert step_ends(tokens) == [1, 2, 3]


def test_unclosed_display_math_stays_a_line_of_its_own():
    tokens = _tokens("\\[", "x = 1") + ["end"]
    assert step_ends(tokens) == [1, 2, 3]


def test_colon_lines_merge_with_the_next_when_15_or_more_lines():
    # 16 lines, lines 2 and 6 (0-based) end with ":" (one with trailing spaces) -> 14 steps:
    # line 2 joins line 3 (end 4), line 6 joins line 7 (end 8); every other line stands alone.
    lines = [f"line {j}" for j in range(16)]
    lines[2] += ":"
    lines[6] += ":   "
    ends = step_ends(_tokens(*lines))
    assert ends == [1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16]


def test_colon_chain_folds_into_one_step():
    # lines 0, 1 end with ":" -> lines 0..2 are one step; 17 lines -> 15 steps, so no chunking
    lines = [f"l{j}" for j in range(17)]
    lines[0] += ":"
    lines[1] += ":"
    ends = step_ends(_tokens(*lines))
    assert ends == [3] + list(range(4, 18))
    assert len(ends) == 15


def test_colon_lines_are_kept_when_fewer_than_15_lines():
    lines = ["Step 1:", "x = 2", "Step 2:", "y = 3"]
    assert step_ends(_tokens(*lines)) == [1, 2, 3, 4]


def test_40_lines_regroup_into_15_chunks_first_ones_shorter():
    # 40 = 15 * 2 + 10: 5 chunks of 2 lines (ends 2..10), then 10 chunks of 3 (ends 13..40)
    ends = step_ends(_tokens(*[f"x{j}" for j in range(40)]))
    assert ends == [2, 4, 6, 8, 10, 13, 16, 19, 22, 25, 28, 31, 34, 37, 40]
    sizes = [b - a for a, b in zip([0] + ends, ends)]
    assert sizes == [2] * 5 + [3] * 10


def test_exactly_15_lines_stay_15_steps():
    assert step_ends(_tokens(*[f"x{j}" for j in range(15)])) == list(range(1, 16))


def test_max_steps_knob():
    # 7 lines into 3 chunks: 7 = 3 * 2 + 1 -> sizes 2, 2, 3
    assert step_ends(_tokens(*[f"x{j}" for j in range(7)]), max_steps=3) == [2, 4, 7]


def test_chunks_count_tokens_not_lines():
    # 15 lines of 2 tokens each, the last one without newline: a step end is a token position
    tokens = [t for j in range(15) for t in (f"x{j}", "\n")][:-1]
    assert step_ends(tokens) == [2 * j for j in range(1, 15)] + [29]


def test_states_released_and_paper():
    # released: prompt_len + each end; paper: the bare prompt, then all but the last end
    assert states(5, [2, 6, 9]) == [7, 11, 14]
    assert states(5, [2, 6, 9], include_prompt_state=True) == [5, 7, 11]
    assert states(5, [9], include_prompt_state=True) == [5]
