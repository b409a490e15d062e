"""Reasoning steps and intermediate states of a response, on its own token ids.

A step boundary sits right after a token whose decoded text holds a newline, so a state is
exactly a prefix the policy saw (a token such as `.\\n` is never cut). Rules (COVO_SPEC section 3):
whitespace-only lines carry no step of their own (their tokens join the following step; trailing
ones join the last step), a display-math block from the line holding `\\[` to the line holding
`\\]` is one step, and long responses are merged down to at most `max_steps` steps.
"""

from __future__ import annotations

Line = tuple[int, str]  # (exclusive token end, text)


def _lines(token_texts: list[str]) -> list[Line]:
    """Split after every token holding a newline; the text after the last one is a line too."""
    lines, start = [], 0
    for j, text in enumerate(token_texts):
        if "\n" in text:
            lines.append((j + 1, "".join(token_texts[start : j + 1])))
            start = j + 1
    if start < len(token_texts):
        lines.append((len(token_texts), "".join(token_texts[start:])))
    return lines


def _math_blocks(lines: list[Line]) -> list[Line]:
    """Join each line that opens `\\[` with the lines up to the one that closes it.

    A line opens a block when its last `\\[` comes after its last `\\]`; an opener that is never
    closed stays a line of its own (the rest of the response is not swallowed into one step).
    """
    units, j = [], 0
    while j < len(lines):
        end, text = lines[j]
        if text.rfind("\\[") > text.rfind("\\]"):
            close = next((c for c in range(j + 1, len(lines)) if "\\]" in lines[c][1]), None)
            if close is not None:
                end = lines[close][0]
                text = "".join(t for _, t in lines[j : close + 1])
                j = close
        units.append((end, text))
        j += 1
    return units


def _merge_colon_lines(units: list[Line]) -> list[Line]:
    """Merge every unit whose text ends with `:` into the next (chains of such lines fold)."""
    merged: list[Line] = []
    for end, text in units:
        if merged and merged[-1][1].rstrip().endswith(":"):
            merged[-1] = (end, merged[-1][1] + text)
        else:
            merged.append((end, text))
    return merged


def _chunk_ends(ends: list[int], n_chunks: int) -> list[int]:
    """Ends of `n_chunks` contiguous chunks of `ends`, the first chunks one unit shorter.

    >>> _chunk_ends(list(range(1, 8)), 3)  # 7 = 3 * 2 + 1: sizes 2, 2, 3
    [2, 4, 7]
    """
    size, longer = divmod(len(ends), n_chunks)
    sizes = [size] * (n_chunks - longer) + [size + 1] * longer
    chunk_ends, used = [], 0
    for s in sizes:
        used += s
        chunk_ends.append(ends[used - 1])
    return chunk_ends


def step_ends(token_texts: list[str], max_steps: int = 15) -> list[int]:
    """Exclusive token end of each step; the last one is `len(token_texts)`.

    `token_texts[j]` is the decoded text of response token j alone. Returns T ends with
    1 <= T <= max_steps (an empty response gives []).

    >>> step_ends(["a", ".\\n", "\\n", "b", "\\n", "c"])
    [2, 5, 6]
    """
    if not token_texts:
        return []
    units = [line for line in _lines(token_texts) if line[1].strip()]
    if not units:
        return [len(token_texts)]
    units = _math_blocks(units)
    if len(units) >= max_steps:
        units = _merge_colon_lines(units)
    ends = [end for end, _ in units]
    ends[-1] = len(token_texts)  # trailing whitespace-only lines join the last step
    if len(ends) >= max_steps:
        ends = _chunk_ends(ends, max_steps)
    return ends


def states(prompt_len: int, ends: list[int], include_prompt_state: bool = False) -> list[int]:
    """State end positions in the prompt + response sequence, one per step (same T).

    Released code: state k ends with step k (the last state holds the answer line). Paper
    (`include_prompt_state`): s_0 is the bare prompt and the state after the last step is dropped.

    >>> states(10, [3, 7, 9]), states(10, [3, 7, 9], include_prompt_state=True)
    ([13, 17, 19], [10, 13, 17])
    """
    if not ends:
        return []
    if include_prompt_state:
        return [prompt_len] + [prompt_len + e for e in ends[:-1]]
    return [prompt_len + e for e in ends]
