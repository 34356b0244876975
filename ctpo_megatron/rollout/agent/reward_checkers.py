"""String checkers of the reference's "any checker accepts" reward (`RewardConfig.mode="any"`).

Two classic rules, written from their published descriptions:

- MATH-style (Hendrycks et al.): the content of the last `\\boxed{}` / `\\fbox{}` and the
  ground truth are normalised (`strip_string`: spaces, `\\left`, `tfrac`, units after
  `\\text{ `, `a/b` -> `\\frac{a}{b}`, shorthand `\\frac12`, `\\sqrt2`, ...) and compared as strings.
- DAPO-style (Minerva normalisation): the last `Answer: ...` line within the final 300
  characters of the response, normalised (`normalize_final_answer`) and compared with the
  normalised ground truth.

The third checker (math-verify over the whole text) lives in `reward.py`, next to the other
math-verify code that needs a main thread.
"""

from __future__ import annotations

import re


def last_boxed_only(text: str) -> str | None:
    """`\\boxed{...}` (braces balanced) or `\\boxed ...` of the last box in `text`, as MATH's
    `last_boxed_only_string` returns it; None when there is none or it is unclosed."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def _unbox(s: str) -> str:
    if s.startswith("\\boxed "):
        return s[len("\\boxed "):]
    if s.startswith("\\boxed{") and s.endswith("}"):
        return s[len("\\boxed{"):-1]
    raise ValueError(f"not a boxed answer: {s[:50]!r}")


def _fix_fracs(s: str) -> str:
    head, *rest = s.split("\\frac")
    out = head
    for part in rest:
        out += "\\frac"
        if part.startswith("{"):
            out += part
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "{" + part[0] + "}" + part[1:]
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str) -> str:
    head, *rest = s.split("\\sqrt")
    return head + "".join("\\sqrt" + (p if p.startswith("{") else "{" + p[:1] + "}" + p[1:]) for p in rest)


def strip_string(s: str) -> str:
    """MATH's answer normalisation (raises on a malformed unit split, as the original)."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s:
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("ambiguous units")
        s = parts[0]
    s = s.replace("\\\\%", "").replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _fix_fracs(_fix_sqrt(s).replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def math_style_correct(text: str, ground_truth: str) -> bool:
    """MATH-style check: normalised last box == normalised ground truth."""
    boxed = last_boxed_only(text)
    if boxed is None:
        return False
    try:
        answer = _unbox(boxed)
    except ValueError:
        return False
    try:
        return strip_string(answer) == strip_string(ground_truth)
    except (ValueError, IndexError):
        return answer == ground_truth


_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""),
                  ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
            "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
            "meters", "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}",
            "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
            r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots"]


def normalize_final_answer(answer: str) -> str:
    """Minerva's final-answer normalisation (as used by DAPO's reward)."""
    answer = answer.split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        answer = answer.replace(old, new)
    for expr in _REMOVED:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    for cmd in ("text", "textbf", "overline"):
        answer = re.sub(r"(\\" + cmd + r"\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def dapo_style_correct(text: str, ground_truth: str) -> bool:
    """DAPO-style check: the last "Answer: ..." line of the final 300 characters."""
    found = re.findall(r"(?i)Answer\s*:\s*([^\n]+)", text[-300:])
    pred = normalize_final_answer(found[-1] if found else "[INVALID]")
    return pred == normalize_final_answer(ground_truth)
