from __future__ import annotations

import random

from covo.rewards.covo.segmentation import states, step_ends


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


def test_a_line_with_both_brackets_opens_no_block():
    # "\\] so \\[" holds both: an ordinary line; "y" too; "\\]" closes nothing open
    tokens = _tokens("a", "\\] so \\[", "y", "\\]") + ["end"]
    assert step_ends(tokens) == [1, 2, 3, 4, 5]


def test_inside_a_block_a_line_with_both_brackets_does_not_close_it():
    # "\\[" opens; "x \\] y \\[" holds both (a continuation); "z \\]" closes: one step 0..3
    tokens = _tokens("\\[", "x \\] y \\[", "z \\]") + ["end"]
    assert step_ends(tokens) == [3, 4]


def test_a_second_opener_inside_a_block_is_a_continuation():
    # "\\[ a", "b", "\\[ c", "d \\]": one block from the first opener to the closer
    tokens = _tokens("\\[ a", "b", "\\[ c", "d \\]") + ["end"]
    assert step_ends(tokens) == [4, 5]


def test_lines_after_an_unclosed_opener_stay_lines_even_if_a_block_follows_alone():
    # the opener on line 1 is never closed by a line without "\\[": all lines stand alone
    tokens = _tokens("a", "\\[ b", "c", "\\[ d \\]") + ["e"]
    assert step_ends(tokens) == [1, 2, 3, 4, 5]


def test_colon_lines_merge_with_the_next_when_15_or_more_lines():
    # 16 lines, lines 2 and 6 (0-based) end with ":" (one with trailing spaces) -> 14 steps:
    # line 2 joins line 3 (end 4), line 6 joins line 7 (end 8); every other line stands alone.
    lines = [f"line {j}" for j in range(16)]
    lines[2] += ":"
    lines[6] += ":   "
    ends = step_ends(_tokens(*lines))
    assert ends == [1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16]


def test_colon_lines_merge_in_pairs_never_rechecked():
    # released code: "l0:" takes "l1:" in, and that pair is not looked at again, so "l2"
    # stays a step of its own: 17 lines -> 16 steps -> regrouped into 15 chunks
    # (16 = 15 * 1 + 1: 14 chunks of one step, then one of two)
    lines = [f"l{j}" for j in range(17)]
    lines[0] += ":"
    lines[1] += ":"
    ends = step_ends(_tokens(*lines))
    assert ends == [2] + list(range(3, 16)) + [17]


def test_colon_chain_folds_into_one_step_with_chains():
    # `chains`: lines 0, 1 end with ":" -> lines 0..2 are one step; 17 lines -> 15 steps
    lines = [f"l{j}" for j in range(17)]
    lines[0] += ":"
    lines[1] += ":"
    ends = step_ends(_tokens(*lines), colon_merge="chains")
    assert ends == [3] + list(range(4, 18))
    assert len(ends) == 15


def test_colon_pairs_skip_the_line_taken_in():
    # 15 lines: "a:", "b:", "c:", "d", ... -> pairs ("a:", "b:"), ("c:", "d"), then the rest
    lines = ["a:", "b:", "c:", "d"] + [f"x{j}" for j in range(11)]
    assert step_ends(_tokens(*lines)) == [2, 4] + list(range(5, 16))
    # a colon-ended last line has no next line and stays as it is
    lines = [f"x{j}" for j in range(14)] + ["end:"]
    assert step_ends(_tokens(*lines)) == list(range(1, 16))


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


def naive_steps(text: str, max_steps: int = 15) -> list[list[str]]:
    """docs/covo.md, Steps and states, on plain text, written without the token-level code: the
    stripped non-empty lines of each step."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    opens = ["\\[" in line and "\\]" not in line for line in lines]
    closes = ["\\]" in line and "\\[" not in line for line in lines]
    units, i = [], 0
    while i < len(lines):
        closers = [c for c in range(i + 1, len(lines)) if closes[c]]
        if opens[i] and not closers:  # never closed: every line from here on stands alone
            units += [[line] for line in lines[i:]]
            break
        last = closers[0] if opens[i] else i
        units.append(lines[i : last + 1])
        i = last + 1
    if len(units) >= max_steps:
        paired, i = [], 0
        while i < len(units):
            take = 2 if units[i][-1].endswith(":") and i + 1 < len(units) else 1
            paired.append(sum(units[i : i + take], []))
            i += take
        units = paired
    if len(units) >= max_steps:
        size, longer = divmod(len(units), max_steps)
        sizes = [size] * (max_steps - longer) + [size + 1] * longer
        starts = [sum(sizes[:k]) for k in range(max_steps)]
        units = [sum(units[a : a + n], []) for a, n in zip(starts, sizes)]
    return units


def test_token_level_steps_match_the_rules_on_random_texts():
    rng = random.Random(0)
    pieces = ["a", "b:", "\\[", "\\]", " ", ":", "x = 1", "\\] \\[", ""]
    for _ in range(3000):
        n_lines = rng.choice([rng.randint(1, 6), rng.randint(14, 40)])
        lines = ["".join(rng.choices(pieces, k=rng.randint(0, 3))) for _ in range(n_lines)]
        text = "\n".join(lines) + rng.choice(["", "\n"])
        want = naive_steps(text)
        if not want:
            continue
        ends = step_ends(list(text))  # one token per character
        got = [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        assert [[ln.strip() for ln in g.split("\n") if ln.strip()] for g in got] == want, text
