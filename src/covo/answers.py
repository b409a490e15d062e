"""Final answers: extraction from responses, equivalence, and clustering in sample order."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable

import math_verify

from covo.infra.errors import SettingError

_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])-)?(?<![\w.])"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)"
)
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[+-]?\d*\.\d+")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|~")
# Bare words parse as products of symbols in sympy ("yes" == "sey"), so compare them as strings.
_WORD = re.compile(r"[A-Za-z]{2,}")


def _last_box(text: str) -> tuple[int, str] | None:
    """Position and name of the last `\\boxed` (the last `\\fbox` when there is no `\\boxed`)."""
    for command in ("\\boxed", "\\fbox"):
        pos = text.rfind(command)
        if pos >= 0:
            return pos, command
    return None


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the first `}` from `start` on that brings the brace count back to 0."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def extract_released_boxed(text: str) -> str | None:
    """The released CoVo code's answer: what the last box command holds, exactly as written.

    Only the last `\\boxed` counts (`\\fbox` only without any `\\boxed`); the answer runs to the
    first `}` that balances the braces counted from the command on; none such (an unclosed
    last box, or no box) is no answer, never an earlier box or a number. An empty box is an
    answer (""), spaces are kept. A command not followed by a brace group (`\\boxed 5, so {x}`)
    gives everything after it up to that `}` (" 5, so {x}").
    """
    found = _last_box(text)
    if found is None:
        return None
    pos, command = found
    end = _closing_brace(text, pos)
    if end is None:
        return None
    rest = text[pos + len(command) : end + 1]
    inner = rest.lstrip()
    return inner[1:-1] if inner.startswith("{") else rest


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (balanced; `\\fbox` only without any `\\boxed`).

    The released rule with its defects fixed: an empty box is no answer, `\\boxed 5` reads 5,
    the content is stripped. An unclosed last box is no answer (never an earlier box).
    """
    found = _last_box(text)
    if found is None:
        return None
    pos, command = found
    rest = text[pos + len(command) :]
    inner = rest.lstrip()
    if inner.startswith("{"):
        end = _closing_brace(inner, 0)
        content = inner[1:end] if end is not None else None
    elif inner and len(inner) < len(rest):
        content = re.match(r"[^\s$]*", inner).group().rstrip(".,;:")
    else:
        content = None
    return (content.strip() or None) if content is not None else None


def extract_last_number(text: str) -> str | None:
    """Last integer, decimal or fraction in `text` (`1,234` -> `1234`, `.5` -> `0.5`)."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    number = matches[-1].replace(",", "")
    return re.sub(r"^(-?)\.", r"\g<1>0.", number)


def extract_boxed_or_last_number(text: str) -> str | None:
    """The boxed answer if there is one, else the last number."""
    boxed = extract_boxed(text)
    return boxed if boxed is not None else extract_last_number(text)


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "released_boxed": extract_released_boxed,
    "boxed": extract_boxed,
    "last_number": extract_last_number,
    "boxed_or_last_number": extract_boxed_or_last_number,
}


def get_extractor(name: str) -> Callable[[str], str | None]:
    if name not in EXTRACTORS:
        raise SettingError(f"unknown answer extractor {name!r}; valid: {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name]


def normalize_answer(s: str) -> str:
    """Cheap canonical form for exact comparison (`$2.50$` -> `2.5`, `\\dfrac` -> `\\frac`)."""
    s = s.strip().replace("$", "")
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _LATEX_SPACE.sub("", s)
    s = re.sub(r"\s+", "", s)
    s = s.replace("{,}", ",").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if s.endswith("."):
        s = s[:-1]
    if s.startswith("+") and len(s) > 1:
        s = s[1:]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        s = s.rstrip("0").rstrip(".")
        s = re.sub(r"^(-?)\.", r"\g<1>0.", s) if s not in ("", "-") else "0"
    return s


class AnswerEquivalence:
    """Answer equality: normalised strings first, then math-verify under a time limit.

    Parses and verdicts are cached (oldest entries dropped beyond `max_cache`), keyed by the
    unordered pair, so one instance shared across calls pays for each pair once.
    """

    def __init__(self, timeout_s: float = 2.0, max_cache: int = 200_000):
        self.timeout_s = timeout_s
        self.max_cache = max_cache
        self._parsed: dict[str, list] = {}
        self._verdicts: dict[tuple[str, str], bool] = {}

    def _time_limit(self) -> int | None:
        # math-verify enforces its limit with SIGALRM (whole seconds), which only the main
        # thread may set; elsewhere it runs without a limit instead of raising.
        if self.timeout_s <= 0 or threading.current_thread() is not threading.main_thread():
            return None
        return max(1, math.ceil(self.timeout_s))

    def _remember(self, cache: dict, key, value) -> None:
        if len(cache) >= self.max_cache:
            del cache[next(iter(cache))]
        cache[key] = value

    def _parse(self, answer: str) -> list:
        if answer not in self._parsed:
            # Bare `1/2` is read as text; inside `$...$` it is maths, like `\frac{1}{2}`.
            wrapped = f"${answer.strip().strip('$')}$"
            parsed = math_verify.parse(wrapped, parsing_timeout=self._time_limit())
            self._remember(self._parsed, answer, parsed)
        return self._parsed[answer]

    def equivalent(self, a: str, b: str) -> bool:
        na, nb = normalize_answer(a), normalize_answer(b)
        if na == nb:
            return True
        if _WORD.fullmatch(na) or _WORD.fullmatch(nb):
            return na.lower() == nb.lower()
        key = (a, b) if a <= b else (b, a)
        if key not in self._verdicts:
            gold, target = self._parse(key[0]), self._parse(key[1])
            verdict = math_verify.verify(gold, target, timeout_seconds=self._time_limit())
            self._remember(self._verdicts, key, bool(verdict))
        return self._verdicts[key]

    __call__ = equivalent

    def is_correct(self, pred: str | None, label: str) -> bool:
        """Whether `pred` matches `label` (a bare answer or text holding `\\boxed{...}`)."""
        if pred is None:
            return False
        gold = extract_boxed(label)
        return self.equivalent(pred, gold if gold is not None else label)


def cluster_answers(
    answers: list[str | None], equivalence: Callable[[str, str], bool]
) -> tuple[list[int], list[str]]:
    """Greedy clusters in sample order: each answer joins the first equivalent representative.

    Returns (cluster index per answer, -1 for None; representative answer per cluster).
    """
    clusters: list[int] = []
    representatives: list[str] = []
    for answer in answers:
        if answer is None:
            clusters.append(-1)
            continue
        for c, rep in enumerate(representatives):
            if equivalence(rep, answer):
                clusters.append(c)
                break
        else:
            clusters.append(len(representatives))
            representatives.append(answer)
    return clusters, representatives
