"""Reasoning steps and intermediate states of a response, on its own token ids.

A step boundary sits right after a token whose decoded text holds a newline, so a state is
exactly a prefix the policy saw (a token such as `.\\n` is never cut). The rules are those of the
released code's `process_thoughts` (docs/covo.md, Steps and states): whitespace-only lines
carry no step of their own (their tokens join the following step; trailing ones join the last
step), a display-math block is one step, and with `max_steps` or more steps colon-ended lines
take the next line in, then the lines are regrouped into exactly `max_steps` chunks.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _join(lines: list[Line]) -> Line:
    return lines[-1][0], "".join(text for _, text in lines)


def _math_blocks(lines: list[Line]) -> list[Line]:
    """Join each display-math block into one unit, as the released `process_thoughts` does.

    A line with `\\[` and no `\\]` opens a block; every line after it joins, up to and including
    the first line with `\\]` and no `\\[`. A line holding both is an ordinary line outside a
    block and a continuation inside one. A block never closed leaves its lines one unit each.
    """
    units: list[Line] = []
    block: list[Line] = []
    for line in lines:
        text = line[1]
        if block:
            block.append(line)
            if "\\]" in text and "\\[" not in text:
                units.append(_join(block))
                block = []
        elif "\\[" in text and "\\]" not in text:
            block = [line]
        else:
            units.append(line)
    return units + block


def _merge_colon_pairs(units: list[Line]) -> list[Line]:
    """One left-to-right pass: a unit ending with `:` takes the next unit in, and the pair is
    not looked at again (released code: `l0:`, `l1:`, `l2` give `l0:\\nl1:` and `l2`)."""
    merged: list[Line] = []
    j = 0
    while j < len(units):
        if units[j][1].rstrip().endswith(":") and j + 1 < len(units):
            merged.append(_join(units[j : j + 2]))
            j += 2
        else:
            merged.append(units[j])
            j += 1
    return merged


def _merge_colon_chains(units: list[Line]) -> list[Line]:
    """Merge every unit whose text ends with `:` into the next, so chains of such units fold
    into the unit that ends them (`l0:`, `l1:`, `l2` give one unit)."""
    merged: list[Line] = []
    for unit in units:
        if merged and merged[-1][1].rstrip().endswith(":"):
            merged[-1] = _join([merged[-1], unit])
        else:
            merged.append(unit)
    return merged


COLON_MERGES: dict[str, Callable[[list[Line]], list[Line]]] = {
    "pairs": _merge_colon_pairs,
    "chains": _merge_colon_chains,
}


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


def step_ends(token_texts: list[str], max_steps: int = 15, colon_merge: str = "pairs") -> list[int]:
    """Exclusive token end of each step; the last one is `len(token_texts)`.

    `token_texts[j]` is the decoded text of response token j alone. Returns T ends with
    1 <= T <= max_steps (an empty response gives []). `colon_merge`: `pairs` (released code)
    or `chains`, applied only when `max_steps` or more units remain.

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
        units = COLON_MERGES[colon_merge](units)
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
