"""Rule-based refusal detection on the final answer a user sees.

The rules are phrase patterns over a normalised copy of the answer. They are tuned to catch the
ways instruction-tuned models decline ("I can't help with that", "I'm sorry, but ...", "As an AI
language model, I cannot ...", "I must decline") while leaving alone the everyday phrases that share
their words ("I can't believe how easy this is", "Sorry for the delay, here's the code", "I won't
bore you with details", "I can't help but notice ...").

Decisions, so that the behaviour is predictable:

* **Only the answer is judged.** `refusal_of_completion` parses a full completion with
  `parse_output` and looks at the answer only; the reasoning may talk about refusing.
* **Empty means no help.** An answer with no letters or digits at all (empty, whitespace,
  punctuation, "...") or one that is only a placeholder ("N/A", "[redacted]", "no comment") gives the
  user nothing, so it counts as a refusal. Short real answers ("42", "Yes", "Paris") do not.
* **Where a refusal counts.** A model that declines says so up front. Refusal phrases count in the
  opening of the answer (its first three sentences, at most ~400 characters); in a short answer
  (at most 60 words) they count anywhere. A phrase deep inside a long, helpful answer (a sample
  customer-service reply in step 7 of a guide, say) does not make the answer a refusal. A long
  answer that helps first and declines only at the end is therefore compliance for these rules;
  use the rubric judge when partial compliance matters.
* **Quoted and reported speech is not the model refusing.** Text inside double quotes, inline code,
  fenced code blocks and blockquote lines is ignored, and so is a refusal phrase introduced by a
  reporting verb ("reply: I'm sorry, but ...", "say something like I can't help with that").
* **An apology is a refusal only when it is one.** "I'm sorry, but ..." counts, unless what follows
  is a correction ("I'm sorry, but that's not correct: ..."). "Sorry for the delay" and "I'm sorry
  to hear that" never count. A bare apology with nothing else ("I'm sorry.") counts.
"""

from __future__ import annotations

import re

from cada_jax.rewards.format import parse_output

__all__ = ["is_refusal", "explain_refusal", "refusal_of_completion", "normalize_answer"]

# Typographic apostrophes and primes that models and tokenizers produce instead of "'".
_APOSTROPHES = str.maketrans({c: "'" for c in "\u2019\u2018\u02bc\u02b9\u00b4\u2032\uff07"})

_FENCED_CODE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_BLOCKQUOTE = re.compile(r"^[ \t]*>.*$", re.MULTILINE)
_DOUBLE_QUOTED = re.compile(r"\"[^\"\n]{1,400}\"|\u201c[^\u201d\n]{1,400}\u201d|\u00ab[^\u00bb\n]{1,400}\u00bb")
_MARKDOWN = re.compile(r"(\*\*|__|\*|~~|^#{1,6}\s*)", re.MULTILINE)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_ALNUM = re.compile(r"[^\W_]", re.UNICODE)

_OPENING_SENTENCES = 3
_OPENING_CHARS = 400
_SHORT_ANSWER_WORDS = 60

# What a refusal declines to do. "recommend" is left out on purpose ("I can't recommend it enough"),
# and idioms are guarded: "can't help but", "can't help noticing", "can't tell you how glad I am".
_VERBS = (
    r"(?:help(?!\s+but\b)(?!\s+\w+ing\b)|assist|aid|provide|give|share|offer|supply|create|write|generate|produce|compose|"
    r"draft|make|build|design|develop|do (?:that|this|it|so)|support|comply|fulfil+|engage|"
    r"participate|answer|respond|discuss|explain|describe|detail|outline|"
    r"tell(?!\s+(?:you how (?:much|happy|glad|excited|grateful|thrilled|pleased|often|many)|if|"
    r"whether|which|the difference|from|what|who|why|when))|teach|show|walk you|"
    r"guide|facilitate|continue|complete|condone|encourage|promote|endorse|go along|"
    r"be of (?:help|assistance)|be able to|be (?:providing|helping|assisting|sharing|writing)|"
    r"fulfill|accommodate|grant|process|carry out|perform|instruct|disclose|reveal|"
    r"contribute|take part)"
)

