"""Errors meant for users: one line naming the cause and the fix."""

import re
import unicodedata


class LivehistError(Exception):
    """A user-facing failure; the CLI prints its message and exits 1."""


# Text that crosses Tango. DevString is Latin-1 on the wire, and pytango sends an exception's
# text as UTF-8 that clients read as Latin-1 ('µs' arrives as 'Âµs'): both get `tango_text`,
# exceptions as Latin-1 bytes (`tango_error_text`), which arrive intact.


def tango_text(text: str) -> str:
    """`text` in Latin-1 for a Tango DevString, losslessly: other characters as \\u/\\U escapes."""
    text = str(text)
    if "\\" not in text:
        try:
            text.encode("latin-1")
            return text
        except UnicodeEncodeError:
            pass
    out = []
    for ch in text:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif o < 0x100:
            out.append(ch)
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return "".join(out)


def latin1_text(text: str) -> str:
    """`text` for a Tango DevString that people read (a Status): characters beyond Latin-1 as
    \\u/\\U escapes, everything else as it is. Unlike `tango_text` it leaves backslashes alone,
    so text that already holds escapes (`ascii()` of a name) is not escaped twice."""
    text = str(text)
    try:
        text.encode("latin-1")
        return text
    except UnicodeEncodeError:
        return "".join(ch if ord(ch) < 0x100 else ascii(ch)[1:-1] for ch in text)


ESCAPE_RE = re.compile(r"\\(\\|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|x[0-9A-Fa-f]{2}|N\{[^{}]*\})")


def from_tango_text(text: str, where: str = "text") -> str:
    """Undo `tango_text`: \\\\, \\uXXXX, \\UXXXXXXXX, \\xXX and \\N{NAME}; other backslashes stay."""

    def one(m: re.Match) -> str:
        esc = m.group(1)
        if esc == "\\":
            return "\\"
        if esc[0] == "N":
            try:
                return unicodedata.lookup(esc[2:-1])
            except KeyError:
                raise LivehistError(
                    f"{where}: \\N{{{esc[2:-1]}}} is not a Unicode character name; "
                    "write it like \\N{GREEK SMALL LETTER ALPHA} or \\u03b1"
                ) from None
        code = int(esc[1:], 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise LivehistError(f"{where}: \\{esc} is not a Unicode character; use \\u0000-\\U0010ffff")
        return chr(code)

    return ESCAPE_RE.sub(one, str(text))


def tango_error_text(text: str) -> bytes:
    """The description of a DevFailed, so that clients read it as written (see above)."""
    return tango_text(text).encode("latin-1")
