"""The body of ``POST /generate`` checked before it queues: a JSON object with known fields of the right types
and bounds, or a :class:`RequestError` (a 4xx status, what was expected, what was found, how to fix it)."""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

from ..core.errors import DQDeployError

MAX_BODY_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 50.0
DEFAULT_GUIDANCE = 7.5  # diffusers' StableDiffusionPipeline default (a served pipeline has its family's)
FORMATS = ("png", "json")


class RequestError(DQDeployError):
    """A request the server refuses: ``status`` is its HTTP status (4xx; 503 when the queue is full)."""

    def __init__(self, status: int, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status, self.message = status, message

    def to_json(self) -> dict[str, Any]:
        """``{"error": ..., "hint": ...}`` (the body of the error response)."""
        return {"error": self.message, **({"hint": self.hint} if self.hint else {})}


@dataclass(frozen=True)
class Rules:
    """What a served export accepts: prompts or not, the default and largest step count. For prompts: the default
    guidance scale and how it guides (``cfg``: classifier-free, with a negative prompt; else the denoiser's own
    guidance input, as Flux's, and no negative prompt); ``model`` names the denoiser in refusals."""

    conditional: bool
    default_steps: int
    max_steps: int
    guidance: float = DEFAULT_GUIDANCE
    cfg: bool = True
    model: str = "denoiser"

    @property
    def fields(self) -> tuple[str, ...]:
        """The body's known fields."""
        prompts = ("prompt", *(("negative_prompt",) if self.cfg else ()), "guidance") if self.conditional else ()
        return (*prompts, "seed", "steps", "format")

    @property
    def guidance_meaning(self) -> str:
        """What a guidance scale does to this export (for the hint of a refused one)."""
        if self.cfg:
            return "above 1: classifier-free guidance; at most 1: none"
        return f"the {self.model}'s guidance input: no classifier-free guidance"


@dataclass(frozen=True)
class Job:
    """One checked request: what it asks the model for."""

    seed: int
    steps: int
    prompt: str | None = None
    negative_prompt: str = ""
    guidance: float = DEFAULT_GUIDANCE
    format: str = "png"


def parse_job(raw: bytes, rules: Rules) -> Job:
    """The :class:`Job` of a request body, or :class:`RequestError` (400/413/422)."""
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(413, f"a body of {len(raw)} bytes: expected at most {MAX_BODY_BYTES}",
                           hint="send one request per image with a short prompt")
    example = 'send a JSON object, e.g. {%s"seed": 0}' % ('"prompt": "a cat", ' if rules.conditional else "")
    try:
        body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, a number of 5000 digits, deep nesting
        raise RequestError(400, f"the body is not JSON ({type(exc).__name__}: {str(exc)[:100]})",
                           hint=example) from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the body is a JSON {type(body).__name__}: expected an object", hint=example)
    body = _without_negative(body, rules)
    unknown = sorted(set(body) - set(rules.fields))
    if unknown:
        why = ("" if rules.conditional or not set(unknown) & {"prompt", "negative_prompt", "guidance"}
               else " (this export is unconditional: it samples from noise and takes no prompt)")
        if "class_label" in unknown:
            why += " (this export's graph has no class input: it takes no class label)"
        raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))}{why}",
                           hint=f"the fields are: {', '.join(rules.fields)}")
    kw: dict[str, Any] = {"seed": _whole(body, "seed", 0, MAX_SEED, secrets.randbits(63)),
                          "steps": _whole(body, "steps", 1, rules.max_steps, rules.default_steps),
                          "format": _choice(body, "format", FORMATS)}
    if rules.conditional:
        kw["prompt"] = _text(body, "prompt", required=True)
        kw["negative_prompt"] = _text(body, "negative_prompt", required=False)
        kw["guidance"] = _number(body, "guidance", 0.0, MAX_GUIDANCE, rules.guidance, rules.guidance_meaning)
    return Job(**kw)


def _without_negative(body: dict[str, Any], rules: Rules) -> dict[str, Any]:
    """``body`` less an empty ``negative_prompt`` where the export takes none (as the library ignores one); a
    non-empty one is refused (422) before it queues, so it never fails the batch it would have joined."""
    if not rules.conditional or rules.cfg or "negative_prompt" not in body:
        return body
    if body["negative_prompt"] != "":
        found = _show(body["negative_prompt"])
        raise RequestError(422, f"negative_prompt={found}: expected none, a {rules.model} export is guidance-distilled "
                                "(guidance is its transformer's input, not classifier-free guidance), it takes no "
                                "negative prompt",
                           hint=f"leave out negative_prompt; steer with guidance (default {rules.guidance})")
    return {k: v for k, v in body.items() if k != "negative_prompt"}


def _whole(body: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(422, f"{name}={_show(value)}: expected a whole number in [{low}, {high}]",
                           hint=f"leave {name} out for the default ({default})" if name == "steps" else None)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float, default: float, meaning: str) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise RequestError(422, f"{name}={_show(value)}: expected a number in [{low}, {high}]",
                           hint=f"e.g. {default}, the default ({meaning})")
    return float(value)


def _text(body: dict[str, Any], name: str, *, required: bool) -> str:
    if name not in body and required:
        raise RequestError(422, f"no {name!r}: this export generates from a prompt",
                           hint='send {"prompt": "a cat"}')
    value = body.get(name, "")
    if not isinstance(value, str) or len(value) > MAX_PROMPT_CHARS:
        found = f"{len(value)} characters" if isinstance(value, str) else f"a JSON {type(value).__name__}"
        raise RequestError(422, f"{name}: expected a string of at most {MAX_PROMPT_CHARS} characters, found {found}",
                           hint="one prompt per request: concurrent requests are batched by the server")
    return value


def _choice(body: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = body.get(name, choices[0])
    if value not in choices:
        raise RequestError(422, f"{name}={_show(value)}: expected one of {', '.join(choices)}")
    return str(value)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