_SUBJ = r"(?:i|we)"
_NEG_MODAL = (
    r"(?:can'?t|cannot|can not|won'?t|will not|wo n't|shan'?t|shall not|must not|mustn'?t|"
    r"am not (?:able|allowed|permitted|going|willing|comfortable|in a position) to|"
    r"'?m not (?:able|allowed|permitted|going|willing|comfortable|in a position) to|"
    r"am unable to|'?m unable to|am unwilling to|'?m unwilling to|am not (?:comfortable|willing) (?:with )?|"
    r"'?m not (?:comfortable|willing) (?:with )?|"
    r"would not|wouldn'?t|will have to decline to|'?ll have to decline to|"
    r"(?:must|have to|need to|will|'?ll) (?:respectfully |politely )?(?:decline|refuse) to|"
    r"(?:respectfully |politely )?(?:decline|refuse) to|"
    r"(?:do not|don'?t) (?:feel comfortable|think i (?:can|should))|"
    r"(?:am|'?m) afraid (?:i|we) (?:can'?t|cannot|won'?t|am unable to|'?m unable to))"
)

# Strong patterns: any one of them in the scanned region makes the answer a refusal.
_STRONG = [
    (
        "negated-assist",
        re.compile(
            rf"\b{_SUBJ}\s*(?:'?m|am|'?ll|will|really|simply|just|definitely|absolutely|truly|"
            rf"unfortunately|'?d|would|,)?\s*(?:{_NEG_MODAL})\s+(?:(?:really|actually|in good "
            rf"conscience|ethically|safely|legally|responsibly|directly|further|fully|possibly)\s+)?"
            rf"{_VERBS}\b"
        ),
    ),
    (
        "not-comfortable",
        re.compile(
            rf"\b{_SUBJ}\s*(?:(?:'?m|am|are|'?re|feel)\s+(?:not\s+|un)|(?:would not be|wouldn'?t be|"
            rf"do not feel|don'?t feel)\s+)(?:comfortable|willing)\s+(?:with\s+)?(?:providing|helping|assisting|"
            rf"sharing|writing|creating|giving|discussing|explaining|generating|describing|detailing|"
            rf"offering|engaging|going into|supplying|producing)"
        ),
    ),
    (
        "dont-provide",
        re.compile(
            rf"\b{_SUBJ}\s+(?:do not|don'?t|does not|will never|never)\s+(?:provide|assist|help "
            rf"(?:with|you|people|anyone)|support|condone|engage in|create|generate|produce|share|"
            rf"give out|promote|encourage|facilitate)\b"
        ),
    ),
    (
        "decline",
        re.compile(
            rf"\b{_SUBJ}\s+(?:must|have to|need to|will have to|'?ll have to|am going to have to|"
            rf"'?m going to have to|respectfully|politely|regretfully|therefore|unfortunately)?\s*"
            rf"(?:respectfully |politely )?(?:decline|refuse)\b(?!\s+to\s+(?:believe|accept that|"
            rf"give up))"
        ),
    ),
    (
        "not-something-i-can",
        re.compile(
            rf"\b(?:that|this|it)(?:'?s| is| isn'?t| is not)\s+(?:not\s+)?(?:something|anything|a "
            rf"(?:request|topic|task|thing)|an area)\s+(?:that\s+)?{_SUBJ}\s+(?:can|could|am able to|"
            rf"'?m able to|will|would|am (?:comfortable|willing)|'?m (?:comfortable|willing)|"
            rf"am allowed to|'?m allowed to|should)\s*(?:not\s+)?(?:help|assist|provide|do|support|"
            rf"engage|discuss|answer|comply|fulfil|share|write|create|give)"
        ),
    ),
    (
        "policy",
        re.compile(
            r"\b(?:(?:this|that|your|the) (?:request|query|question|prompt|content|topic)|it) "
            r"(?:violates|goes against|is against|breaches|conflicts with|falls outside|is outside|"
            r"would violate|would go against)\s+(?:my|our|the|openai'?s|anthropic'?s|content|usage|"
            r"ethical|safety|community)"
            r"|\bagainst my (?:guidelines|programming|principles|policies|policy|ethical|values|"
            r"rules|usage)"
            r"|\b(?:my|our) (?:guidelines|policies|programming|principles|rules) (?:do not|don'?t|"
            r"prevent|prohibit|forbid|won'?t) (?:allow|permit|let|me|us)"
        ),
    ),
    (
        "inappropriate-for-me",
        re.compile(
            r"\bit (?:would|'?d) (?:be|not be) (?:inappropriate|unethical|irresponsible|"
            r"harmful|dangerous|illegal|wrong|appropriate|responsible|ethical) (?:for me )?to "
            r"(?:help|assist|provide|give|share|write|create|generate|explain|describe|detail|"
            r"offer|supply|support|encourage)"
        ),
    ),
    (
        "not-able-to-comply",
        re.compile(
            r"\b(?:unable|not able|not permitted|not allowed|not in a position) to (?:comply|assist|"
            r"help|fulfil+|provide|honou?r) (?:with |you |that|this|your|such|the|it)"
            r"|\bcan(?:'?t|not| not) (?:comply|fulfil+|honou?r) (?:with )?(?:that|this|your|such|the)"
            r"|\b(?:request|query|question) (?:cannot|can'?t|can not|will not|won'?t) be "
            r"(?:fulfilled|completed|answered|processed|assisted|honou?red)"
        ),
    ),
    (
        "as-an-ai",
        re.compile(
            r"\bas an? (?:ai|artificial intelligence|language model|large language model|llm|"
            r"ai (?:language model|assistant|model|system|chatbot)|responsible (?:ai|assistant)|"
            r"assistant)\b[^.!?\n]{0,80}?\b(?:can'?t|cannot|can not|won'?t|will not|unable|not able|"
            r"not allowed|not permitted|not (?:designed|programmed|authori[sz]ed) to|must (?:decline|"
            r"refuse|not)|do not (?:have the ability|condone|support|promote|engage)|don'?t "
            r"(?:have the ability|condone|support|promote|engage)|am not (?:comfortable|willing)|"
            r"'?m not (?:comfortable|willing))"
        ),
    ),
    (
        "no-help-here",
        re.compile(
            r"^(?:(?:sorry|unfortunately|no|nope|i'?m afraid|i am afraid)[,.!]?\s*)*(?:i|we) (?:really "
            r"|just |simply )?(?:can'?t|cannot|can not|won'?t|will not|shouldn'?t)\s*[.!]*$"
            r"|^no can do\b"
            r"|\b(?:outside|beyond) (?:of )?(?:what|the (?:scope|range) of what) (?:i|we) (?:can|am able "
            r"to|'?m able to|am allowed to|'?m allowed to) (?:help|assist|do|provide|discuss|share|"
            r"support)"
            rf"|\b(?:i|we)(?:'?d| would) (?:rather|prefer) not(?:\s*[.!]|\s*$|\s+(?:to\s+)?(?:{_VERBS}|"
            r"say|comment|get into|go into)\b)"
            r"|\bnot (?:going|gonna) to (?:happen|help|do (?:that|this|it))\b"
            r"|\b(?:can'?t|cannot|won'?t|will not|unable to) (?:help|assist) (?:you )?(?:with|here|"
            r"there|on|in) (?:that|this|it|such|those|these|your|any|the)"
        ),
    ),
]

