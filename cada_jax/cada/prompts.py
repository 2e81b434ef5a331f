"""Chat prompts for the four variants the paper compares, and the plain prompt used for training.

Every variant sends the same user message, the request followed by `FORMAT_INSTRUCTIONS`; the
variants differ only in the system message, which carries the guidance the model reasons over:

    none    no guidance (no system message unless `system_prompt` is given)
    code    the extensive, DA-style specification
    simple  the simple codes (statutes)
    cases   the statutes plus the k precedents most relevant to the request (CADA)

`build_plain_messages` is the prompt without any guidance. Reasoning chains generated under a
guided variant are trained against the plain prompt (context distillation), so the trained model
reasons about safety without the spec in its context. Because the user message is identical, the
plain prompt is exactly the guided one minus the guidance.

The `cases` system text stays compact (about 500 words with k=3 for the built-in spec) so it fits a
small model's 2k-token context together with the request and a reasoning chain. The `code` text is
deliberately long (about 1,800 words): that length is what the `code` ablation is about.
"""

from __future__ import annotations

from cada_jax.cada.retrieval import retrieve_for
from cada_jax.cada.spec import Spec, default_spec, render_case, render_code, render_statutes
from cada_jax.rewards.format import FORMAT_INSTRUCTIONS

VARIANTS: tuple[str, ...] = ("none", "code", "simple", "cases")

CODE_INTRO = "Follow this safety specification when deciding how to respond to the user."
STATUTES_OUTRO = "Apply these codes to the user's request and cite them by id in your reasoning."
CASES_INTRO = (
    "Precedents: earlier decisions on similar requests. Reason by analogy, and note where the "
    "user's request differs from them."
)
CASES_OUTRO = (
    "Apply the codes, guided by the precedents, to the user's request; cite codes by id in your "
    "reasoning."
)


def _check_request(request: object) -> str:
    if not isinstance(request, str) or not request.strip():
        raise ValueError(f"the request must be a non-empty string, got {request!r}"[:200])
    return request.strip()


def _check_variant(variant: object) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown prompt variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return variant  # type: ignore[return-value]


def user_content(request: str) -> str:
    """The user message of every variant: the request, a blank line, the format instructions."""
    return f"{_check_request(request)}\n\n{FORMAT_INSTRUCTIONS}"


def variant_context(request: str, variant: str, *, spec: Spec | None = None, k: int = 3,
                    category: str | None = None) -> str:
    """The guidance a variant shows the model ("" for `none`); the system message without `system_prompt`."""
    _check_variant(variant)
    request = _check_request(request)
    if variant == "none":
        return ""
    spec = default_spec() if spec is None else spec
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a cada_jax.cada.spec.Spec (from load_spec), got {type(spec).__name__}")
    if variant == "code":
        return f"{CODE_INTRO}\n\n{render_code(spec)}"
    statutes = render_statutes(spec)
    if variant == "simple":
        return f"{statutes}\n\n{STATUTES_OUTRO}"
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"the cases variant needs k >= 1 precedents, got k={k!r}")
    if category is not None:
        spec.categories.check(category)
    if not spec.cases:
        raise ValueError("the cases variant needs precedents, but the spec has none; load a precedents file")
    cases = retrieve_for(spec, request, k, category=category)
    blocks = "\n\n".join(render_case(c) for c in cases)
    return f"{statutes}\n\n{CASES_INTRO}\n\n{blocks}\n\n{CASES_OUTRO}"


def _system(system_prompt: str | None, context: str) -> str:
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise TypeError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
    parts = [p.strip() for p in (system_prompt or "", context) if p and p.strip()]
    return "\n\n".join(parts)


def build_messages(request: str, variant: str, *, spec: Spec | None = None, k: int = 3,
                   category: str | None = None, system_prompt: str | None = None) -> list[dict]:
    """Chat messages (`role`/`content` dicts) for one request under one variant.

    spec: the statutes / code / precedents to show, and how precedents are retrieved (its
        categories, `retrieval` method and `embed_fn`); default: the built-in spec with BM25.
    k: how many precedents the `cases` variant shows.
    category: the request's category if known (one of the spec's categories; steers precedent
        retrieval); else guessed by the spec's keyword categoriser.
    system_prompt: text placed before the guidance in the system message (e.g. a persona).
    """
    context = variant_context(request, variant, spec=spec, k=k, category=category)
    system = _system(system_prompt, context)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_content(request)})
    return messages


def build_plain_messages(request: str, *, system_prompt: str | None = None) -> list[dict]:
    """The prompt without any guidance: the context-distillation target used at training and eval time."""
    return build_messages(request, "none", system_prompt=system_prompt)


__all__ = [
    "CASES_INTRO", "CASES_OUTRO", "CODE_INTRO", "STATUTES_OUTRO", "VARIANTS",
    "build_messages", "build_plain_messages", "user_content", "variant_context",
]
