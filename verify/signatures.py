"""Failure signatures: which failures are the same bug.

A signature is (target, failure class, symptom, trigger):

- the **class** says what kind of wrong it is (`FAILURE_CLASSES`);
- the **symptom** what the wrong result looks like: the diagnosis of the
  failing row (`flashcheck.verify.explain.diagnose`), the canonical name of a
  device fault, or an exception's message with the numbers taken out;
- the **trigger** the row feature that names it, when one does ("fully
  masked row", "NaN in query row", ...).

Two failures with equal signatures are grouped as one finding. The
campaign then shrinks a finding's smallest case (`flashcheck.verify.minimize`)
and adds the features that could not be shrunk away ("needs"), which splits
a signature when its cases need different things.

>>> signature_key("sdpa-cudnn", "wrong", "output row equals the attn_mask ignored", "fully masked row")
'sdpa-cudnn | wrong | output row equals the attn_mask ignored | fully masked row'
>>> normalize_message("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB at 0x7f3a")
'RuntimeError: CUDA out of memory. Tried to allocate N GiB at ADDR'
"""

from __future__ import annotations

import re

__all__ = ["FAILURE_CLASSES", "normalize_message", "signature_key", "slug", "symptom_for"]

#: What kind of wrong a failure is.
#: wrong: an element beyond its bound; non-finite: NaN/Inf from finite inputs;
#: nan-dropped: a row that reads a NaN came out finite; nan-leak: a row with
#: only finite inputs came out non-finite; lse: the log-sum-exp beyond its
#: bound; shape, dtype: the output's; raised: the target raised; fault: a
#: device fault (the CUDA context is dead); crash: the process died; hang:
#: no answer within the timeout.
#: The grad-* classes are the same for the gradients dQ, dK, dV of a --grad
#: run (grad-raised: the backward raised while the forward returned).
FAILURE_CLASSES = ("wrong", "non-finite", "nan-dropped", "nan-leak", "lse", "shape", "dtype", "raised", "fault",
                   "crash", "hang", "grad-wrong", "grad-non-finite", "grad-shape", "grad-dtype", "grad-raised")

_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?\d+(\.\d+)?([eE][-+]?\d+)?")


def normalize_message(message: str, *, limit: int = 160) -> str:
    """An error message's first line with addresses and numbers replaced, so
    that the same error on different shapes reads the same."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    first = _ADDRESS.sub("ADDR", first)
    first = _NUMBER.sub("N", first)
    return first[:limit]


def symptom_for(failure_class: str, *, diagnosis: str | None = None, message: str | None = None) -> str:
    """The symptom text of a failure of ``failure_class``."""
    if failure_class not in FAILURE_CLASSES:
        raise ValueError(f"unknown failure class {failure_class!r}; expected one of {FAILURE_CLASSES}")
    if failure_class in ("raised", "fault", "crash", "grad-raised"):
        return normalize_message(message or failure_class)
    if failure_class == "hang":
        return "no answer within the timeout"
    if diagnosis:
        return diagnosis
    return {
        "wrong": "error beyond the bound",
        "non-finite": "NaN or Inf output from finite inputs",
        "nan-dropped": "a row that reads a NaN is finite",
        "nan-leak": "a row with finite inputs is not finite",
        "lse": "log-sum-exp beyond its bound",
        "shape": "wrong output shape",
        "dtype": "wrong output dtype",
        "grad-wrong": "gradient beyond the bound",
        "grad-non-finite": "NaN or Inf gradient from finite inputs",
        "grad-shape": "wrong gradient shape",
        "grad-dtype": "wrong gradient dtype",
    }[failure_class]


def signature_key(target: str, failure_class: str, symptom: str, trigger: str | None = None) -> str:
    """The signature as one line: "target | class | symptom[ | trigger]"."""
    parts = [target, failure_class, symptom] + ([trigger] if trigger else [])
    return " | ".join(parts)


def slug(key: str, *, limit: int = 80) -> str:
    """A file-name-safe short form of a signature key.

    >>> slug("sdpa-cudnn | wrong | output row equals the attn_mask ignored | fully masked row")
    'sdpa-cudnn-wrong-output-row-equals-the-attn_mask-ignored-fully-masked-row'
    """
    text = re.sub(r"[^A-Za-z0-9_.]+", "-", key).strip("-")
    return text[:limit].rstrip("-") or "failure"
