"""Caption cleaning before T5, in the spirit of PixArt/DeepFloyd-IF `clean_caption`.

Web alt-text carries URLs, markup, handles and junk punctuation that waste the 120-token
budget and teach the model nothing; stripping them makes train and sample prompts look alike.
"""
from __future__ import annotations

import html
import re

_SUBS: list[tuple[re.Pattern, str]] = [(re.compile(p, re.I), r) for p, r in [
    (r"<[^>]*>", " "),                                                # html tags
    (r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b", " "),                           # e-mail addresses
    (r"\b(?:https?://|www\.)\S+", " "),                               # explicit urls
    (r"\b[\w.-]+\.(?:com|net|org|edu|gov|io|co|ru|de|uk|it)\b(?:/\S*)?", " "),  # bare domains
    (r"(?<!\w)@[\w.]+", " "),                                         # @mentions
    (r"(?<!\w)#\d+\b", " "),                                          # #123 ids
    (r"\b\d{2,}\s*[x×]\s*\d{2,}\b", " "),                             # 1920x1080 sizes
    (r"\b[\w-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?)\b", " "),           # file names
    (r"[\u2010-\u2015\u2212]", "-"),                                  # dash variants
    (r"[\u201c\u201d\u201e\u00ab\u00bb]", '"'),                       # curly/angle double quotes
    (r"[\u2018\u2019\u201a`\u00b4]", "'"),                            # curly single quotes
    (r"\.{2,}|\u2026", " "),                                          # ellipses
    (r"([!?,;:*_~\-'\"])\1+", r"\1"),                                 # !!! -> !, -- -> -
    (r"\s+([.,!?;:])", r"\1"),                                        # "word ," -> "word,"
    (r"\s+", " "),                                                    # whitespace runs
]]
_EDGE_JUNK = " _,;:-+*|"
_WRAPPED = re.compile(r"""^(["'])((?:(?!\1).)*)\1$""")  # quote ... same quote, none inside


def clean_caption(text: str) -> str:
    """Normalise one caption: unescape/strip markup, drop urls/handles, lowercase, collapse runs."""
    text = html.unescape(html.unescape(str(text))).lower()  # twice: alt-text is often double-escaped
    for pattern, repl in _SUBS:
        text = pattern.sub(repl, text)
    text = text.strip(_EDGE_JUNK)
    while (m := _WRAPPED.match(text)):  # '"a cat"' -> 'a cat'
        text = m.group(2).strip(_EDGE_JUNK)
    if text.count('"') % 2:  # an unmatched double quote is debris, not quoting
        text = re.sub(r'\s*"\s*', " ", text).strip(_EDGE_JUNK)
    return "" if re.fullmatch(r"[\W_]*", text) else text