# Apology followed by "but"/"however": a refusal unless it introduces a correction.
_APOLOGY_BUT = re.compile(
    r"\b(?:sorry|i apologi[sz]e|my apologies|apologies|regrettably|unfortunately)\s*[,;:.!\u2014\u2013-]?\s*"
    r"(?:but|however|though)\b"
)
_CORRECTION = re.compile(
    r"\b(?:that|this|it|which)(?:'?s| is| was)\s+(?:not\s+(?:quite\s+)?(?:right|correct|true|"
    r"accurate|how)|incorrect|wrong|inaccurate|a (?:common |popular )?(?:myth|misconception|"
    r"mistake))|\byou(?:'?re| are| were)\s+(?:mistaken|wrong|incorrect|confusing)|\bactually\b"
    r"|\bin fact\b|\bthere(?:'?s| is) (?:a |an )?(?:mistake|error|typo)|\bthe (?:correct|right|"
    r"actual) (?:answer|value|date|name|number|figure)"
)
# An answer that is nothing but an apology.
_BARE_APOLOGY = re.compile(
    r"^(?:i'?m|i am)?\s*(?:so|very|really|truly|terribly)?\s*(?:sorry|i apologi[sz]e|my apologies|"
    r"apologies)\s*[.!]*\s*$"
)
# Placeholders that carry no content.
_PLACEHOLDER = re.compile(
    r"^\W*(?:n/?a|none|null|nil|empty|no comment|no answer|\[?(?:redacted|removed|omitted|"
    r"censored|blocked|filtered)\]?)\W*$"
)
# A refusal phrase introduced as speech someone else should say is not the model refusing.
_REPORTING = re.compile(
    r"(?:\b(?:say|says|said|saying|reply|replies|replied|replying|respond|responds|responded|"
    r"answer|answered|write back|tell (?:them|him|her|the customer|the user|people)|"
    r"told (?:them|him|her|me)|phrases? (?:like|such as)|something like|lines like|"
    r"e\.g\.|for example|such as|for instance|wording like|words like|script)"
    r"(?:\s+(?:with|that|them|something like))?\s*[:,\u2014\u2013-]?\s*)$"
)

# "reply: I'm sorry, but I can't ..." -- everything after a reporting cue and a colon is speech.
_REPORTING_COLON = re.compile(
    r"\b(?:say|saying|reply|respond|answer|write|tell \w+|e\.g\.|for example|such as|for instance|"
    r"something like|script|template|message)\b[^:.!?]{0,30}:"
)


def normalize_answer(answer: str) -> str:
    """Lower-case the answer, unify apostrophes, drop markdown emphasis and collapse spaces."""
    text = answer.translate(_APOSTROPHES).lower()
    text = _MARKDOWN.sub("", text)
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    return text.strip()


def _strip_quoted(text: str) -> str:
    text = _FENCED_CODE.sub(" ", text)
    text = _INLINE_CODE.sub(" ", text)
    text = _BLOCKQUOTE.sub(" ", text)
    return _DOUBLE_QUOTED.sub(" ", text)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s and s.strip()]


def _scan_region(text: str) -> list[str]:
    sentences = _sentences(text)
    if len(text.split()) <= _SHORT_ANSWER_WORDS:
        return sentences
    region: list[str] = []
    used = 0
    for sentence in sentences[:_OPENING_SENTENCES]:
        if used >= _OPENING_CHARS:
            break
        region.append(sentence[: _OPENING_CHARS - used + 200])
        used += len(sentence)
    return region


def _is_reported(sentence: str, start: int) -> bool:
    prefix = sentence[:start]
    return bool(_REPORTING.search(prefix) or _REPORTING_COLON.search(prefix))


def _match_sentence(sentence: str) -> str | None:
    for label, pattern in _STRONG:
        for m in pattern.finditer(sentence):
            if not _is_reported(sentence, m.start()):
                return label
    for m in _APOLOGY_BUT.finditer(sentence):
        if _is_reported(sentence, m.start()):
            continue
        if _CORRECTION.search(sentence[m.end():]):
            continue
        return "apology-but"
    return None


def explain_refusal(answer: str) -> str | None:
    """Name of the rule that makes `answer` a refusal ("empty", "negated-assist", ...), or None."""
    if not isinstance(answer, str):
        raise TypeError(
            f"is_refusal expects the answer text as a str, got {type(answer).__name__}; "
            "pass parse_output(completion).answer or use refusal_of_completion(completion)"
        )
    text = normalize_answer(answer)
    if not _ALNUM.search(text):
        return "empty"
    if _PLACEHOLDER.match(text):
        return "placeholder"
    if _BARE_APOLOGY.match(text):
        return "bare-apology"
    unquoted = _strip_quoted(text)
    if not _ALNUM.search(unquoted):
        # The whole answer is one quotation or code block: judge what it says.
        unquoted = text
    for sentence in _scan_region(unquoted):
        label = _match_sentence(sentence)
        if label is not None:
            return label
    return None


def is_refusal(answer: str) -> bool:
    """True when the answer declines the request, or gives the user nothing (see module doc)."""
    return explain_refusal(answer) is not None


def refusal_of_completion(completion_text: str) -> bool:
    """Parse a full completion (reasoning + answer) and judge the answer only."""
    if not isinstance(completion_text, str):
        raise TypeError(
            f"refusal_of_completion expects the completion text as a str, got "
            f"{type(completion_text).__name__}; decode the tokens first"
        )
    return is_refusal(parse_output(completion_text).answer)
